"""Check, and what a prune would free: ``check``'s hints about garbage then say what ``prune`` (default
``--max-unused``) will actually give back, from prune's own plan, instead of a count of their own."""

from __future__ import annotations

from dataclasses import dataclass

from dedupimg.core.errors import DedupimgError
from dedupimg.core.progress import Progress
from dedupimg.ops.check import CheckReport, check
from dedupimg.ops.prune import PruneReport, prune
from dedupimg.repo.repository import Repository


@dataclass(frozen=True)
class Checkup:
    check: CheckReport
    prune: PruneReport | None  # prune's dry run; None when check found problems or prune would refuse


def check_and_estimate(repo: Repository, read_data: float = 0.0, progress: Progress | None = None,
                       seed: bytes | None = None) -> Checkup:
    """``check`` (see ops/check.py); when it found nothing wrong, also prune's plan (a dry run: reads only).
    Under check's shared lock the plan is an estimate: a snapshot running meanwhile can change it."""
    report = check(repo, read_data, progress, seed)
    estimate = None
    if report.ok:
        try:
            estimate = prune(repo, dry_run=True)
        except DedupimgError:
            estimate = None  # prune would refuse (an orphan holding an unknown record): check's hints say why
    return Checkup(report, estimate)
