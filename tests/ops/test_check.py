"""check and repair index, in process: each kind of damage gives its finding, naming the right snapshots."""

from __future__ import annotations

import errno
import math
import os
import shutil
import subprocess
from pathlib import Path

import lmdb
import pytest

import dedupimg.repo.index
from dedupimg.core.errors import IntegrityError
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.ops.check import CheckReport, check, choose_packs
from dedupimg.ops.repair import repair_index
from dedupimg.repo import pack
from dedupimg.repo.index import BLOB_VALUE, PackRow
from dedupimg.repo.repository import Repository
from dedupimg.store.base import StoreError
from tests.helpers import det_bytes, restores, small_repo, snap, text_bytes
from tests.packfiles import pack_file, trailer, write_pack


@pytest.fixture
def world(tmp_path: Path):
    """A repository with snapshots that share some data and not other: [(record, image bytes)]."""
    shared = text_bytes(1, 120_000)
    images = {
        "a": det_bytes(10, 150_000) + shared,
        "b": det_bytes(20, 150_000) + shared,
        "c": shared + det_bytes(30, 60_000),
    }
    path = tmp_path / "repo"
    repo = small_repo(path)
    expected = [(snap(repo, tmp_path / f"{name}.img", data, name=None), data) for name, data in images.items()]
    repo.close()
    return path, expected


def names(report: CheckReport, kind: str) -> list[set[str]]:
    return [{s.name for s in f.snapshots} for f in report.findings if f.kind == kind]


def run_check(path: Path, read_data: float = 0.0) -> CheckReport:
    with Repository.open(path) as repo:
        return check(repo, read_data)


def chunk_only_in(path: Path, rec: SnapshotRecord, others: list[SnapshotRecord]) -> tuple[Path, pack.BlobEntry]:
    """A pack file and the trailer entry of a chunk that ``rec`` uses and none of ``others`` does."""
    with Repository.open(path) as repo:
        def chunks(r: SnapshotRecord) -> set[bytes]:
            return {c for sid, _ in r.segments for c in repo.segment(sid).chunk_ids()}

        mine = chunks(rec) - set().union(*(chunks(o) for o in others))
        for row in repo.index.pack_rows():
            path = pack_file(repo, row.id)
            for e in trailer(path):
                if e.type == pack.CHUNK and e.id in mine:
                    return path, e
    raise AssertionError("no such chunk")


def record_pack(path: Path, rec: SnapshotRecord) -> Path:
    """The pack file that holds the record ``rec``."""
    with Repository.open(path) as repo:
        for row in repo.index.pack_rows():
            if any(e.type == pack.SNAPSHOT and e.id == rec.id for e in trailer(pack_file(repo, row.id))):
                return pack_file(repo, row.id)
    raise AssertionError("no such record")


def test_clean_repository(world, tmp_path):
    path, expected = world
    with Repository.open(path) as repo:
        snap(repo, tmp_path / "a.img", det_bytes(10, 150_000) + det_bytes(40, 50_000), name=None)  # shares with a
    report = run_check(path, 1.0)
    assert report.ok, report.findings
    assert report.hints == []
    c = report.counts
    n_packs = len(list((path / "packs").rglob("*.pack")))
    assert (c.snapshots, c.packs, c.packs_read) == (4, n_packs, n_packs)
    assert c.chunks > 300 and c.bytes_read > 450_000 and c.orphan_packs == 0


def test_subset_is_the_rounded_up_share_and_reproducible():
    packs = [PackRow(i, det_bytes(i, 32), 100, 1) for i in range(30)]
    assert len(choose_packs(packs, 0.1, b"s")) == 3  # 0.1 x 30 is 3.0000000000000004 in floating point
    assert len(choose_packs(packs, 0.11, b"s")) == math.ceil(3.3)
    assert len(choose_packs(packs, 0.001, b"s")) == 1
    assert choose_packs(packs, 0.0, b"s") == []
    assert choose_packs(packs, 1.0, b"s") == packs
    assert choose_packs(packs, 0.2, b"s") == choose_packs(packs, 0.2, b"s")
    assert choose_packs(packs, 0.2, b"s") != choose_packs(packs, 0.2, b"t")


