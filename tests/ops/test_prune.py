"""forget and prune in process: what dies, what is freed, what survives bit-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedupimg.ops.forget import forget_snapshots, plan_ids
from dedupimg.ops.prune import prune
from dedupimg.repo import pack
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes, restores, small_repo, snap, text_bytes
from tests.packfiles import pack_files as pack_files_of
from tests.packfiles import trailer, write_pack


def pack_files(repo: Repository) -> set[Path]:
    return set(pack_files_of(repo))


def live_ids(repo: Repository) -> set[bytes]:
    """Every blob id the remaining snapshots need: records, segments, chunks."""
    out: set[bytes] = set()
    for rec in repo.snapshots():
        out.add(rec.id)
        for sid, _ in rec.segments:
            out.add(sid)
            out.update(i for i in repo.segment(sid).ids if i is not None)
    return out


def dead_packs(repo: Repository) -> set[Path]:
    """Pack files that hold no live blob and no tombstone (computed from the packs themselves)."""
    live = live_ids(repo)
    return {
        p for p in pack_files(repo)
        if not any(e.id in live or e.type == pack.TOMBSTONE for e in trailer(p))
    }


def test_prune_after_forget_frees_exactly_the_dead_packs(repo, tmp_path):
    shared = text_bytes(1, 200_000)
    a = snap(repo, tmp_path / "a.img", shared + det_bytes(2, 300_000))
    b_data = shared + det_bytes(3, 300_000)
    b = snap(repo, tmp_path / "b.img", b_data)
    forget_snapshots(repo, [a])
    expected_gone = dead_packs(repo)
    assert expected_gone  # a's own chunks filled packs of their own
    before = pack_files(repo)
    report = prune(repo, max_unused=1.0)  # delete only: no rewrite
    assert report.outcome is not None and report.packs_to_rewrite == 0
    assert before - pack_files(repo) == expected_gone
    assert report.outcome.packs_deleted == len(expected_gone)
    assert report.records_dropped == 1 and report.chunks_dropped > 0
    assert restores(repo, b, b_data, tmp_path)
    again = prune(repo, max_unused=1.0)
    assert again.packs_to_delete == again.packs_to_rewrite == again.chunks_dropped == 0


def test_freed_bytes_are_the_deleted_files(repo, tmp_path):
    a = snap(repo, tmp_path / "a.img", det_bytes(5, 400_000))
    snap(repo, tmp_path / "b.img", det_bytes(6, 400_000))
    forget_snapshots(repo, [a])
    gone = dead_packs(repo)
    sizes = sum(p.stat().st_size for p in gone)
    report = prune(repo, max_unused=1.0)
    assert report.outcome is not None and report.outcome.bytes_freed == sizes


def test_rewrite_keeps_live_blobs_of_mixed_packs(repo, tmp_path):
    # Two images interleaved in one snapshot stream cannot share packs; instead make one image whose halves
    # die separately: v1 = x + y, v2 = x + z. Forgetting v1 kills y, whose chunks share packs with x's.
    x, y, z = text_bytes(7, 150_000), det_bytes(8, 150_000), det_bytes(9, 150_000)
    v1 = snap(repo, tmp_path / "v1.img", x + y)
    v2 = snap(repo, tmp_path / "v2.img", x + z)
    forget_snapshots(repo, [v1])
    before = pack_files(repo)
    report = prune(repo, max_unused=0.0)
    assert report.outcome is not None
    assert report.packs_to_rewrite > 0 and report.outcome.packs_written > 0
    assert pack_files(repo) != before
    assert restores(repo, v2, x + z, tmp_path)
    assert not dead_packs(repo)
    assert prune(repo, max_unused=0.0).packs_to_rewrite == 0  # nothing left to rewrite


def test_dry_run_changes_nothing(repo, tmp_path):
    a = snap(repo, tmp_path / "a.img", det_bytes(10, 300_000))
    snap(repo, tmp_path / "b.img", det_bytes(11, 300_000))
    forget_snapshots(repo, [a])
    (repo.path / "tmp" / "123-deadbeefdeadbeef.tmp").write_bytes(b"x" * 1000)
    files = {p: p.stat().st_size for p in repo.path.rglob("*") if p.is_file() and p.parent.name != "index"}
    report = prune(repo, dry_run=True)
    assert report.outcome is None and report.packs_to_delete > 0 and report.tmp_files == 1
    assert report.bytes_to_free > 0
    assert {p: p.stat().st_size for p in repo.path.rglob("*") if p.is_file() and p.parent.name != "index"} == files


def test_interrupted_snapshot_leftovers_are_collected(repo, tmp_path):
    keep_data = det_bytes(12, 200_000)
    keep = snap(repo, tmp_path / "keep.img", keep_data)
    # An interrupted snapshot: chunks and a segment committed, no record.
    writer = repo.writer()
    for i in range(40):
        chunk = det_bytes(100 + i, 3000)
        writer.add_chunk(pack.blob_id(chunk), chunk)
    writer.flush()
    (repo.path / "tmp" / "999-0011223344556677.tmp").write_bytes(b"partial pack")
    report = prune(repo, max_unused=1.0)
    assert report.chunks_dropped == 40 and report.tmp_files == 1
    assert not list((repo.path / "tmp").glob("*.tmp"))
    assert not dead_packs(repo)
    assert restores(repo, keep, keep_data, tmp_path)


def test_forgotten_data_snapshotted_again_before_prune_survives(repo, tmp_path):
    data = text_bytes(13, 100_000) + det_bytes(14, 200_000)
    first = snap(repo, tmp_path / "a.img", data)
    forget_snapshots(repo, [first])
    again = snap(repo, tmp_path / "a.img", data)  # reuses the dead chunks and segments: they come back to life
    report = prune(repo, max_unused=0.0)
    assert report.chunks_dropped == 0 and report.segments_dropped == 0
    assert restores(repo, again, data, tmp_path)


def test_forgotten_data_snapshotted_again_after_prune_is_stored_anew(repo, tmp_path):
    data = det_bytes(15, 250_000)
    first = snap(repo, tmp_path / "a.img", data)
    forget_snapshots(repo, [first])
    prune(repo, max_unused=0.0)
    assert not repo.snapshots()
    again = snap(repo, tmp_path / "a.img", data)
    assert restores(repo, again, data, tmp_path)


def test_orphan_packs_are_deleted(repo, tmp_path):
    keep_data = det_bytes(16, 100_000)
    keep = snap(repo, tmp_path / "a.img", keep_data)
    # Durable but never committed: a crash's leftover.
    _pid, orphan, _size = write_pack(repo.path, [(pack.CHUNK, pack.blob_id(b"orphan"), pack.RAW, b"orphan", 6)])
    report = prune(repo)
    assert report.orphan_packs == 1 and not orphan.exists()
    assert restores(repo, keep, keep_data, tmp_path)


def test_forget_by_id_plan_names_only_those(repo, tmp_path):
    recs = [snap(repo, tmp_path / "a.img", det_bytes(20 + i, 50_000)) for i in range(3)]
    plan = plan_ids(repo, [recs[1].short_id])
    assert [r.id for r in plan.remove] == [recs[1].id]
    assert {r.id for r in plan.keep} == {recs[0].id, recs[2].id}


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["snap", "forget", "prune"]), st.integers(0, 7)), min_size=3, max_size=10))
def test_any_sequence_of_snapshots_forgets_and_prunes_keeps_the_rest_bit_exact(tmp_path_factory, ops):
    tmp = tmp_path_factory.mktemp("seq")
    repo = small_repo(tmp / "repo")
    base = bytearray(text_bytes(30, 60_000) + det_bytes(31, 60_000))
    images: dict[bytes, bytes] = {}
    try:
        for step, (op, k) in enumerate(ops):
            if op == "snap":
                base[k * 10_000 : k * 10_000 + 5_000] = det_bytes(1000 + step, 5_000)
                rec = snap(repo, tmp / "img", bytes(base))
                images[rec.id] = bytes(base)
            elif op == "forget" and images:
                victim = sorted(images)[k % len(images)]
                forget_snapshots(repo, [r for r in repo.snapshots() if r.id == victim])
                del images[victim]
            elif op == "prune":
                prune(repo, max_unused=(k % 3) / 4)
        prune(repo, max_unused=0.0)
        assert {r.id for r in repo.snapshots()} == set(images)
        for rec in repo.snapshots():
            assert restores(repo, rec, images[rec.id], tmp)
        assert not dead_packs(repo)
    finally:
        repo.close()


@pytest.mark.parametrize("max_unused", [0.0, 0.05, 1.0])
def test_prune_of_a_clean_repository_is_a_no_op(repo, tmp_path, max_unused):
    snap(repo, tmp_path / "a.img", det_bytes(40, 200_000))
    before = pack_files(repo)
    report = prune(repo, max_unused=max_unused)
    assert report.outcome is not None and report.outcome.bytes_freed == 0
    assert pack_files(repo) == before
