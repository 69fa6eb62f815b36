"""Format 3: a changed chunk stored as a delta on the parent version's chunk (codec DELTA, docs/format.md §11).

What must hold: a later version with scattered small writes stores a fraction of what whole chunks cost; every
reader (restore through the read pool, the serving reader, check --read-data, copy, prune's rewrite) gets the
exact bytes; a base outlives the snapshots that listed it while a delta on it lives, and goes once none does;
repair rebuilds the links from the pack trailers; a repository of formats 1 and 2 never gets a delta.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dedupimg.core.config import ChunkerParams
from dedupimg.core.errors import IntegrityError
from dedupimg.ops.check import check
from dedupimg.ops.copy import copy_snapshots
from dedupimg.ops.forget import execute, plan_ids
from dedupimg.ops.prune import prune
from dedupimg.ops.restore import restore
from dedupimg.ops.snapshot import SnapshotResult, take_snapshot
from dedupimg.ops.stats import snapshot_stats
from dedupimg.repo import pack
from dedupimg.repo.repository import Repository
from dedupimg.serve.reader import SnapshotReader
from tests.helpers import det_bytes, restores, small_repo, text_bytes

SIZE = 2 << 20


def versions(n: int = 3) -> list[bytes]:
    """An image and its next versions, each with 40 scattered writes of 16 bytes (the nightly pattern)."""
    data = bytearray(text_bytes(1, SIZE // 2) + det_bytes(2, SIZE // 2))
    out = [bytes(data)]
    for v in range(1, n):
        for k in range(40):
            pos = (k * 48_271 + v * 7_919) * 13 % (SIZE - 16)
            data[pos : pos + 16] = det_bytes(100 * v + k, 16)
        out.append(bytes(data))
    return out


def take(repo: Repository, tmp: Path, data: bytes, name: str = "disk", hour: int = 0) -> SnapshotResult:
    path = tmp / "source.img"
    path.write_bytes(data)
    when = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=hour)
    return take_snapshot(repo, str(path), name=name, when=when)


def stored_blobs(repo: Repository) -> list[pack.BlobEntry]:
    """Every blob of every pack, from the pack trailers."""
    out = []
    for obj in pack.list_packs(repo.store):
        with repo.store.open(obj.name) as reader:
            out += pack.read_trailer(reader, repo.blobs)
    return out


def pack_bytes(repo_path: Path) -> int:
    """The bytes of a local repository's pack files."""
    return sum(os.path.getsize(p) for p in (repo_path / "packs").rglob("*.pack"))


def deltas_in(repo: Repository) -> list[pack.BlobEntry]:
    return [e for e in stored_blobs(repo) if e.codec == pack.DELTA]


@pytest.fixture(params=["plain", "encrypted"])
def encrypted(request: pytest.FixtureRequest) -> bool:
    return request.param == "encrypted"


def test_a_later_version_stores_its_changed_chunks_as_deltas(tmp_path: Path, encrypted: bool) -> None:
    images = versions()
    whole = Repository.init(tmp_path / "v1", ChunkerParams.for_average(4096), pack_size=1 << 16,
                            encryption="aes-256-gcm" if encrypted else "none", deltas=False)
    with Repository.init(tmp_path / "v3", ChunkerParams.for_average(4096), pack_size=1 << 16,
                         encryption="aes-256-gcm" if encrypted else "none") as repo, whole:
        assert repo.config.version == (4 if encrypted else 3) and whole.config.version == (2 if encrypted else 1)
        results = [take(repo, tmp_path, img, hour=h) for h, img in enumerate(images)]
        plain = [take(whole, tmp_path, img, hour=h) for h, img in enumerate(images)]
        # A first version has no base: about the same bytes (encrypted: keyed cut points differ per repository).
        assert results[0].bytes_stored == pytest.approx(plain[0].bytes_stored, rel=0.05)
        for later, before in zip(results[1:], plain[1:], strict=True):
            # about as many chunks are new (encrypted: keyed cut points, another key per repository) ...
            assert abs(later.chunks_new - before.chunks_new) <= before.chunks_new // 4
            assert later.bytes_stored < 0.5 * before.bytes_stored  # ... and cost less than half
        assert len(deltas_in(repo)) >= 40 and not deltas_in(whole)
        for res, img in zip(results, images, strict=True):
            assert restores(repo, res.record, img, tmp_path)
        assert check(repo, read_data=1.0).ok