def test_flipped_byte_in_a_chunk(world, tmp_path):
    path, expected = world
    (a, da), (b, db), (c, _) = expected
    pack_file, entry = chunk_only_in(path, a, [b, c])
    data = bytearray(pack_file.read_bytes())
    data[entry.data_offset + entry.stored_len // 2] ^= 0x01
    pack_file.write_bytes(bytes(data))

    assert run_check(path).ok  # structure alone cannot see it: the trailer is intact
    report = run_check(path, 1.0)
    assert [f.kind for f in report.findings] == ["blob-damaged"]
    finding = report.findings[0]
    assert pack_file.name in finding.message and entry.id.hex()[:16] in finding.message
    assert [s.id for s in finding.snapshots] == [a.id]
    with Repository.open(path) as repo:
        with pytest.raises(IntegrityError):
            restores(repo, a, da, tmp_path)
        restores(repo, b, db, tmp_path)


def test_truncated_pack(world, tmp_path):
    path, expected = world
    (a, _), (b, db), (c, _) = expected
    pack_file, _ = chunk_only_in(path, a, [b, c])
    os.truncate(pack_file, pack_file.stat().st_size - 200)
    report = run_check(path)
    assert {f.kind for f in report.findings} == {"pack-size", "pack-damaged"}
    for f in report.findings:
        assert pack_file.name in f.message
        assert a.id in {s.id for s in f.snapshots} and b.id not in {s.id for s in f.snapshots}
    with Repository.open(path) as repo:
        restores(repo, b, db, tmp_path)


def test_deleted_pack(world, tmp_path):
    path, expected = world
    (a, _), (b, _), (c, _) = expected
    pack_file, _ = chunk_only_in(path, b, [a, c])
    pack_file.unlink()
    report = run_check(path)
    assert [f.kind for f in report.findings] == ["pack-missing"]
    assert pack_file.name in report.findings[0].message
    assert {s.id for s in report.findings[0].snapshots} == {b.id}


def _lmdb(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path / "index"), max_dbs=12, subdir=True)


def _set_refcount(path: Path, blob_id: bytes, delta: int) -> None:
    env = _lmdb(path)
    blobs = env.open_db(b"blobs")
    with env.begin(write=True) as txn:
        fields = list(BLOB_VALUE.unpack(txn.get(blob_id, db=blobs)))
        fields[-1] += delta
        txn.put(blob_id, BLOB_VALUE.pack(*fields), db=blobs)
    env.close()


def test_wrong_reference_counts_are_reported(world):
    path, expected = world
    (_, _), (b, _), (c, _) = expected
    with Repository.open(path) as repo:
        chunk = repo.segment(c.segments[0][0]).chunk_ids()[0]
    seg = b.segments[0][0]
    _set_refcount(path, chunk, +1)
    _set_refcount(path, seg, -1)
    report = run_check(path)
    kinds = sorted(f.kind for f in report.findings)
    assert kinds == ["dead", "refcount", "refcount"] or kinds == ["refcount", "refcount"]
    messages = " ".join(f.message for f in report.findings)
    assert chunk.hex()[:16] in messages and seg.hex()[:16] in messages
    seg_finding = next(f for f in report.findings if seg.hex()[:16] in f.message and f.kind == "refcount")
    assert b.id in {s.id for s in seg_finding.snapshots}


def test_dead_list_and_missing_rows_are_reported(world):
    path, expected = world
    (a, _), (b, _), (c, _) = expected
    env = _lmdb(path)
    dead, segments, blobs = env.open_db(b"dead"), env.open_db(b"segments"), env.open_db(b"blobs")
    with env.begin(write=True) as txn:
        txn.put(a.segments[0][0], b"", db=dead)  # a live segment marked dead: prune would drop it
        txn.delete(c.segments[-1][0], db=segments)  # a stored segment gone
        txn.delete(b.id, db=blobs)  # b's record row gone: repair could not find it by the index
    env.close()
    report = run_check(path)
    by_kind = {f.kind: f for f in report.findings}
    assert {"dead", "segment-missing", "record-damaged"} <= set(by_kind)
    assert a.id in {s.id for s in by_kind["dead"].snapshots}
    assert c.id in {s.id for s in by_kind["segment-missing"].snapshots}
    assert b.id in {s.id for s in by_kind["record-damaged"].snapshots}


