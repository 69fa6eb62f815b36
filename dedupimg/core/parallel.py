"""Two pieces every pipeline here shares: how many workers, and jobs started ahead but taken in order.

snapshot (hashing), restore (reading runs) and check (reading packs) each start work on a pool some items
ahead of the one they consume, and consume strictly in order; the mount and serve read pool sizes itself the
same way.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
J = TypeVar("J")


def worker_count(least: int = 2, most: int = 4) -> int:
    """Threads (or processes) for work that releases the GIL (zstd, blake3, pread): one per core, but at least
    ``least`` and at most ``most``."""
    return max(least, min(most, os.cpu_count() or least))


def started_ahead(items: Iterable[T], start: Callable[[T], J], window: int) -> Iterator[tuple[T, J]]:
    """``(item, start(item))`` in the order of ``items``, each job started ``window`` items before its pair is
    handed out (so up to ``window + 1`` jobs run while the caller works on one).

    Jobs that are futures and were never handed out are cancelled when the iteration stops early (an error or
    a ``break`` in the caller's ``for`` loop closes this generator), so a pool shuts down without running them.
    """
    queue: deque[tuple[T, J]] = deque()
    try:
        for item in items:
            queue.append((item, start(item)))
            if len(queue) > window:
                yield queue.popleft()
        while queue:
            yield queue.popleft()
    finally:
        for _, job in queue:
            if isinstance(job, Future):
                job.cancel()


class Countdown:
    """Calls ``action`` once ``count`` parties have each called :meth:`done` (the last user of shared data
    hands it back: a buffer to its pool, pinned slots to the read pool)."""

    __slots__ = ("_count", "_action", "_lock")

    def __init__(self, count: int, action: Callable[[], object]) -> None:
        self._count = count
        self._action = action
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            self._action()
