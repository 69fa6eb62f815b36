"""Issue 17 in the library: tag's crash-safe record replacement, stats from reference counts, diff from
manifests (tests/cli/test_everyday_*.py run the commands)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dedupimg.core.errors import UsageError
from dedupimg.core.retention import Policy, SnapshotFilter
from dedupimg.ops.checkup import check_and_estimate
from dedupimg.ops.diff import diff_snapshots
from dedupimg.ops.forget import forget_and_prune
from dedupimg.ops.repair import repair_index
from dedupimg.ops.selection import select_snapshots
from dedupimg.ops.stats import snapshot_stats
from dedupimg.ops.tag import new_tags, tag_snapshots
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes, restores, small_repo, snap


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def path(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    small_repo(tmp_path / "repo", encrypted=request.param).close()
    return tmp_path / "repo"


def _ids(repo: Repository) -> list[bytes]:
    return [r.id for r in repo.snapshots()]


def test_new_tags_order_and_each_once():
    assert new_tags(["a", "b"], add=["c", "a", "c"], remove=["b"], set_to=None) == ["a", "c"]
    assert new_tags(["a", "b"], add=[], remove=[], set_to=["z", "z"]) == ["z"]
    assert new_tags(["a"], add=[], remove=["a"], set_to=None) == []


def test_tag_replaces_the_record_and_back_and_forth_never_repeats_an_id(path, tmp_path):
    with Repository.open(path) as repo:
        data = det_bytes(1, 60_000)
        old = snap(repo, tmp_path / "d.img", data)
        (change,) = tag_snapshots(repo, [old], add=["gold"], remove=[])
        new = change.new
        assert new is not None and new.tags == ["gold"] and new.id != old.id
        assert _ids(repo) == [new.id]
        assert (new.time, new.size, new.segments, new.image_hash) == (old.time, old.size, old.segments, old.image_hash)
        (back,) = tag_snapshots(repo, repo.snapshots(), add=[], remove=["gold"])
        assert back.new is not None and back.new.tags == [] and back.new.id not in (old.id, new.id)
        assert back.new.stats["original"] == old.hex_id and back.new.stats["retagged"] == 2
        (same,) = tag_snapshots(repo, repo.snapshots(), add=[], remove=["absent"])
        assert same.new is None and _ids(repo) == [back.new.id]  # nothing to change: nothing written
        assert restores(repo, repo.snapshots()[0], data, tmp_path)
        with pytest.raises(UsageError):
            tag_snapshots(repo, repo.snapshots(), add=["a"], remove=[], set_to=["b"])
        with pytest.raises(UsageError):
            tag_snapshots(repo, repo.snapshots(), add=[], remove=[])
        report = check_and_estimate(repo)
        assert report.check.ok
    repair_index(path)  # the packs alone give the same answer: only the newest record
    with Repository.open(path) as repo:
        assert [r.id for r in repo.snapshots()] == [back.new.id]


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs, not even the cleanup of an ordinary exception."""


@pytest.mark.parametrize("step", ["seal", "commit"])
def test_tag_killed_at_each_step_leaves_old_or_new_never_none_or_both(path, tmp_path, monkeypatch, step):
    with Repository.open(path) as repo:
        old = snap(repo, tmp_path / "d.img", det_bytes(2, 40_000))
        other = snap(repo, tmp_path / "e.img", det_bytes(3, 40_000), name="e")
        if step == "seal":  # killed while the new pack is written: nothing durable
            monkeypatch.setattr(Repository, "seal", lambda self, writer: (_ for _ in ()).throw(Killed()))
        else:  # killed after the pack is durable, before the index transaction: the pack is an orphan
            monkeypatch.setattr(repo.index, "replace_snapshots", lambda *a: (_ for _ in ()).throw(Killed()))
            monkeypatch.setattr(Repository, "discard_unlisted", lambda self, sealed: None)
        with pytest.raises(Killed):
            tag_snapshots(repo, [old], add=["gold"], remove=[])
        monkeypatch.undo()
        assert sorted(_ids(repo)) == sorted([old.id, other.id])  # the old record, listed once
    with Repository.open(path) as repo:
        assert check_and_estimate(repo).check.ok  # an orphan pack is a hint, not a problem
    report = repair_index(path)  # what the packs say: the replacement happened only if its pack is durable
    with Repository.open(path) as repo:
        listed = {r.id: r for r in repo.snapshots()}
        assert other.id in listed and len(listed) == 2, report
        (mine,) = [r for r in listed.values() if r.name == old.name]
        assert mine.tags == ([] if step == "seal" else ["gold"])
        assert check_and_estimate(repo).check.ok