def test_orphan_packs_and_tmp_leftovers_are_hints(world):
    path, _ = world
    raw = det_bytes(99, 5000)
    write_pack(path, [(pack.CHUNK, pack.blob_id(raw), pack.RAW, raw, len(raw))])  # durable but never committed:
    # what a kill after the rename leaves
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, check=True).stdout.decode().strip()
    (path / "tmp" / f"{dead}-0123456789abcdef.tmp").write_bytes(b"partial")
    report = run_check(path, 1.0)
    assert report.ok, report.findings
    assert sorted(h.kind for h in report.hints) == ["orphan-pack", "tmp-leftover"]
    assert report.counts.orphan_packs == 1


def test_damaged_orphan_pack_is_an_error(world):
    path, _ = world
    (path / "packs" / "ab" / ("ab" * 32 + ".pack")).write_bytes(b"not a pack at all" * 10)
    report = run_check(path)
    assert [f.kind for f in report.findings] == ["pack-damaged"]


# -- repair index ---------------------------------------------------------------------------------------------


def index_content(path: Path) -> tuple[object, ...]:
    """The index without pack numbers: what must come out of a rebuild unchanged."""
    with Repository.open(path) as repo:
        ix = repo.index
        rows = {i: (loc.type, loc.codec, loc.stored_len, loc.raw_len, loc.refcount) for i, loc in ix.iter_blob_rows()}
        dead = {i for i, _ in ix.dead_rows()}
        return rows, dead, dict(ix.iter_segments()), dict(ix.snapshots()), len(ix.pack_rows())


def test_repair_of_an_intact_index_changes_nothing_but_pack_numbers(world):
    path, _ = world
    before = index_content(path)
    report = repair_index(path)
    assert (report.snapshots, report.damaged_packs, report.left_out) == (3, [], [])
    assert index_content(path) == before
    assert run_check(path, 1.0).ok
    assert os.listdir(path / "tmp") == []


def test_repair_after_the_lmdb_files_are_deleted(world, tmp_path):
    path, expected = world
    for f in (path / "index").iterdir():
        f.unlink()
    with pytest.raises(IntegrityError, match="repair index"):
        Repository.open(path)
    report = repair_index(path)
    assert report.snapshots == 3
    assert run_check(path, 1.0).ok
    with Repository.open(path) as repo:
        for rec, data in expected:
            restores(repo, rec, data, tmp_path)


def test_repair_reruns_after_being_killed_at_any_step(world, tmp_path):
    path, expected = world
    # The state of a kill between moving the old index aside and renaming the new one in, with a partial
    # rebuild of an even earlier run: index/ is gone, and every command says to run repair.
    os.rename(path / "index", path / "tmp" / "index-old-4242")
    shutil.copytree(path / "tmp" / "index-old-4242", path / "tmp" / "index-rebuild-4241")
    with pytest.raises(IntegrityError, match="repair index"):
        Repository.open(path)
    report = repair_index(path)
    assert sorted(report.leftovers_removed) == ["index-old-4242", "index-rebuild-4241"]
    assert os.listdir(path / "tmp") == []
    report_after = run_check(path, 1.0)
    assert report_after.ok and report_after.hints == []
    with Repository.open(path) as repo:
        assert {r.id for r in repo.snapshots()} == {r.id for r, _ in expected}