def test_every_reader_gets_the_exact_bytes(tmp_path: Path) -> None:
    images = versions()
    with small_repo(tmp_path / "repo", avg=4096) as repo:
        recs = [take(repo, tmp_path, img, hour=h).record for h, img in enumerate(images)]
        assert deltas_in(repo)
        # The serving reader (mount, NBD), with its read pool and without it.
        for pool in (True, False):
            if pool:
                repo.start_read_pool()
            reader = SnapshotReader(repo, recs[-1])
            for off in range(0, SIZE, 300_007):
                assert reader.read(off, 70_000) == images[-1][off : off + 70_000]
    # copy into another repository: deltas there too (on the destination's copy of the version before), and
    # into one of format 1 whole chunks; the same images from both.
    src = Repository.open(tmp_path / "repo")
    dst = Repository.init(tmp_path / "copy", ChunkerParams.for_average(4096), pack_size=1 << 16)
    old = Repository.init(tmp_path / "v1", ChunkerParams.for_average(4096), pack_size=1 << 16, deltas=False)
    with src, dst, old:
        copy_snapshots(src, dst, None)
        copy_snapshots(src, old, None)
        assert deltas_in(dst) and not deltas_in(old)
        assert pack_bytes(tmp_path / "copy") < 1.1 * pack_bytes(tmp_path / "repo") < pack_bytes(tmp_path / "v1")
        for repo_there in (dst, old):
            for rec, img in zip(recs, images, strict=True):
                assert restores(repo_there, rec, img, tmp_path)
            assert check(repo_there, read_data=1.0).ok


def test_a_base_outlives_its_snapshots_while_a_delta_on_it_lives(tmp_path: Path, encrypted: bool) -> None:
    images = versions()
    with small_repo(tmp_path / "repo", avg=4096, encrypted=encrypted) as repo:
        recs = [take(repo, tmp_path, img, hour=h).record for h, img in enumerate(images)]
        before = pack_bytes(tmp_path / "repo")
        # Forget the first two versions: the third's deltas name chunks only they listed.
        execute(repo, plan_ids(repo, [recs[0].hex_id, recs[1].hex_id]))
        prune(repo, max_unused=0.0)  # rewrite every pack with anything dead: moves bases and deltas
        assert restores(repo, recs[2], images[2], tmp_path)
        report = check(repo, read_data=1.0)
        assert report.ok, report.findings
        assert deltas_in(repo)
        # Forget the last one: its deltas go, and with them the bases they held.
        execute(repo, plan_ids(repo, [recs[2].hex_id]))
        prune(repo, max_unused=0.0)
        after = pack_bytes(tmp_path / "repo")
        assert not [e for e in stored_blobs(repo) if e.type == pack.CHUNK]
        assert after < before / 50
        assert check(repo, read_data=1.0).ok


def test_repair_index_rebuilds_the_links_from_the_trailers(tmp_path: Path) -> None:
    images = versions()
    with small_repo(tmp_path / "repo", avg=4096) as repo:
        recs = [take(repo, tmp_path, img, hour=h).record for h, img in enumerate(images)]
        assert deltas_in(repo)
    shutil.rmtree(tmp_path / "repo" / "index")
    report = Repository.rebuild_index(tmp_path / "repo")
    assert report.snapshots == 3 and not report.left_out and not report.damaged_blobs
    with Repository.open(tmp_path / "repo") as repo:
        assert check(repo, read_data=1.0).ok
        for rec, img in zip(recs, images, strict=True):
            assert restores(repo, rec, img, tmp_path)
        # and prune after the repair still keeps the bases the last version needs
        execute(repo, plan_ids(repo, [recs[0].hex_id, recs[1].hex_id]))
        prune(repo, max_unused=0.0)
        assert restores(repo, recs[2], images[2], tmp_path)
        assert check(repo, read_data=1.0).ok


