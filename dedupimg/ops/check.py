"""``check``: prove the repository consistent, and optionally that its data is intact.

What it proves, and how, is the repository's business (``Repository.audit``, repo/audit.py: it compares the
index with the packs row by row); this operation hands over the caller's progress sink and returns the
report, whose value types are re-exported here for callers and tests.
"""

from __future__ import annotations

from dedupimg.core.progress import Progress
from dedupimg.repo.audit import CheckCounts, CheckReport, Finding, Hint, SnapshotRef, choose_packs
from dedupimg.repo.repository import Repository

__all__ = ["CheckCounts", "CheckReport", "Finding", "Hint", "SnapshotRef", "check", "choose_packs"]


def check(repo: Repository, read_data: float = 0.0, progress: Progress | None = None,
          seed: bytes | None = None) -> CheckReport:
    """Check ``repo`` (open with at least a SHARED lock). ``read_data``: share of packs whose data is read
    (0 none, 1.0 all), chosen by a hash of ``seed`` and the pack id (default seed: the repository id and
    today's UTC date, so reruns on one day read the same packs and days rotate)."""
    return repo.audit(read_data, progress, seed)
