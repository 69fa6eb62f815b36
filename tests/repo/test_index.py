"""The LMDB index on its own: commit ordering, reference counts, the dead list, pack numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from dedupimg.core.errors import IntegrityError
from dedupimg.repo.index import BLOB_HEADER_SIZE, Index, NewBlob, NewSegment, NewSnapshot, SealedPack

CHUNK, SEGMENT, SNAPSHOT, TOMBSTONE = 0, 1, 2, 3


def bid(name: str) -> bytes:
    return name.encode().ljust(32, b".")


def pid(n: int) -> bytes:
    return n.to_bytes(4, "big").ljust(32, b"p")


def sealed(pack: int, *blobs: tuple[int, str]) -> SealedPack:
    """A pack of blobs (type, name) back to back, each stored in 10 bytes."""
    rows, offset = [], 8
    for type_, name in blobs:
        rows.append(NewBlob(type_, 0, offset, 10, 10, bid(name)))
        offset += BLOB_HEADER_SIZE + 10
    return SealedPack(pid(pack), offset + 100, rows)


def seg(name: str, *chunks: str) -> NewSegment:
    return NewSegment(bid(name), f"segment {name}".encode(), [bid(c) for c in chunks])


def snap(name: str, *segments: str) -> NewSnapshot:
    return NewSnapshot(bid(name), f"record {name}".encode(), [bid(s) for s in segments])


def counts(index: Index, *names: str) -> list[int | None]:
    return index.refcounts([bid(n) for n in names])


def dead(index: Index) -> set[str]:
    return {k.rstrip(b".").decode() for k, _ in index.dead_rows()}


def listed(index: Index) -> set[str]:
    return {k.rstrip(b".").decode() for k, _ in index.snapshots()}


@pytest.fixture
def index(tmp_path: Path):
    (tmp_path / "index").mkdir()
    ix = Index(tmp_path / "index", create=True)
    yield ix
    ix.close()


def test_commit_with_snapshot_lists_it_and_counts_references(index: Index) -> None:
    index.commit_pack(
        sealed(1, (CHUNK, "c1"), (CHUNK, "c2"), (SEGMENT, "s1"), (SNAPSHOT, "r1")),
        [seg("s1", "c1", "c2", "c1")],
        snap("r1", "s1"),
    )
    assert index.snapshots() == [(bid("r1"), b"record r1")]
    assert index.get_segment(bid("s1")) == b"segment s1"
    assert counts(index, "c1", "c2", "s1") == [2, 1, 1]  # a chunk listed twice by a segment counts twice
    assert dead(index) == set()
    rows = index.pack_rows()
    assert [(r.id, r.blob_count) for r in rows] == [(pid(1), 4)]
    assert {loc.pack_no for loc in index.lookup_blobs([bid("c1"), bid("r1")])} == {rows[0].pack_no}


def test_snapshot_is_listed_only_with_the_pack_that_completes_it(index: Index) -> None:
    # An earlier pack of the same snapshot: its chunks are indexed, unreferenced, in dead; nothing listed.
    index.commit_pack(sealed(1, (CHUNK, "c1"), (CHUNK, "c2")), [])
    assert listed(index) == set() and dead(index) == {"c1", "c2"}
    assert counts(index, "c1", "c2") == [0, 0]
    # The last pack holds the segment and the record: listing and counts come with it, in one transaction.
    index.commit_pack(sealed(2, (CHUNK, "c3"), (SEGMENT, "s1"), (SNAPSHOT, "r1")),
                      [seg("s1", "c1", "c2", "c3")], snap("r1", "s1"))
    assert listed(index) == {"r1"} and dead(index) == set()
    assert counts(index, "c1", "c2", "c3", "s1") == [1, 1, 1, 1]


def test_failed_commit_changes_nothing(index: Index) -> None:
    # The record names a segment no pack holds: the whole transaction fails, the pack is not even listed.
    with pytest.raises(IntegrityError):
        index.commit_pack(sealed(1, (CHUNK, "c1"), (SNAPSHOT, "r1")), [], snap("r1", "missing"))
    assert index.pack_rows() == [] and listed(index) == set() and dead(index) == set()
    assert counts(index, "c1", "r1") == [None, None]
    with pytest.raises(IntegrityError):  # a segment listing a chunk that is not indexed
        index.commit_pack(sealed(1, (SEGMENT, "s1")), [seg("s1", "nowhere")])
    assert index.pack_rows() == [] and index.get_segment(bid("s1")) is None


def test_refcounts_after_add_and_forget(index: Index) -> None:
    # Two snapshots share segment s1; r2 also has s2. Chunk c1 is listed by both segments.
    index.commit_pack(
        sealed(1, (CHUNK, "c1"), (CHUNK, "c2"), (SEGMENT, "s1"), (SEGMENT, "s2"), (SNAPSHOT, "r1")),
        [seg("s1", "c1", "c2"), seg("s2", "c1")], snap("r1", "s1"),
    )
    assert dead(index) == {"s2"}  # stored by an unfinished pack sequence, no record lists it yet
    index.commit_pack(sealed(2, (SNAPSHOT, "r2")), [], snap("r2", "s1", "s2", "s1"))
    assert counts(index, "s1", "s2", "c1", "c2") == [3, 1, 2, 1]
    assert dead(index) == set()

    index.forget(sealed(3, (TOMBSTONE, "t1")), [snap("r2", "s1", "s2", "s1")])
    assert listed(index) == {"r1"}
    assert counts(index, "s1", "s2", "c1", "c2") == [1, 0, 2, 1]  # chunks change only when prune drops s2
    assert dead(index) == {"s2", "r2"}
    assert counts(index, "t1") == [1]  # a tombstone holds a permanent count: never garbage

    # Forgetting again (a re-run after a crash) changes nothing but registers its tombstone pack.
    index.forget(sealed(4, (TOMBSTONE, "t2")), [snap("r2", "s1", "s2", "s1")])
    assert counts(index, "s1", "s2") == [1, 0] and dead(index) == {"s2", "r2"}

    index.forget(sealed(5, (TOMBSTONE, "t3")), [snap("r1", "s1")])
    assert listed(index) == set()
    assert counts(index, "s1", "s2") == [0, 0] and dead(index) == {"s1", "s2", "r1", "r2"}


def test_dead_list_after_forget_and_prune(index: Index) -> None:
    index.commit_pack(
        sealed(1, (CHUNK, "c1"), (CHUNK, "c2"), (SEGMENT, "s1"), (SEGMENT, "s2"), (SNAPSHOT, "r1"),
               (SNAPSHOT, "r2")),
        [seg("s1", "c1", "c2"), seg("s2", "c1")], snap("r1", "s1"),
    )
    index.add_references([], [snap("r2", "s2")])
    index.forget(sealed(2, (TOMBSTONE, "t1")), [snap("r1", "s1")])
    assert dead(index) == {"s1", "r1"}

    # Prune drops s1 (its chunks lose one reference each: c2 dies, c1 is still listed by s2) and r1.
    first = index.pack_numbers([pid(1)])[pid(1)]
    index.apply_prune([], [seg("s1", "c1", "c2")], [bid("s1"), bid("r1")], [], {first: 2 * (BLOB_HEADER_SIZE + 10)})
    assert counts(index, "c1", "c2", "s1", "r1") == [1, 0, None, None]
    assert dead(index) == {"c2"}
    assert index.get_segment(bid("s1")) is None
    assert index.garbage_bytes() == {first: 2 * (BLOB_HEADER_SIZE + 10)}

    # The next prune drops c2: the dead list is empty, and what stays is exactly what r2 needs.
    index.apply_prune([], [], [bid("c2")], [], {})
    assert dead(index) == set()
    assert counts(index, "c1", "c2", "s2", "r2") == [1, None, 1, 0]  # records are not counted
    assert listed(index) == {"r2"}


def test_prune_never_drops_a_referenced_blob(index: Index) -> None:
    index.commit_pack(sealed(1, (CHUNK, "c1"), (SEGMENT, "s1"), (SNAPSHOT, "r1")), [seg("s1", "c1")],
                      snap("r1", "s1"))
    for victim in ("c1", "s1", "r1"):
        with pytest.raises(IntegrityError):
            index.apply_prune([], [], [bid(victim)], [], {})
    assert counts(index, "c1", "s1") == [1, 1] and listed(index) == {"r1"} and len(index.pack_rows()) == 1


def test_prune_moves_rows_to_new_packs_and_unlists_old_ones(index: Index) -> None:
    index.commit_pack(sealed(1, (CHUNK, "c1"), (CHUNK, "c2"), (SEGMENT, "s1"), (SNAPSHOT, "r1")),
                      [seg("s1", "c1")], snap("r1", "s1"))
    old_no = index.pack_numbers([pid(1)])[pid(1)]
    assert dead(index) == {"c2"}
    new = sealed(2, (CHUNK, "c1"), (SEGMENT, "s1"), (SNAPSHOT, "r1"))
    index.apply_prune([new], [], [bid("c2")], [old_no], {})
    new_no = index.pack_numbers([pid(2)])[pid(2)]
    assert [r.pack_no for r in index.pack_rows()] == [new_no] and pid(1) not in index.pack_numbers([pid(1)])
    locs = index.lookup_blobs([bid("c1"), bid("s1"), bid("r1")])
    assert all(loc is not None and loc.pack_no == new_no for loc in locs)
    assert counts(index, "c1", "s1") == [1, 1]  # counts move with the rows
    assert dead(index) == set() and index.garbage_bytes() == {}


def test_registering_a_pack_twice_keeps_one_number(index: Index) -> None:
    pack = sealed(1, (CHUNK, "c1"), (SEGMENT, "s1"), (SNAPSHOT, "r1"))
    index.commit_pack(pack, [seg("s1", "c1")], snap("r1", "s1"))
    index.commit_pack(pack, [seg("s1", "c1")], snap("r1", "s1"))  # the same blobs, the same pack id
    rows = index.pack_rows()
    assert len(rows) == 1 and rows[0].id == pid(1)
    assert counts(index, "c1", "s1") == [1, 1]  # nothing counted twice
    assert index.garbage_bytes() == {}
    # A prune that writes a pack identical to a listed one (same content, same id) keeps that number too.
    index.apply_prune([pack], [], [], [], {})
    assert [r.pack_no for r in index.pack_rows()] == [rows[0].pack_no]
    # The next new pack gets a fresh number.
    index.commit_pack(sealed(2, (CHUNK, "c2")), [])
    assert sorted(r.pack_no for r in index.pack_rows()) == [rows[0].pack_no, rows[0].pack_no + 1]


def test_second_copy_of_a_blob_is_garbage_in_its_pack(index: Index) -> None:
    index.commit_pack(sealed(1, (CHUNK, "c1")), [])
    index.commit_pack(sealed(2, (CHUNK, "c1"), (CHUNK, "c2")), [])
    numbers = index.pack_numbers([pid(1), pid(2)])
    loc = index.lookup_blobs([bid("c1")])[0]
    assert loc is not None and loc.pack_no == numbers[pid(1)]  # the first location is kept
    assert index.garbage_bytes() == {numbers[pid(2)]: BLOB_HEADER_SIZE + 10}
    assert dead(index) == {"c1", "c2"}


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    (tmp_path / "ix").mkdir()
    index = Index(tmp_path / "ix", create=True)
    index.commit_pack(sealed(1, (CHUNK, "c1"), (SEGMENT, "s1"), (SNAPSHOT, "r1")), [seg("s1", "c1")],
                      snap("r1", "s1"))
    index.close()
    index = Index(tmp_path / "ix")
    try:
        assert listed(index) == {"r1"} and counts(index, "c1", "s1") == [1, 1] and dead(index) == set()
    finally:
        index.close()


@pytest.mark.slow
def test_reopens_after_large_transactions(tmp_path: Path) -> None:
    """A transaction that frees many rows can leave LMDB's last allocated pages unwritten (pages it allocated
    and freed again go to the free list without being written), so ``data.mdb`` may end before the page its
    meta page counts up to. That is a sound index: it must open again, not be called damaged."""
    for n in (500, 1000, 2000, 3000, 5000):
        path = tmp_path / f"ix{n}"
        path.mkdir()
        index = Index(path, create=True)
        ids = [bid(f"{n}-{i}") for i in range(n)]
        for p in range(0, n, 32):
            blobs = [NewBlob(CHUNK, 0, 8 + j * 54, 10, 10, i) for j, i in enumerate(ids[p : p + 32])]
            index.commit_pack(SealedPack(pid(p), 8 + len(blobs) * 54 + 100, blobs), [])
        index.apply_prune([], [], ids, [], {})  # a prune that drops every row
        index.close()
        index = Index(path)
        try:
            assert index.dead_rows() == [] and index.refcounts(ids[:1]) == [None]
        finally:
            index.close()
