"""Prune: give back the space of forgotten snapshots and interrupted writes, safely.

The plan and its execution are the repository's (``Repository.plan_prune`` / ``execute_prune``, in
repo/compaction.py); this module reports them.

The caller holds the repository's exclusive lock (``Repository.open(..., LockMode.EXCLUSIVE)``): the plan is
only valid while no snapshot can add references. ``dry_run`` plans and reports without changing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dedupimg.core.config import DEFAULT_MAX_UNUSED
from dedupimg.core.ids import CHUNK, SEGMENT, SNAPSHOT
from dedupimg.core.progress import NoProgress, Progress
from dedupimg.repo.repository import Repository

if TYPE_CHECKING:  # a value type the repository returns (type-only imports are outside the contracts)
    from dedupimg.repo.compaction import PruneOutcome


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
    salvaged_packs: int = 0  # damaged packs a repair salvaged: rewritten (or deleted) whatever max_unused says
    held_rows: int = 0  # rows kept for snapshots a repair left out, until 'forget --left-out'
    chunks_kept_for_left_out: bool = False  # no chunk freed: a left-out snapshot lacks data (it may come back)

    @property
    def bytes_freed(self) -> int:
        return self.outcome.bytes_freed if self.outcome is not None else 0


def prune(
    repo: Repository, max_unused: float = DEFAULT_MAX_UNUSED, dry_run: bool = False, progress: Progress | None = None
) -> PruneReport:
    sink = progress or NoProgress()
    todo = repo.plan_prune(max_unused)
    outcome = None
    if not dry_run:
        sink.start("prune: rewrite packs", sum(w.row.size for w in todo.repack) or None)
        try:
            outcome = repo.execute_prune(todo, sink.advance)  # an empty plan changes nothing
        finally:
            sink.finish()
    return PruneReport(
        dry_run=dry_run,
        max_unused=max_unused,
        packs_to_delete=len(todo.delete),
        packs_to_rewrite=len(todo.repack),
        packs_keeping_garbage=len(todo.garbage),
        bytes_to_copy=todo.repack_bytes,
        bytes_to_free=todo.freed_estimate,
        chunks_dropped=todo.dropped_by_type[CHUNK],
        segments_dropped=todo.dropped_by_type[SEGMENT],
        records_dropped=todo.dropped_by_type[SNAPSHOT],
        orphan_packs=len(todo.orphan_packs),
        tmp_files=len(todo.tmp_files),
        outcome=outcome,
        skipped=tuple(todo.skipped),
        salvaged_packs=len(todo.salvaged),
        held_rows=todo.held,
        chunks_kept_for_left_out=todo.chunks_kept_for_left_out,
    )
