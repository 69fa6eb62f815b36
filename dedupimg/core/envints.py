"""Integer settings from the environment (``DEDUPIMG_READ_WORKERS`` and the other overrides for measurements).

Modules read them at import, before the CLI can report anything: a value that is not an integer in its range
gives the default there, and :func:`check` (which the CLI calls first thing) turns it into one usage error line
(exit 2), so a typo never becomes a traceback or a thousand worker processes.
"""

from __future__ import annotations

import os

from dedupimg.core.errors import UsageError

_RANGES: dict[str, tuple[int, int]] = {}


def env_int(name: str, default: int, low: int, high: int) -> int:
    """``$name`` as an integer from ``low`` to ``high``; ``default`` when unset or not such an integer."""
    _RANGES[name] = (low, high)
    value = _parse(name)
    return default if value is None else value


def _parse(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    low, high = _RANGES[name]
    try:
        value = int(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def check() -> None:
    """UsageError for the first registered variable that is set to something else than an integer in range."""
    for name, (low, high) in sorted(_RANGES.items()):
        if os.environ.get(name) is not None and _parse(name) is None:
            raise UsageError(f"{name} must be an integer from {low} to {high}, not {os.environ[name]!r}")
