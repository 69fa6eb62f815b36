"""Forget: drop snapshot records by a retention policy (restic's semantics, see retention.py) or by id.

Forget plans first (which records go, and for each kept one the rules that keep it), then removes the
records in one step (Repository.forget: a tombstone pack, then one index transaction). The data of removed
snapshots stays in the packs until ``prune`` collects what nothing else references; ``forget_and_prune`` does
both in turn, as ``dedupimg forget --prune`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from dedupimg.core.errors import UsageError
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.retention import EMPTY_POLICY_MESSAGE, Decision, Policy, SnapshotFilter, apply_policy, group_by_name
from dedupimg.ops.prune import PruneReport, prune
from dedupimg.ops.selection import fields_of
from dedupimg.ops.stats import snapshot_stats
from dedupimg.repo.repository import Repository


@dataclass(frozen=True)
class ForgetPlan:
    """Per image name, every snapshot newest first with its verdict."""

    groups: dict[str, list[Decision[SnapshotRecord]]]

    @property
    def remove(self) -> list[SnapshotRecord]:
        return [d.item for ds in self.groups.values() for d in ds if not d.keep]

    @property
    def keep(self) -> list[SnapshotRecord]:
        return [d.item for ds in self.groups.values() for d in ds if d.keep]


def plan_policy(repo: Repository, policy: Policy, name: str | None = None,
                where: SnapshotFilter | None = None) -> ForgetPlan:
    """Apply ``policy`` to every image name (or only to ``name``), among the snapshots ``where`` selects (as
    restic's --host and --tag: the others are neither kept nor removed); UsageError for an empty policy."""
    if policy.empty():  # refused even in an empty repository, where apply_policy is never called
        raise UsageError(EMPTY_POLICY_MESSAGE)
    records = (where or SnapshotFilter()).select(repo.snapshots(name), fields_of)
    groups = group_by_name(records, lambda r: r.name)
    return ForgetPlan({
        group: apply_policy(records, policy, time_of=lambda r: r.datetime, tags_of=lambda r: r.tags)
        for group, records in sorted(groups.items())
    })


def plan_ids(repo: Repository, refs: list[str]) -> ForgetPlan:
    """Remove exactly the named snapshots (ids, unique prefixes, latest, NAME@latest); keep the rest."""
    named = {repo.resolve(ref).id for ref in refs}  # every reference must resolve, or nothing is removed
    groups = group_by_name(repo.snapshots(), lambda r: r.name)
    return ForgetPlan({
        group: [
            Decision(r, r.id not in named, () if r.id in named else ("not named",))
            for r in sorted(records, key=lambda r: r.datetime, reverse=True)
        ]
        for group, records in sorted(groups.items())
    })


def plan_left_out(repo: Repository) -> ForgetPlan:
    """Remove every snapshot that ``repair index`` left out (its data incomplete): prune keeps what such a
    snapshot still has until it is forgotten, in case the missing data is recovered and repaired back."""
    groups = group_by_name(repo.left_out(), lambda r: r.name)
    return ForgetPlan({
        group: [Decision(r, False, ()) for r in sorted(records, key=lambda r: r.datetime, reverse=True)]
        for group, records in sorted(groups.items())
    })


def execute(repo: Repository, plan: ForgetPlan) -> list[SnapshotRecord]:
    """Remove the plan's records; returns them."""
    removed = plan.remove
    repo.forget(removed)
    return removed


def forget_snapshots(repo: Repository, records: list[SnapshotRecord]) -> None:
    repo.forget(records)


@dataclass(frozen=True)
class ForgetReport:
    plan: ForgetPlan  # what was removed (or, in a dry run, would be) and what was kept, and why
    prune: PruneReport | None  # the prune that followed, if one was asked for
    # A dry run with prune: bytes the removed snapshots' own data would add to what the prune plan frees (the
    # plan is made on the repository as it is, where they still live).
    freed_by_forget: int = 0


def forget_and_prune(
    repo: Repository,
    refs: list[str],
    policy: Policy,
    name: str | None = None,
    *,
    dry_run: bool = False,
    and_prune: bool = False,
    where: SnapshotFilter | None = None,
    left_out: bool = False,
) -> ForgetReport:
    """Forget exactly the snapshots ``refs`` names or, without refs, those ``policy`` removes (of every image
    name, or only of ``name``), or with ``left_out`` every snapshot a repair left out; then, with ``and_prune``,
    prune (default ``max_unused``) at once.

    The caller holds the repository's exclusive lock, so nothing comes between the forget and the prune.
    ``dry_run`` plans both and changes nothing.
    """
    if left_out and (refs or not policy.empty()):
        raise UsageError("--left-out forgets every snapshot a repair left out; give no ids or keep rules with it")
    plan = plan_left_out(repo) if left_out else plan_ids(repo, refs) if refs else \
        plan_policy(repo, policy, name, where)
    if not dry_run:
        execute(repo, plan)
    # (Stats count listed snapshots: a left-out one's share is not estimated.)
    freed = snapshot_stats(repo, plan.remove, each=False).totals.freed \
        if dry_run and and_prune and plan.remove and not left_out else 0
    return ForgetReport(plan, prune(repo, dry_run=dry_run) if and_prune else None, freed)
