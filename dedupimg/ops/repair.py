"""``repair index``: rebuild the whole index from the pack files alone.

The rebuild reads pack trailers and metadata blobs and writes a fresh LMDB environment, all of it the
repository's business (``Repository.rebuild_index``, repo/repair.py); this operation is what users run.
The old index is never opened: it may be missing or damaged, which is why this is not a method of an open
repository.
"""

from __future__ import annotations

from pathlib import Path

from dedupimg.core.progress import Progress
from dedupimg.repo.repair import LeftOut, RepairReport
from dedupimg.repo.repository import Repository

__all__ = ["LeftOut", "RepairReport", "repair_index"]


def repair_index(location: Path | str, lock_wait: float = 0.0, progress: Progress | None = None) -> RepairReport:
    """Rebuild the index of the repository at ``location`` (a directory or ``s3:`` URL) under an EXCLUSIVE lock
    (waiting up to ``lock_wait`` seconds for it)."""
    return Repository.rebuild_index(location, lock_wait, progress)