def test_a_lost_base_fails_the_read_and_check_never_gives_wrong_bytes(tmp_path: Path) -> None:
    images = versions(2)
    with small_repo(tmp_path / "repo", avg=4096) as repo:
        recs = [take(repo, tmp_path, img, hour=h).record for h, img in enumerate(images)]
        delta = deltas_in(repo)[0]
        base = repo.delta_bases([delta.id])[0]
        assert base is not None
        # Damage the base where it is stored: one flipped byte in its stored bytes.
        where = repo.index.lookup_blobs([base])[0]
        assert where is not None
        path = tmp_path / "repo" / pack.pack_name(repo.index.pack_id(where.pack_no))
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.seek(where.offset + pack.BLOB_HEADER.size + where.stored_len // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(IntegrityError):
            restore(repo, recs[1].hex_id, str(tmp_path / "out.img"), force=True)
        assert not (tmp_path / "out.img").exists()
        report = check(repo, read_data=1.0)
        assert not report.ok
        assert any(delta.id.hex()[:16] in f.message and "base" in f.message for f in report.findings)
        # Only the deltas on that base are blamed (found by review: one damaged base made check report every
        # delta of the pack that read its bases together).
        all_deltas = deltas_in(repo)
        on_it = {d.id for d, b in zip(all_deltas, repo.delta_bases([d.id for d in all_deltas]), strict=True)
                 if b == base}
        blamed = {d.id for d in all_deltas if any(d.id.hex()[:16] in f.message for f in report.findings)}
        assert blamed and blamed <= on_it, (len(blamed), len(on_it))


def test_pack_trailer_rows_of_deltas_name_their_base() -> None:
    base, delta = b"\x01" * 32, b"\x02" * 32
    row = pack.trailer_row(pack.BlobEntry(pack.CHUNK, pack.DELTA, 8, 100, 20, delta, base))
    assert row == [pack.CHUNK, pack.DELTA, 8, 100, 20, delta, base]
    assert pack.parse_row(row, 1000) == pack.BlobEntry(pack.CHUNK, pack.DELTA, 8, 100, 20, delta, base)
    for bad in (row[:6], [*row[:1], pack.ZSTD, *row[2:]], [pack.SEGMENT, *row[1:]], [*row[:6], delta],
                [*row[:6], b"\x01" * 31]):
        with pytest.raises(ValueError):
            pack.parse_row(bad, 1000)
    assert pack.trailer_row(pack.BlobEntry(pack.CHUNK, pack.ZSTD, 8, 100, 20, delta)) == \
        [pack.CHUNK, pack.ZSTD, 8, 100, 20, delta]


def test_stats_says_what_forgetting_frees_bases_included(tmp_path: Path) -> None:
    """stats' "freed" follows prune's cascade: a dying delta takes its reference from its base. Every version
    rewrites the same places, so each one's changed chunks are deltas on the first version's chunks there,
    which, once the first version is forgotten, live only as bases: forgetting the last version frees them."""
    data = bytearray(det_bytes(7, SIZE))
    images = []
    for v in range(4):
        for k in range(40):
            pos = k * 48_271 % (SIZE - 16)
            data[pos : pos + 16] = det_bytes(1000 * v + k, 16)
        images.append(bytes(data))
    with small_repo(tmp_path / "repo", avg=4096) as repo:
        recs = [take(repo, tmp_path, img, hour=h).record for h, img in enumerate(images)]
        for victim in recs:
            expected = snapshot_stats(repo, [victim]).snapshots[0].freed
            before = pack_bytes(tmp_path / "repo")
            execute(repo, plan_ids(repo, [victim.hex_id]))
            prune(repo, max_unused=0.0)
            after = pack_bytes(tmp_path / "repo")
            # Pack bytes also hold a trailer row per blob (~48 bytes, as much as a small delta), footers, and the
            # tombstone forget adds. Without the base cascade the last one is 13% short.
            assert expected * 0.97 - 4096 <= before - after <= expected * 1.03 + 4096, (expected, before - after)
            if victim is not recs[-1]:
                assert restores(repo, recs[-1], images[-1], tmp_path)
                assert check(repo, read_data=1.0).ok


def _patched(buf: bytes, pos: int, new: bytes) -> bytes:
    return buf[:pos] + new + buf[pos + len(new) :]


@pytest.mark.parametrize("seed", range(1, 7))
def test_repair_takes_the_delta_copy_whose_base_is_there(tmp_path: Path, seed: int) -> None:
    """Found by review: a delta chunk X on base B dies with B, but X's bytes stay as garbage in a pack kept for
    other chunks; later X is written again as a delta on another base B'. A repair (or a remote cache rebuilt
    from index objects) that met the stale copy first dropped X for its missing base, left the snapshot out,
    and the next prune deleted its data. Half of these seeds put the stale copy first."""
    kib = 1024
    r0, mid, t0, t1, rk = (det_bytes(seed * 10 + i, n) for i, n in enumerate((128 * kib, 256 * kib, 128 * kib,
                                                                               128 * kib, 128 * kib)))
    at = 40 * kib
    i0, i1 = r0 + mid + t0, _patched(r0, at, det_bytes(999, 16)) + mid + t1  # X at `at`: a delta on i0's chunk
    n0 = _patched(r0, at + 200, det_bytes(777, 16)) + mid + t0  # B' there, whole (the first of its series)
    with small_repo(tmp_path / "repo", avg=4096) as repo:
        s0 = take(repo, tmp_path, i0, "disk", 0).record
        s1 = take(repo, tmp_path, i1, "disk", 1).record
        keep = take(repo, tmp_path, rk + mid + t1, "keep", 2).record  # keeps X's pack, not B's
        execute(repo, plan_ids(repo, [s0.hex_id, s1.hex_id]))
        prune(repo, max_unused=0.5)
        new0 = take(repo, tmp_path, n0, "new", 3).record
        new1 = take(repo, tmp_path, i1, "new", 4).record  # X again, a delta on B'
        assert check(repo, read_data=1.0).ok
    report = Repository.rebuild_index(tmp_path / "repo")
    assert report.snapshots == 3 and not report.left_out and not report.damaged_blobs
    with Repository.open(tmp_path / "repo") as repo:
        found = check(repo, read_data=1.0)
        assert found.ok, found.findings
        prune(repo, max_unused=0.0)
        for rec, img in ((keep, rk + mid + t1), (new0, n0), (new1, i1)):
            assert restores(repo, rec, img, tmp_path)
        assert check(repo, read_data=1.0).ok


def test_stats_counts_a_base_that_only_a_dead_delta_holds_besides(tmp_path: Path) -> None:
    """A delta chunk left by an interrupted snapshot (reference count 0) still holds its base: the next prune
    drops the delta and its link, so forgetting the snapshot that lists the base frees the base too; stats'
    "freed" must say so (it left the base out)."""
    image = det_bytes(31, 256 * 1024)
    with small_repo(tmp_path / "repo", avg=4096) as repo:
        rec = take(repo, tmp_path, image).record
        offset, bases = 0, []
        for sid, _ in rec.segments:
            for length, cid in repo.segment(sid).extents():
                if cid is not None:
                    bases.append((cid, image[offset : offset + length]))
                offset += length
        writer = repo.writer()  # what an interrupted snapshot of a next version commits: deltas, no record
        for base_id, raw in bases[:8]:
            changed = raw[:100] + b"x" * 16 + raw[116:]
            writer.add_encoded_chunk(writer.encode_chunk(repo.chunk_id(changed), changed, (base_id, raw)))
        writer.flush()
        writer.close()
        assert len(deltas_in(repo)) == 8
        assert sum(repo.dead_delta_links().values()) == 8
        expected = snapshot_stats(repo, [rec]).snapshots[0].freed
        before = pack_bytes(tmp_path / "repo")
        execute(repo, plan_ids(repo, [rec.hex_id]))
        prune(repo, max_unused=0.0)
        freed = before - pack_bytes(tmp_path / "repo")
        assert not deltas_in(repo) and not repo.snapshots()
        # The 8 dead deltas (a few dozen bytes each, with their rows) go in the same prune: not rec's to free.
        assert expected * 0.97 - 4096 <= freed <= expected * 1.03 + 4096 + 8 * 200, (expected, freed)
