"""repair index on damaged packs, and the prune after it: a pack whose trailer is cut gives back its intact blobs
(salvage), prune rewrites it, and the snapshots a repair leaves out keep what they have until they are forgotten,
whether other snapshots are listed or not (never a dead end)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dedupimg.core.config import ChunkerParams
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.progress import NoProgress
from dedupimg.core.retention import Policy
from dedupimg.ops.check import check
from dedupimg.ops.forget import forget_and_prune
from dedupimg.ops.prune import prune
from dedupimg.ops.repair import repair_index
from dedupimg.repo import pack
from dedupimg.repo.repair import _repair_under_lock
from dedupimg.repo.repository import Repository, cache_home
from tests.helpers import MemoryRemote, det_bytes, restores, small_repo, snap, text_bytes
from tests.packfiles import pack_file, trailer


@pytest.fixture(params=["plain", "encrypted"])
def encrypted(request: pytest.FixtureRequest) -> bool:
    return request.param == "encrypted"


def make_world(path: Path, tmp: Path, encrypted: bool = False, names: tuple[str, ...] = ("a", "b", "c")
               ) -> list[tuple[SnapshotRecord, bytes]]:
    """Snapshots that share some data and not other (a's first 150 000 bytes are its own)."""
    shared = text_bytes(1, 120_000)
    images = {"a": det_bytes(10, 150_000) + shared, "b": det_bytes(20, 150_000) + shared,
              "c": shared + det_bytes(30, 60_000)}
    repo = small_repo(path, encrypted=encrypted)
    with repo:
        return [(snap(repo, tmp / f"{n}.img", images[n], name=None), images[n]) for n in names]


def own_chunk_pack(path: Path, rec: SnapshotRecord, others: list[SnapshotRecord]) -> Path:
    """A pack file that holds a chunk ``rec`` uses and none of ``others`` does, and no snapshot record."""
    with Repository.open(path) as repo:
        def chunks(r: SnapshotRecord) -> set[bytes]:
            return {c for sid, _ in r.segments for c in repo.segment(sid).chunk_ids()}

        mine = chunks(rec) - set().union(set(), *(chunks(o) for o in others))
        for row in repo.index.pack_rows():
            entries = trailer(pack_file(repo, row.id))
            if any(e.id in mine for e in entries) and all(e.type == pack.CHUNK for e in entries):
                return pack_file(repo, row.id)
    raise AssertionError("no such pack")


def listed(path: Path) -> set[bytes]:
    with Repository.open(path) as repo:
        return {r.id for r in repo.snapshots()}


def all_restore(path: Path, expected: list[tuple[SnapshotRecord, bytes]], tmp: Path) -> None:
    with Repository.open(path) as repo:
        for rec, data in expected:
            assert restores(repo, rec, data, tmp)


def run_prune(path: Path, max_unused: float = 0.0):
    with Repository.open(path) as repo:
        return prune(repo, max_unused)


# -- salvage --------------------------------------------------------------------------------------------------


def test_a_pack_cut_before_its_trailer_is_salvaged_whole_and_prune_rewrites_it(tmp_path, encrypted):
    """Every blob survives when only the trailer and footer are cut: repair lists every snapshot again (it
    skipped the pack before, leaving out a), prune rewrites the pack (it refused before) and the result is clean."""
    path = tmp_path / "repo"
    expected = make_world(path, tmp_path, encrypted)
    (a, _), (b, _), (c, _) = expected
    victim = own_chunk_pack(path, a, [b, c])
    entries = trailer(victim)
    os.truncate(victim, entries[-1].end)  # trailer and footer gone, every blob whole

    report = repair_index(path)
    assert report.left_out == []
    assert listed(path) == {a.id, b.id, c.id}
    assert [n for n, _ in report.damaged_packs] == [victim.name]
    assert [(s.name, s.blobs, s.deltas, s.damaged) for s in report.salvaged] == [(victim.name, len(entries), 0, 0)]
    all_restore(path, expected, tmp_path)
    with Repository.open(path) as repo:
        assert {f.kind for f in check(repo).findings} == {"pack-damaged"}  # the damage stays visible until prune

    result = run_prune(path, max_unused=0.5)  # a salvaged pack is rewritten whatever --max-unused says
    assert result.salvaged_packs == 1 and result.packs_to_rewrite >= 1
    # Gone, or (a plain pack rewritten with the same blobs in the same order has the same trailer, so the same
    # name) whole again.
    assert not victim.exists() or len(trailer(victim)) == len(entries)
    with Repository.open(path) as repo:
        after = check(repo, 1.0)
        assert after.ok, after.findings
        assert repo.index.salvaged_packs() == []
    all_restore(path, expected, tmp_path)


def test_a_pack_cut_inside_a_blob_gives_back_the_blobs_before_the_cut(tmp_path, encrypted):
    path = tmp_path / "repo"
    expected = make_world(path, tmp_path, encrypted)
    (a, _), (b, db), (c, dc) = expected
    victim = own_chunk_pack(path, a, [b, c])
    entries = trailer(victim)
    assert len(entries) >= 3
    cut = entries[2].offset + 44 + entries[2].stored_len // 2  # blobs 0 and 1 whole, blob 2 cut
    os.truncate(victim, cut)

    report = repair_index(path)
    with Repository.open(path) as repo:
        rows = repo.index.lookup_blobs([e.id for e in entries])
        assert [r is not None for r in rows[:3]] == [True, True, False]
    assert [(s.blobs, s.deltas) for s in report.salvaged] == [(2, 0)]
    assert [r.id for r in report.left_out] == [a.id]  # it needs the cut chunk
    assert listed(path) == {b.id, c.id}
    result = run_prune(path)
    assert result.salvaged_packs == 1
    all_restore(path, expected[1:], tmp_path)
    with Repository.open(path) as repo:
        # What a still has is kept: its two salvaged chunks were copied to a new pack, not freed.
        assert all(r is not None for r in repo.index.lookup_blobs([e.id for e in entries[:2]]))
        assert [f.kind for f in check(repo, 1.0).findings] == ["record-unlisted"]


def test_a_salvaged_delta_chunk_is_not_registered(tmp_path):
    """A delta's base is named only in its trailer row: the scan passes over it (counted), never links it."""
    path = tmp_path / "repo"
    repo = Repository.init(path, ChunkerParams.for_average(4096), pack_size=1 << 16)
    first_image = text_bytes(1, 1 << 20) + det_bytes(2, 1 << 20)
    data = bytearray(first_image)
    for k in range(40):  # scattered small writes: the chunks around them are stored as deltas
        pos = k * 48_271 * 13 % (len(data) - 16)
        data[pos : pos + 16] = det_bytes(100 + k, 16)
    images = [first_image, bytes(data)]
    with repo:
        first = snap(repo, tmp_path / "v0.img", images[0])
        second = snap(repo, tmp_path / "v1.img", images[1])
    deltas = [(p, e) for p in (path / "packs").rglob("*.pack") for e in trailer(p) if e.codec == pack.DELTA]
    assert deltas, "the second version stored no delta"
    victim = deltas[0][0]
    entries = trailer(victim)
    os.truncate(victim, entries[-1].end)

    report = repair_index(path)
    n_deltas = sum(e.codec == pack.DELTA for e in entries)
    assert [(s.blobs, s.deltas) for s in report.salvaged] == [(len(entries) - n_deltas, n_deltas)]
    with Repository.open(path) as repo:
        rows = repo.index.lookup_blobs([e.id for e in entries if e.codec == pack.DELTA])
        victim_no = repo.index.pack_numbers([bytes.fromhex(victim.name[:64])])[bytes.fromhex(victim.name[:64])]
        assert all(r is None or r.pack_no != victim_no for r in rows)
        assert repo.index.delta_bases([e.id for e in entries]) == [None] * len(entries)
    assert [r.id for r in report.left_out] == [second.id]
    assert listed(path) == {first.id}
    with Repository.open(path) as repo:
        assert restores(repo, first, images[0], tmp_path)


# -- left-out snapshots: kept until forgotten, never a dead end --------------------------------------------------


def damage(victim: Path, how: str) -> None:
    """Lose a pack (moved away) or all of its blobs (cut to 100 bytes: a salvage finds nothing)."""
    if how == "deleted":
        victim.unlink()
    else:
        os.truncate(victim, 100)


@pytest.mark.parametrize("how", ["deleted", "truncated"])
@pytest.mark.parametrize("others", [True, False], ids=["with-other-snapshots", "only-snapshot"])
def test_prune_keeps_a_left_out_snapshots_data_until_it_is_forgotten(tmp_path, others, how):
    """Before: with other snapshots listed, prune freed what a left-out snapshot still had; with none, it
    refused ("never forgotten") and a repair changed nothing: a dead end (a truncated pack made prune refuse
    in both cases). Now prune runs in every case and keeps that data, so that the lost pack, recovered from a
    copy, brings the snapshot back whole."""
    path = tmp_path / "repo"
    expected = make_world(path, tmp_path, names=("a", "b", "c") if others else ("a",))
    a, da = expected[0]
    victim = own_chunk_pack(path, a, [r for r, _ in expected[1:]])
    saved = tmp_path / "copy.pack"
    shutil.copyfile(victim, saved)
    damage(victim, how)

    report = repair_index(path)
    assert [r.id for r in report.left_out] == [a.id]
    result = run_prune(path)
    second = run_prune(path)  # and again: no refusal
    with Repository.open(path) as repo:
        assert [f.kind for f in check(repo, 1.0).findings] == ["record-unlisted"]

    shutil.copyfile(saved, victim)  # the lost pack recovered from a copy
    again = repair_index(path)
    assert again.left_out == [] and a.id in listed(path)
    all_restore(path, expected, tmp_path)
    with Repository.open(path) as repo:
        assert check(repo, 1.0).ok
        assert repo.index.left_out() == []
    assert result.held_rows > 0 and second.held_rows == result.held_rows


@pytest.mark.parametrize("others", [True, False], ids=["with-other-snapshots", "only-snapshot"])
def test_forget_left_out_then_prune_frees_it(tmp_path, others):
    path = tmp_path / "repo"
    expected = make_world(path, tmp_path, names=("a", "b", "c") if others else ("a",))
    a, _ = expected[0]
    victim = own_chunk_pack(path, a, [r for r, _ in expected[1:]])
    damage(victim, "truncated")
    repair_index(path)
    before = sum(p.stat().st_size for p in (path / "packs").rglob("*.pack"))

    with Repository.open(path) as repo:
        dry = forget_and_prune(repo, [], Policy(), dry_run=True, and_prune=True, left_out=True)
        assert [r.id for r in dry.plan.remove] == [a.id] and repo.index.left_out() == [a.id]
        done = forget_and_prune(repo, [], Policy(), and_prune=True, left_out=True)
        assert [r.id for r in done.plan.remove] == [a.id]
        assert done.prune is not None and done.prune.held_rows == 0
        assert repo.left_out() == []
        assert check(repo, 1.0).ok
    assert sum(p.stat().st_size for p in (path / "packs").rglob("*.pack")) < before - 100_000
    assert repair_index(path).left_out == []  # forgotten: it does not come back
    assert listed(path) == {r.id for r, _ in expected[1:]}
    all_restore(path, expected[1:], tmp_path)


# -- a remote repository: every host's cache marks what it leaves out ---------------------------------------------


def test_remote_hosts_keep_a_left_out_snapshot_until_one_forgets_it(tmp_path):
    """A repair on host 0 leaves a out; host 1's cache, rebuilt from the new index object, leaves it out too
    and marks it, so host 1's prune keeps its data (it freed it before); host 1's 'forget --left-out' reaches
    host 0 through its sync, whose prune then frees it."""
    world = MemoryRemote(tmp_path)
    store, config, host = world.store, world.config, world.host

    images = {"a": det_bytes(10, 150_000) + text_bytes(1, 120_000), "b": det_bytes(20, 150_000)}
    with host(0) as repo:
        recs = {n: snap(repo, tmp_path / f"{n}.img", data, name=None) for n, data in images.items()}
        with host(1):
            pass  # host 1's cache knows both
        def chunks(r: SnapshotRecord) -> set[bytes]:
            return {c for sid, _ in r.segments for c in repo.segment(sid).chunk_ids()}

        mine = chunks(recs["a"]) - chunks(recs["b"])
        lost = next(pack.pack_name(row.id) for row in repo.index.pack_rows()
                    if any(loc is not None and loc.pack_no == row.pack_no
                           for loc in repo.index.lookup_blobs(sorted(mine))))
    store.delete([lost])
    home = cache_home(tmp_path / "host0", config.repo_id)
    os.makedirs(home / "tmp", exist_ok=True)  # as repair_index makes it for a remote repository
    report = _repair_under_lock(home, store, NoProgress(), pack.PLAIN, remote=True)
    assert [r.id for r in report.left_out] == [recs["a"].id]

    with host(1) as repo:
        pruned = prune(repo, 0.0)
        assert any(loc is not None for loc in repo.index.lookup_blobs(sorted(mine)))  # outside the lost pack
        assert [r.id for r in repo.left_out()] == [recs["a"].id] and pruned.held_rows > 0
        forget_and_prune(repo, [], Policy(), left_out=True)
    with host(0) as repo:
        assert repo.left_out() == []
        result = prune(repo, 0.0)
        assert result.held_rows == 0 and result.records_dropped == 1
        assert check(repo, 1.0).ok
        assert restores(repo, recs["b"], images["b"], tmp_path)


def test_a_prune_killed_before_deleting_a_rewritten_salvaged_pack_finishes_next_time(tmp_path, monkeypatch):
    """Killed after its index transaction, a prune leaves the damaged file unlisted: the next prune deletes it
    (its mark says it was rewritten) instead of refusing at its trailer as at an unknown damaged pack."""
    from dedupimg.store.local import LocalStore

    path = tmp_path / "repo"
    expected = make_world(path, tmp_path, encrypted=True)  # sealed: the rewrite gets another name
    (a, _), (b, _), (c, _) = expected
    victim = own_chunk_pack(path, a, [b, c])
    os.truncate(victim, trailer(victim)[-1].end)
    repair_index(path)

    def killed(self: LocalStore, names: list[str]) -> int:
        raise KeyboardInterrupt  # as a kill between the index transaction and the deletions

    monkeypatch.setattr(LocalStore, "delete", killed)
    with pytest.raises(KeyboardInterrupt):
        run_prune(path)
    monkeypatch.undo()
    assert victim.exists()
    run_prune(path)
    assert not victim.exists()
    with Repository.open(path) as repo:
        assert repo.index.salvaged_packs() == []
        assert check(repo, 1.0).ok
    all_restore(path, expected, tmp_path)
