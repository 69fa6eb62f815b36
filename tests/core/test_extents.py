"""core.extents: a snapshot record mapped to extents, by walking it and by random access."""

from __future__ import annotations

import random

import pytest

from dedupimg.core.errors import IntegrityError
from dedupimg.core.extents import Extent, ExtentMap
from dedupimg.core.ids import blob_id
from dedupimg.core.manifest import Segment, SnapshotRecord


def _cid(n: int) -> bytes:
    return blob_id(b"chunk %d" % n)


def _image(seed: int = 1) -> tuple[SnapshotRecord, dict[bytes, Segment], list[Extent]]:
    """A record of a few segments of chunk and zero extents, its segments by id, and all its extents."""
    rng = random.Random(seed)
    segments: dict[bytes, Segment] = {}
    listed: list[tuple[bytes, int]] = []
    flat: list[Extent] = []
    pos = 0
    for s in range(6):
        lengths = [rng.randrange(1, 5000) for _ in range(rng.randrange(1, 40))]
        ids = [None if rng.random() < 0.2 else _cid(s * 1000 + i) for i in range(len(lengths))]
        seg = Segment(lengths, ids)
        seg_id = blob_id(seg.encode())
        segments[seg_id] = seg
        listed.append((seg_id, seg.size))
        for n, i in zip(lengths, ids, strict=True):
            flat.append(Extent(pos, n, i))
            pos += n
    record = SnapshotRecord(name="img", time="2026-01-01T00:00:00+00:00", size=pos, image_hash=bytes(32),
                            segments=listed)
    return record, segments, flat


def test_extents_of_any_range_are_those_that_overlap_it() -> None:
    record, segments, flat = _image()
    loads: list[bytes] = []

    def load(seg_id: bytes) -> Segment:
        loads.append(seg_id)
        return segments[seg_id]

    m = ExtentMap(record, load)
    rng = random.Random(2)
    for _ in range(300):
        offset = rng.randrange(-10, record.size + 10)
        length = rng.randrange(0, 20000)
        want = [e for e in flat if e.offset < min(offset + length, record.size) and e.offset + e.length > offset] \
            if offset >= 0 else []
        assert m.extents(offset, length) == want
    assert m.extents(0, record.size) == flat
    assert sorted(set(loads)) == sorted(loads)  # each segment loaded once (all fit the cache)


def test_walk_gives_each_segment_at_its_image_offset() -> None:
    record, segments, flat = _image(3)
    walked = list(ExtentMap(record, segments.__getitem__).walk())
    assert [seg for _, seg in walked] == [segments[i] for i, _ in record.segments]
    offsets = [0]
    for _, n in record.segments[:-1]:
        offsets.append(offsets[-1] + n)
    assert [o for o, _ in walked] == offsets


def test_a_segment_of_the_wrong_length_is_damage_for_walk_and_extents() -> None:
    record, segments, _ = _image(4)
    seg_id, n = record.segments[2]
    record.segments[2] = (seg_id, n + 1)
    record.segments[3] = (record.segments[3][0], record.segments[3][1] - 1)
    with pytest.raises(IntegrityError, match="has the wrong length"):
        list(ExtentMap(record, segments.__getitem__).walk())
    m = ExtentMap(record, segments.__getitem__)
    assert m.extents(0, 1)  # the first segment is fine
    with pytest.raises(IntegrityError, match="has the wrong length"):
        m.extents(0, record.size)


def test_one_segment_listed_twice_is_checked_at_each_place_even_when_cached() -> None:
    seg = Segment([10, 20], [_cid(1), None])
    other = Segment([5], [_cid(2)])
    sid, oid = blob_id(seg.encode()), blob_id(other.encode())
    segments = {sid: seg, oid: other}
    # Lengths add up to the size, but the second listing of ``seg`` claims 25 bytes where it has 30.
    record = SnapshotRecord(name="img", time="2026-01-01T00:00:00+00:00", size=30 + 25 + 10, image_hash=bytes(32),
                            segments=[(sid, 30), (sid, 25), (oid, 10)])
    m = ExtentMap(record, segments.__getitem__)
    assert m.extents(0, 30) == [Extent(0, 10, _cid(1)), Extent(10, 20, None)]
    with pytest.raises(IntegrityError, match="has the wrong length"):
        m.extents(30, 1)


