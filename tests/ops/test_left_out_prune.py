"""Review of the left-out / salvage work: what a left-out snapshot still has must survive prune, so that a
lost pack recovered later brings it back whole (docs/reliability.md §1.3, §5)."""

from __future__ import annotations

import shutil
from pathlib import Path

from dedupimg.core.config import ChunkerParams
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.retention import Policy
from dedupimg.ops.check import check
from dedupimg.ops.forget import forget_and_prune
from dedupimg.ops.prune import prune
from dedupimg.ops.repair import repair_index
from dedupimg.repo import pack
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes, restores, small_repo, snap, text_bytes
from tests.packfiles import trailer


def delta_world(path: Path, tmp: Path) -> tuple[SnapshotRecord, bytes, SnapshotRecord]:
    """v0 (whole chunks) and v1 (scattered writes: chunks stored as deltas on v0's)."""
    repo = Repository.init(path, ChunkerParams.for_average(4096), pack_size=1 << 16)
    image = text_bytes(1, 1 << 20) + det_bytes(2, 1 << 20)
    data = bytearray(image)
    for k in range(40):
        pos = k * 48_271 * 13 % (len(data) - 16)
        data[pos : pos + 16] = det_bytes(100 + k, 16)
    with repo:
        v0 = snap(repo, tmp / "v0.img", image)
        v1 = snap(repo, tmp / "v1.img", bytes(data))
    return v0, image, v1


def test_a_base_only_an_incomplete_segment_of_a_left_out_snapshot_lists_survives_prune(tmp_path):
    """v0 is left out (a pack of its own chunks lost): the segment S listing the lost chunk is not stored, so
    its chunks count no reference from it. One of them, Y, is also the base of a delta X of v1. Forget v1 and
    prune: X dies, and Y, whose last counted reference was X's link, must not die with it: v0 still has it
    (it is in the held set). Then the lost pack recovered and a repair must list v0 whole."""
    path = tmp_path / "repo"
    v0, image0, v1 = delta_world(path, tmp_path)
    with Repository.open(path) as repo:
        seg_chunks = {sid: repo.segment(sid).chunk_ids() for sid, _ in v0.segments}
        rows = {row.id: trailer(path / pack.pack_name(row.id)) for row in repo.index.pack_rows()}
        where = {e.id: pid for pid, entries in rows.items() for e in entries}
        deltas = [e.id for entries in rows.values() for e in entries if e.codec == pack.DELTA]
        bases = dict(zip(deltas, repo.delta_bases(deltas), strict=True))
        record_pack = where[v0.id]
    victim = None
    for x, y in bases.items():
        for sid, chunks in seg_chunks.items():
            if y not in chunks or sum(c == y for s in seg_chunks.values() for c in s) != 1:
                continue
            for z in chunks:  # a chunk of S whose pack holds no metadata, not Y, no delta, not X's pack
                pid = where[z]
                entries = rows[pid]
                if pid in (where[y], where[x], record_pack, where[sid]) \
                        or any(e.type != pack.CHUNK or e.codec == pack.DELTA or e.id == y for e in entries):
                    continue
                victim = pid
                break
            if victim:
                break
        if victim:
            break
    assert victim is not None, "no suitable pack in this world"
    victim_file = path / pack.pack_name(victim)
    saved = tmp_path / "copy.pack"
    shutil.copyfile(victim_file, saved)
    with Repository.open(path) as repo:
        forget_and_prune(repo, [v1.hex_id], Policy())  # forgotten, not pruned yet
    victim_file.unlink()

    report = repair_index(path)
    assert [r.id for r in report.left_out] == [v0.id]
    with Repository.open(path) as repo:
        assert repo.snapshots() == []
        prune(repo, 0.0)  # X (v1's delta) dies; Y, which v0 still has, must not

    shutil.copyfile(saved, victim_file)  # the lost pack recovered from a copy
    again = repair_index(path)
    assert again.left_out == []
    with Repository.open(path) as repo:
        assert [r.id for r in repo.snapshots()] == [v0.id]
        assert restores(repo, v0, image0, tmp_path)
        assert check(repo, 1.0).ok