def test_keep_tag_protects_a_snapshot_tagged_later(path, tmp_path):
    with Repository.open(path) as repo:
        recs = [snap(repo, tmp_path / "d.img", det_bytes(10 + i, 30_000)) for i in range(3)]
        tag_snapshots(repo, [recs[0]], add=["gold"], remove=[])
        result = forget_and_prune(repo, [], Policy(last=1, tags=(frozenset({"gold"}),)))
        kept = repo.snapshots()
        assert [r.time for r in kept] == [recs[0].time, recs[2].time] and kept[0].tags == ["gold"]
        assert [r.id for r in result.plan.remove] == [recs[1].id]


def test_filters_by_host_and_tag(path, tmp_path):
    with Repository.open(path) as repo:
        a = snap(repo, tmp_path / "a.img", det_bytes(20, 20_000), name="a")
        b = snap(repo, tmp_path / "b.img", det_bytes(21, 20_000), name="b")
        (ch,) = tag_snapshots(repo, [b], add=["x", "y"], remove=[])
        assert ch.new is not None
        both = SnapshotFilter(tags=(frozenset({"x", "y"}),))
        assert [r.id for r in select_snapshots(repo, None, both)] == [ch.new.id]
        assert [r.id for r in select_snapshots(repo, None, SnapshotFilter(tags=(frozenset({""}),)))] == [a.id]
        assert select_snapshots(repo, None, SnapshotFilter(hosts=("elsewhere",))) == []
        assert len(select_snapshots(repo, None, SnapshotFilter(hosts=(a.host,)))) == 2
        assert [r.id for r in select_snapshots(repo, ["b@latest"])] == [ch.new.id]


def test_stats_unique_and_shared_from_reference_counts(path, tmp_path):
    with Repository.open(path) as repo:
        common = det_bytes(30, 100_000)
        a = snap(repo, tmp_path / "d.img", common + det_bytes(31, 50_000))
        b = snap(repo, tmp_path / "d.img", common + det_bytes(32, 50_000))
        report = snapshot_stats(repo, [a, b])
        ca, cb = report.snapshots
        for c in (ca, cb):
            assert c.allocated == 150_000 and c.zeros == 0 and c.shared + c.unique == c.allocated
            # The chunk at the seam may be its own too; or b's seam chunk is a delta on a's (docs/format.md §11),
            # and a's then counts as shared: forgetting a would not free it.
            assert 50_000 - 16_384 < c.unique < 50_000 + 16_384
            assert c.unique_data <= c.unique and c.freed >= c.unique_data * 0.9
        t = report.totals
        assert t.allocated == 300_000 and t.zeros == 0 and t.chunks > 0
        assert t.data < 300_000 and 1.3 < t.dedup_ratio < 2.0 and t.freed >= t.stored
        alone = snapshot_stats(repo, [a]).snapshots[0]
        assert alone.unique == ca.unique  # reference counts, not the selection, say what is shared


def test_diff_from_manifests(path, tmp_path):
    with Repository.open(path) as repo:
        base = det_bytes(40, 200_000)
        a = snap(repo, tmp_path / "d.img", base)
        b = snap(repo, tmp_path / "d.img", base[:100_000] + b"z" * 7 + base[100_007:])
        d = diff_snapshots(repo, a, b)
        assert len(d.ranges) == 1 and d.ranges[0][0] <= 100_000 < sum(d.ranges[0])
        assert d.bytes_changed == d.ranges[0][1] and d.new_chunks >= 1
        assert diff_snapshots(repo, b, b).ranges == []
        shorter = snap(repo, tmp_path / "d.img", base[:150_000])
        last = diff_snapshots(repo, a, shorter).ranges[-1]
        assert last[0] <= 150_000 and last[0] + last[1] == 200_000  # the bytes past the shorter image