def test_repair_skips_a_damaged_pack_and_leaves_out_what_needs_it(world, tmp_path):
    path, expected = world
    (a, _), (b, db), (c, dc) = expected
    pack_file, _ = chunk_only_in(path, a, [b, c])
    os.truncate(pack_file, 100)
    report = repair_index(path)
    assert [n for n, _ in report.damaged_packs] == [pack_file.name]
    assert [r.id for r in report.left_out] == [a.id]
    with Repository.open(path) as repo:
        assert {r.id for r in repo.snapshots()} == {b.id, c.id}
        restores(repo, b, db, tmp_path)
        restores(repo, c, dc, tmp_path)
    after = run_check(path)
    kinds = sorted(f.kind for f in after.findings)
    assert kinds == ["pack-damaged", "record-unlisted"]  # the damage stays visible, naming the lost snapshot
    assert next(f for f in after.findings if f.kind == "record-unlisted").snapshots[0].id == a.id


@pytest.mark.parametrize("failing_read", [0, 3], ids=["trailer", "manifest"])
def test_repair_stops_on_a_pack_it_cannot_read_and_changes_nothing(world, tmp_path, monkeypatch, failing_read):
    """An I/O error is not damage: a pack that could not be read may be intact. Skipping it would leave out its
    snapshots, and the next prune would delete the rest of them (a review found this); repair stops instead,
    one line naming the pack, with the old index in place. ``failing_read``: which pread of that pack fails
    (the footer and trailer are the first three; a snapshot's own pack holds its segments and record)."""
    from dedupimg.store.local import LocalStore

    path, expected = world
    (a, da), (b, _), (c, _) = expected
    before = index_content(path)
    victim = (record_pack(path, a) if failing_read else chunk_only_in(path, a, [b, c])[0]).name
    opened = LocalStore.open
    reads = iter(range(1 << 30))  # of the victim, over all its openings

    def open_failing(self: LocalStore, name: str, where: str | None = None):
        reader = opened(self, name, where)
        if name.endswith(victim):
            real = reader.pread

            def pread(length: int, offset: int) -> bytes:
                if next(reads) == failing_read:
                    raise OSError(errno.EIO, "Input/output error")
                return real(length, offset)

            reader.pread = pread
        return reader

    monkeypatch.setattr(LocalStore, "open", open_failing)
    with pytest.raises(StoreError, match=rf"{victim}: cannot read .*Input/output error; repair index stopped "
                                         "and changed nothing"):
        repair_index(path)
    monkeypatch.undo()
    assert index_content(path) == before
    assert os.listdir(path / "tmp") == []
    assert run_check(path, 1.0).ok
    with Repository.open(path) as repo:
        restores(repo, a, da, tmp_path)


def test_forgotten_snapshot_does_not_come_back_after_repair(world, tmp_path):
    from dedupimg.ops.forget import forget_snapshots

    path, expected = world
    (a, _), (b, _), (c, dc) = expected
    with Repository.open(path) as repo:
        forget_snapshots(repo, [b])
    assert run_check(path).ok
    for f in (path / "index").iterdir():
        f.unlink()
    report = repair_index(path)
    assert (report.snapshots, report.forgotten) == (2, 1)
    after = run_check(path, 1.0)
    assert after.ok, after.findings
    with Repository.open(path) as repo:
        assert {r.id for r in repo.snapshots()} == {a.id, c.id}
        restores(repo, c, dc, tmp_path)


@pytest.mark.slow
def test_a_full_lmdb_map_grows(tmp_path, monkeypatch):
    initial = 1 << 18
    monkeypatch.setattr(dedupimg.repo.index, "INITIAL_MAP", initial)
    path = tmp_path / "repo"
    repo = small_repo(path)  # 1 KiB chunks, 64 KiB packs: many rows and transactions per megabyte
    data = det_bytes(5, 6 << 20)
    rec = snap(repo, tmp_path / "many.img", data, name=None)
    repo.close()
    assert (path / "index" / "data.mdb").stat().st_size > initial  # the file cannot outgrow the map: it grew
    report = run_check(path, 1.0)
    assert report.ok, report.findings
    assert report.counts.chunks > 4000
    with Repository.open(path) as repo:
        restores(repo, rec, data, tmp_path)
    # A rebuild starts from the small map as well.
    assert repair_index(path).snapshots == 1
    assert run_check(path).ok