def test_chunks_of_a_left_out_snapshots_missing_segment_survive_prune(tmp_path):
    """v1 differs from v0 in its middle: its segment S there is new and lists v0's chunks around the change.
    v0 is forgotten; the pack holding S is lost; repair leaves v1 out. S has no row, so nothing says which
    chunks it lists: prune must free no chunk at count 0 (v0's, which only S lists, among them), or the pack
    recovered and a repair would find S incomplete and v1 left out for ever (docs/reliability.md §5)."""
    path = tmp_path / "repo"
    image0 = det_bytes(1, 2_000_000)
    image1 = bytearray(image0)
    image1[300_000:300_016] = det_bytes(9, 16)
    image1 = bytes(image1) + det_bytes(2, 1_000_000)
    with small_repo(path) as repo:
        v0 = snap(repo, tmp_path / "v0.img", image0)
        v1 = snap(repo, tmp_path / "v1.img", image1)
        new_segments = {sid for sid, _ in v1.segments} - {sid for sid, _ in v0.segments}
        v0_chunks = {c for sid, _ in v0.segments for c in repo.segment(sid).chunk_ids()}
        rows = {row.id: trailer(path / pack.pack_name(row.id)) for row in repo.index.pack_rows()}
        victim = None
        for pid, entries in rows.items():
            ids = {e.id for e in entries}
            if v1.id in ids or not ids & new_segments:
                continue
            if any(c in v0_chunks for s in ids & new_segments for c in repo.segment(s).chunk_ids()):
                victim = pid
                break
        forget_and_prune(repo, [v0.hex_id], Policy())  # forgotten, not pruned
    assert victim is not None, "no suitable pack in this world"
    victim_file = path / pack.pack_name(victim)
    saved = tmp_path / "copy.pack"
    shutil.copyfile(victim_file, saved)
    victim_file.unlink()

    assert [r.id for r in repair_index(path).left_out] == [v1.id]
    with Repository.open(path) as repo:
        prune(repo, 0.0)
    shutil.copyfile(saved, victim_file)
    assert repair_index(path).left_out == []
    with Repository.open(path) as repo:
        assert restores(repo, v1, image1, tmp_path)


def test_a_recovered_pack_is_not_deleted_by_a_prune_that_runs_before_the_repair(tmp_path):
    """The lost pack of a left-out snapshot is put back from a copy; a prune (a nightly 'forget --prune', say)
    runs before the user's repair. The pack is an orphan to the index, and it held no unknown snapshot record,
    so prune deleted it: the snapshot could then never come back (docs/reliability.md §5: recover the pack
    and repair). It holds what a left-out snapshot needs: prune must keep it (or refuse)."""
    path = tmp_path / "repo"
    shared = text_bytes(1, 120_000)
    images = {"a": det_bytes(10, 150_000) + shared, "b": det_bytes(20, 150_000) + shared}
    with small_repo(path) as repo:
        recs = {n: snap(repo, tmp_path / f"{n}.img", data, name=None) for n, data in images.items()}

        def chunks(r: SnapshotRecord) -> set[bytes]:
            return {c for sid, _ in r.segments for c in repo.segment(sid).chunk_ids()}

        mine = chunks(recs["a"]) - chunks(recs["b"])
        victim = next(path / pack.pack_name(row.id) for row in repo.index.pack_rows()
                      if all(e.type == pack.CHUNK and e.id in mine
                             for e in trailer(path / pack.pack_name(row.id))))
    saved = tmp_path / "copy.pack"
    shutil.copyfile(victim, saved)
    victim.unlink()
    assert [r.id for r in repair_index(path).left_out] == [recs["a"].id]

    shutil.copyfile(saved, victim)  # recovered
    with Repository.open(path) as repo:
        try:
            prune(repo, 0.0)
        except Exception:  # refusing is fine too
            pass
    assert victim.exists()
    assert repair_index(path).left_out == []
    with Repository.open(path) as repo:
        assert restores(repo, recs["a"], images["a"], tmp_path)
