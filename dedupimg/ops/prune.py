"""Prune: give back the space of forgotten snapshots and interrupted writes, safely (see compaction.py).

The caller holds the repository's exclusive lock (``Repository.open(..., LockMode.EXCLUSIVE)``): the plan is
only valid while no snapshot can add references. ``dry_run`` plans and reports without changing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from dedupimg.core.progress import NoProgress, Progress
from dedupimg.repo import compaction, pack
from dedupimg.repo.compaction import DEFAULT_MAX_UNUSED, PruneOutcome
from dedupimg.repo.repository import Repository


@dataclass(frozen=True)
class PruneReport:
    dry_run: bool
    max_unused: float
    packs_to_delete: int
    packs_to_rewrite: int
    packs_keeping_garbage: int
    bytes_to_copy: int
    bytes_to_free: int  # the plan's estimate
    chunks_dropped: int
    segments_dropped: int
    records_dropped: int
    orphan_packs: int
    tmp_files: int
    outcome: PruneOutcome | None  # None for a dry run
    skipped: tuple[str, ...] = ()  # where directories named like packs or temporary files are: reported, left alone

    @property
    def bytes_freed(self) -> int:
        return self.outcome.bytes_freed if self.outcome is not None else 0


def prune(
    repo: Repository, max_unused: float = DEFAULT_MAX_UNUSED, dry_run: bool = False, progress: Progress | None = None
) -> PruneReport:
    sink = progress or NoProgress()
    todo = compaction.plan(repo, max_unused)
    outcome = None
    if not dry_run and not todo.empty:
        sink.start("prune: rewrite packs", sum(w.row.size for w in todo.repack) or None)
        try:
            outcome = compaction.execute(repo, todo, sink.advance)
        finally:
            sink.finish()
    elif not dry_run:
        outcome = PruneOutcome(0, 0, 0, 0, 0)
    return PruneReport(
        dry_run=dry_run,
        max_unused=max_unused,
        packs_to_delete=len(todo.delete),
        packs_to_rewrite=len(todo.repack),
        packs_keeping_garbage=len(todo.garbage),
        bytes_to_copy=todo.repack_bytes,
        bytes_to_free=todo.freed_estimate,
        chunks_dropped=todo.dropped_by_type[pack.CHUNK],
        segments_dropped=todo.dropped_by_type[pack.SEGMENT],
        records_dropped=todo.dropped_by_type[pack.SNAPSHOT],
        orphan_packs=len(todo.orphan_packs),
        tmp_files=len(todo.tmp_files),
        outcome=outcome,
        skipped=tuple(todo.skipped),
    )
