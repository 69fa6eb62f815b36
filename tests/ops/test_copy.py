"""Copying snapshots between repositories in the library (ops/copy.py), local to local: ids kept, only the chunks
the destination lacks sent, re-copies skipped, the destination whole (restore bit-exact, audit clean)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from dedupimg.core import interrupts
from dedupimg.core.errors import SnapshotNotFound, UsageError
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.ops import copy as copy_mod
from dedupimg.ops.copy import ALREADY_THERE, FORGOTTEN_THERE, copy_snapshots, open_source, repository_config
from dedupimg.ops.prune import prune
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes, restores, small_repo, snap

V1 = det_bytes(1, 300_000) + bytes(100_000) + det_bytes(2, 200_000)


def changed(data: bytes, at: int, seed: int, n: int = 3000) -> bytes:
    out = bytearray(data)
    out[at : at + n] = det_bytes(seed, n)
    return bytes(out)


@pytest.fixture
def src(tmp_path: Path):
    r = small_repo(tmp_path / "src")
    yield r
    r.close()


@pytest.fixture
def dst(tmp_path: Path):
    r = small_repo(tmp_path / "dst")
    yield r
    r.close()


def audit_clean(repo: Repository) -> None:
    report = repo.audit(read_data=1.0)
    assert report.ok, report.findings


def test_copy_all_keeps_ids_sends_each_chunk_once_and_restores(src, dst, tmp_path):
    v2 = changed(V1, 50_000, 3)
    other = det_bytes(4, 250_000)
    recs = [snap(src, tmp_path / "a.img", V1), snap(src, tmp_path / "a.img", v2),
            snap(src, tmp_path / "b.img", other, name="other")]
    result = copy_snapshots(src, dst, None)
    assert sorted(result.copied) == sorted(r.id for r in recs) and result.skipped == []
    assert sorted(r.id for r in dst.snapshots()) == sorted(r.id for r in recs)
    stats = src.stats()
    assert result.chunks == stats.chunks  # every distinct chunk once, however many snapshots share it
    assert result.bytes_copied == stats.unique_bytes
    assert result.bytes_uploaded == sum(s.bytes_uploaded for s in result.snapshots) > 0
    assert dst.stats().chunks == stats.chunks
    for rec, data in zip(recs, (V1, v2, other), strict=True):
        assert restores(dst, dst.resolve(rec.hex_id), data, tmp_path)
    audit_clean(dst)


def test_copy_again_skips_everything_and_uploads_nothing(src, dst, tmp_path):
    rec = snap(src, tmp_path / "a.img", V1)
    first = copy_snapshots(src, dst, None)
    assert first.copied == [rec.id]
    packs = dst.stats().packs
    again = copy_snapshots(src, dst, None)
    assert again.copied == [] and again.skipped == [rec.id]
    assert again.snapshots[0].skipped == ALREADY_THERE
    assert (again.chunks, again.bytes_copied, again.bytes_uploaded) == (0, 0, 0)
    assert dst.stats().packs == packs
    audit_clean(dst)


def test_copy_named_snapshots_only(src, dst, tmp_path):
    a1 = snap(src, tmp_path / "a.img", V1)
    a2 = snap(src, tmp_path / "a.img", changed(V1, 0, 5))
    b = snap(src, tmp_path / "b.img", det_bytes(6, 100_000), name="other")
    result = copy_snapshots(src, dst, ["other@latest"])
    assert result.copied == [b.id]
    assert [r.id for r in dst.snapshots()] == [b.id]
    # an id prefix and 'disk@latest' naming the same snapshot copy it once; the skipped one is reported
    result = copy_snapshots(src, dst, [a1.hex_id[:10], b.hex_id, "disk@latest", a2.hex_id])
    assert result.copied == [a1.id, a2.id] and result.skipped == [b.id]
    assert restores(dst, dst.resolve(a1.hex_id), V1, tmp_path)
    audit_clean(dst)


def test_later_version_sends_only_its_changed_chunks(src, dst, tmp_path):
    snap(src, tmp_path / "a.img", V1)
    copy_snapshots(src, dst, None)
    v2 = changed(changed(V1, 10_000, 7), 420_000, 8)
    taken = take_snapshot(src, str(_write(tmp_path / "a.img", v2)), name="disk")
    assert 0 < taken.chunks_new < 20
    result = copy_snapshots(src, dst, None)
    assert [s.copied for s in result.snapshots] == [False, True]
    copied = result.snapshots[1]
    assert copied.record.id == taken.record.id
    # exactly the chunks v1 lacked: the destination held all of v1's
    assert (copied.chunks, copied.bytes_copied) == (taken.chunks_new, taken.bytes_new)
    assert copied.bytes_uploaded < 64 << 10  # a small pack, not the image
    assert restores(dst, dst.resolve(taken.record.hex_id), v2, tmp_path)
    audit_clean(dst)


def test_other_chunker_parameters_still_copy_whole(src, tmp_path):
    with Repository.init(tmp_path / "big", pack_size=1 << 16) as dst:  # 16 KiB chunks against 1 KiB
        rec = snap(src, tmp_path / "a.img", V1)
        own = snap(dst, tmp_path / "a.img", V1)
        ids = chunk_ids(src, rec)
        lacking = len(ids) - sum(dst.index.has_blobs(list(ids)))
        assert lacking > len(ids) * 0.9  # few or no chunks in common
        result = copy_snapshots(src, dst, None)
        assert result.copied == [rec.id] and result.chunks == lacking
        assert restores(dst, dst.resolve(rec.hex_id), V1, tmp_path)
        assert restores(dst, own, V1, tmp_path)
        audit_clean(dst)
    assert repository_config(str(tmp_path / "src"))[0].chunker == src.config.chunker


def test_small_batches(src, dst, tmp_path, monkeypatch):
    # Many batches of chunks and of waiting segments: every segment still lands after its chunks, whole.
    monkeypatch.setattr(copy_mod, "BATCH_BYTES", 4096)
    monkeypatch.setattr(copy_mod, "BATCH_SEGMENTS", 2)
    gap = bytes(1_100_000)  # a zero run of 1 MiB or more ends a segment
    data = gap.join(det_bytes(seed, 100_000) for seed in range(10, 15)) + V1
    rec = snap(src, tmp_path / "a.img", data)
    assert len(rec.segments) >= 5
    result = copy_snapshots(src, dst, [rec.hex_id])
    assert result.chunks == src.stats().chunks
    assert restores(dst, dst.resolve(rec.hex_id), data, tmp_path)
    audit_clean(dst)


def test_refused_and_unknown(src, dst, tmp_path):
    rec = snap(src, tmp_path / "a.img", V1)
    with pytest.raises(UsageError, match="same repository"):
        copy_snapshots(src, src, None)
    with pytest.raises(UsageError, match="same repository"):  # before opening it a second time
        open_source(str(tmp_path / "src"), src)
    with pytest.raises(SnapshotNotFound):
        copy_snapshots(src, dst, [rec.hex_id, "ffffffff"])  # every reference resolved before any copy
    assert dst.snapshots() == []
    assert copy_snapshots(src, dst, None).copied == [rec.id]
    # forgotten in the destination: its tombstone keeps it out, so the copy says so instead of failing
    dst.forget([dst.resolve(rec.hex_id)])
    again = copy_snapshots(src, dst, None)
    assert again.copied == [] and again.snapshots[0].skipped == FORGOTTEN_THERE
    audit_clean(dst)
    # Also once a prune there dropped the record's row (found by review: the copy listed it again, a repair
    # or another host's sync took it out, and the next prune freed its data): the tombstone still counts.
    prune(dst)
    third = copy_snapshots(src, dst, None)
    assert third.copied == [] and third.snapshots[0].skipped == FORGOTTEN_THERE and dst.snapshots() == []
    audit_clean(dst)


def test_a_snapshot_forgotten_and_pruned_is_not_stored_again(src, tmp_path):
    """The same image, name and --time as a forgotten snapshot make the same record: refused, as before the
    prune dropped its row (a tombstone names it: listed again, it would vanish at the next repair)."""
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    (tmp_path / "a.img").write_bytes(V1)
    rec = take_snapshot(src, str(tmp_path / "a.img"), name="a", when=when).record
    src.forget([rec])
    prune(src)
    with pytest.raises(UsageError, match="taken and forgotten before"):
        take_snapshot(src, str(tmp_path / "a.img"), name="a", when=when)
    assert src.snapshots() == []
    audit_clean(src)


def test_an_interrupt_may_stop_the_next_snapshot(src, dst, tmp_path, monkeypatch):
    # A committed copy marks the process past its commit (a signal then passes); the next copy is new work.
    snap(src, tmp_path / "a.img", V1)
    snap(src, tmp_path / "a.img", changed(V1, 0, 9))
    seen = []
    real = copy_mod._copy_one

    def spy(*args):
        seen.append(interrupts.past_commit())
        return real(*args)

    monkeypatch.setattr(copy_mod, "_copy_one", spy)
    try:
        assert len(copy_snapshots(src, dst, None).copied) == 2
        assert seen == [False, False] and interrupts.past_commit()
    finally:
        interrupts.reset()


def chunk_ids(repo: Repository, rec: SnapshotRecord) -> set[bytes]:
    return {i for sid, _ in rec.segments for i in repo.segment(sid).chunk_ids()}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_two_machines_disks_under_one_name_are_not_merged(src, dst, tmp_path, monkeypatch):
    """Found by review: host b's disk.img copied into a repository holding host a's disk.img made one series,
    and forget --keep-daily then removed host a's snapshots as older versions of host b's. Refused before
    anything is copied; a name the two hosts already share in the source is copied as it is."""
    import dedupimg.ops.snapshot as snapshot_mod

    (tmp_path / "disk.img").write_bytes(V1)
    monkeypatch.setattr(snapshot_mod.socket, "gethostname", lambda: "host-a")
    mine = take_snapshot(dst, str(tmp_path / "disk.img")).record  # the destination's own series
    monkeypatch.setattr(snapshot_mod.socket, "gethostname", lambda: "host-b")
    theirs = take_snapshot(src, str(tmp_path / "disk.img")).record
    assert mine.name == theirs.name == "disk.img"
    with pytest.raises(UsageError, match="name 'disk.img' already belongs to snapshots of .* on host host-a"):
        copy_snapshots(src, dst, None)
    assert dst.snapshots() == [mine]
    monkeypatch.setattr(snapshot_mod.socket, "gethostname", lambda: "host-a")
    take_snapshot(src, str(tmp_path / "disk.img"), name="disk.img", when=mine.datetime.replace(year=2027))
    assert copy_snapshots(src, dst, [theirs.hex_id]).copied == [theirs.id]  # shared in the source already
