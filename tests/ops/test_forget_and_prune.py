"""forget_and_prune: forget (by policy or by ids), then prune, in one call under the caller's exclusive lock."""

from __future__ import annotations

from pathlib import Path

from dedupimg.core.retention import Policy
from dedupimg.ops.forget import forget_and_prune
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.repository import Repository
from dedupimg.store.lock import LockMode
from tests.helpers import det_bytes, small_repo


def _two_snapshots(tmp_path: Path) -> Path:
    with small_repo(tmp_path / "repo") as repo:
        for seed in (1, 2):
            (tmp_path / "a.img").write_bytes(det_bytes(seed, 300_000))
            take_snapshot(repo, str(tmp_path / "a.img"), name="disk")
    return tmp_path / "repo"


def test_forget_by_policy_then_prune_frees_the_space(tmp_path):
    path = _two_snapshots(tmp_path)
    with Repository.open(path, LockMode.EXCLUSIVE) as repo:
        old, new = repo.snapshots()
        result = forget_and_prune(repo, [], Policy(last=1), and_prune=True)
        assert [r.id for r in result.plan.remove] == [old.id]
        assert [r.id for r in result.plan.keep] == [new.id]
        assert result.prune is not None and not result.prune.dry_run
        assert result.prune.outcome is not None and result.prune.outcome.bytes_freed > 0
        assert [r.id for r in repo.snapshots()] == [new.id]


def test_forget_by_id_without_prune_leaves_the_packs(tmp_path):
    path = _two_snapshots(tmp_path)
    with Repository.open(path, LockMode.EXCLUSIVE) as repo:
        old, new = repo.snapshots()
        result = forget_and_prune(repo, [new.short_id], Policy())
        assert result.prune is None
        assert [r.id for r in result.plan.remove] == [new.id]
        assert [r.id for r in repo.snapshots()] == [old.id]


def test_dry_run_changes_nothing(tmp_path):
    path = _two_snapshots(tmp_path)
    with Repository.open(path, LockMode.EXCLUSIVE) as repo:
        before = repo.snapshots()
        result = forget_and_prune(repo, [], Policy(last=1), dry_run=True, and_prune=True)
        assert len(result.plan.remove) == 1
        assert result.prune is not None and result.prune.dry_run and result.prune.outcome is None
        assert repo.snapshots() == before
        # The prune plan is of the repository as it is; what the forget would add to it is said beside (a
        # review found the dry run said "would free about 0 B"), and it is what the real run frees.
        assert result.prune.bytes_to_free == 0 and result.freed_by_forget > 0
        real = forget_and_prune(repo, [], Policy(last=1), and_prune=True)
        assert real.prune is not None and real.prune.outcome is not None
        assert real.prune.outcome.bytes_freed >= result.freed_by_forget