def test_the_cache_holds_the_last_segments_used() -> None:
    record, segments, _ = _image(5)
    loads: list[bytes] = []

    def load(seg_id: bytes) -> Segment:
        loads.append(seg_id)
        return segments[seg_id]

    m = ExtentMap(record, load, cache=2)
    starts = [0]
    for _, n in record.segments:
        starts.append(starts[-1] + n)
    for s in (0, 1, 0, 2, 0, 1):
        m.extents(starts[s], 1)
    ids = [i for i, _ in record.segments]
    assert loads == [ids[0], ids[1], ids[2], ids[1]]


def test_zero_runs_merge_adjacent_extents_of_a_kind() -> None:
    seg = Segment([10, 20, 5, 5, 7], [_cid(1), _cid(2), None, None, _cid(3)])
    sid = blob_id(seg.encode())
    record = SnapshotRecord(name="img", time="2026-01-01T00:00:00+00:00", size=47, image_hash=bytes(32),
                            segments=[(sid, 47)])
    m = ExtentMap(record, {sid: seg}.__getitem__)
    assert m.zero_runs(0, 100) == [(0, 30, False), (30, 10, True), (40, 7, False)]
    assert m.zero_runs(5, 30) == [(5, 25, False), (30, 5, True)]
    assert m.zero_runs(47, 10) == []


def test_pieces_are_the_extents_as_segment_slices() -> None:
    """pieces(offset, end) lists, as slices of whole segments, exactly the extents extents() lists for the same
    range (from the one holding ``offset`` to the last starting before ``end``), at every offset and end."""
    record, segments, _ = _image(4)
    m = ExtentMap(record, segments.__getitem__)
    rng = random.Random(5)
    boundaries = [e.offset for e in m.extents(0, record.size)]
    offsets = [0, record.size - 1, *boundaries[::3], *(rng.randrange(record.size) for _ in range(100))]
    for offset in offsets:
        for end in (offset + 1, offset + rng.randrange(1, 20_000), record.size, record.size + 9,
                    *(b for b in boundaries[::5] if b > offset)):
            flat = [(n, i) for lengths, ids in m.pieces(offset, end) for n, i in zip(lengths, ids, strict=True)]
            assert flat == [(e.length, e.id) for e in m.extents(offset, end - offset)], (offset, end)


def _brute_seek(flat: list[Extent], size: int, offset: int, data: bool) -> int | None:
    if not 0 <= offset < size:
        return None
    for e in flat:
        if e.offset + e.length > offset and (e.id is not None) == data:
            return max(e.offset, offset)
    return None if data else size


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seek_data_and_hole_as_lseek_defines_them(seed: int) -> None:
    record, segments, flat = _image(seed)
    m = ExtentMap(record, segments.__getitem__)
    rng = random.Random(seed)
    offsets = [-1, 0, record.size - 1, record.size, record.size + 5] + [e.offset for e in flat] + \
        [e.offset + e.length - 1 for e in flat] + [rng.randrange(record.size) for _ in range(300)]
    for offset in offsets:
        for data in (True, False):
            assert m.seek(offset, data) == _brute_seek(flat, record.size, offset, data), (offset, data)
    assert m.allocated() == sum(e.length for e in flat if e.id is not None)


def test_seek_over_whole_segments_without_what_is_sought() -> None:
    """All data, then all zeros, then data: skipping whole segments still lands on the right extent."""
    segs = [Segment([100, 200], [_cid(1), _cid(2)]), Segment([50, 50], [None, None]), Segment([7, 9], [_cid(3), None])]
    by_id = {blob_id(s.encode()): s for s in segs}
    record = SnapshotRecord(name="img", time="2026-01-01T00:00:00+00:00", size=416, image_hash=bytes(32),
                            segments=[(i, s.size) for i, s in by_id.items()])
    m = ExtentMap(record, by_id.__getitem__)
    assert [m.seek(o, False) for o in (0, 299, 300, 399)] == [300, 300, 300, 399]
    assert [m.seek(o, True) for o in (0, 300, 350, 400, 406, 407, 415)] == [0, 400, 400, 400, 406, None, None]
    assert m.allocated() == 307
