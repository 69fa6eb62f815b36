from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedupimg.core.config import SegmentParams
from dedupimg.core.errors import IntegrityError
from dedupimg.core.manifest import Segment, SegmentBuilder, SnapshotRecord, decode_segment
from dedupimg.repo.pack import blob_id

ids = st.binary(min_size=32, max_size=32)
extents = st.lists(st.tuples(st.integers(1, 1 << 40), st.one_of(st.none(), ids)), max_size=50)


@settings(max_examples=60, deadline=None)
@given(extents)
def test_segment_round_trip(ext):
    seg = Segment([n for n, _ in ext], [i for _, i in ext])
    back = decode_segment(seg.encode())
    assert back == seg
    assert back.size == sum(n for n, _ in ext)


def test_segment_encoding_is_stable():
    seg = Segment([4096, 100], [b"\x01" * 32, None])
    # msgpack: [1, [4096, bin32, 100, nil]]: a change here is a format change.
    assert seg.encode().hex() == "9201" + "94" + "cd1000" + "c420" + "01" * 32 + "64" + "c0"


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x92\x02\x90", b"\x92\x01\x91\x05", b"\x92\x01\x92\x00\xc0"])
def test_damaged_segments_are_rejected(raw):
    with pytest.raises(IntegrityError):
        decode_segment(raw)


def _collect(params: SegmentParams):
    out: list[Segment] = []
    return out, SegmentBuilder(params, out.append)


def test_builder_merges_zero_runs_and_cuts_on_id_pattern():
    out, b = _collect(SegmentParams(cut_mask=0xFF, max_extents=100, zero_cut=1000))
    cut_id = b"\x00" * 32  # last two bytes & 0xFF == 0: cut after it
    plain = b"\x01" * 32
    b.add_chunk(10, plain)
    b.add_zero(5)
    b.add_zero(7)
    b.add_chunk(10, cut_id)
    b.add_chunk(3, plain)
    b.flush()
    assert [s.lengths for s in out] == [[10, 12, 10], [3]]
    assert out[0].ids == [plain, None, cut_id]


def test_builder_cuts_after_long_zero_runs_and_at_max_extents():
    out, b = _collect(SegmentParams(cut_mask=0xFFFF, max_extents=3, zero_cut=1000))
    plain = b"\x01" * 32
    b.add_chunk(10, plain)
    b.add_zero(2000)
    b.add_chunk(10, plain)  # the long zero run ended the first segment
    b.add_chunk(10, plain)
    b.add_chunk(10, plain)
    b.add_chunk(10, plain)  # three extents: forced cut before this one
    b.flush()
    assert [s.lengths for s in out] == [[10, 2000], [10, 10, 10], [10]]


def test_snapshot_record_round_trip_and_id():
    rec = SnapshotRecord(
        name="vm1", time="2026-01-02T03:04:05+01:00", size=12, image_hash=b"\x02" * 32,
        segments=[(b"\x03" * 32, 12)], tags=["a"], stats={"bytes_read": 12},
    )
    raw = rec.encode()
    back = SnapshotRecord.decode(raw)
    assert back.id == rec.id == blob_id(raw)
    assert (back.name, back.time, back.size, back.segments, back.tags) == (rec.name, rec.time, 12, rec.segments, ["a"])


def test_changed_during_read_is_backward_compatible():
    """Written only when true: an unchanged source's record has the 11 keys (and id) it always had, a record
    without the key decodes as unchanged, and a marked one round-trips."""
    import msgpack

    fields = dict(name="vm1", time="2026-01-02T03:04:05+01:00", size=12, image_hash=b"\x02" * 32,
                  segments=[(b"\x03" * 32, 12)])
    plain = SnapshotRecord(**fields).encode()
    doc = msgpack.unpackb(plain, raw=False)
    assert len(doc) == 11 and "changed_during_read" not in doc and plain[0] == 0x8B
    assert SnapshotRecord.decode(plain).changed_during_read is False
    marked = SnapshotRecord(**fields, changed_during_read=True).encode()
    assert marked[0] == 0x8C and msgpack.unpackb(marked, raw=False)["changed_during_read"] is True
    assert SnapshotRecord.decode(marked).changed_during_read is True
    bad = msgpack.packb({**doc, "changed_during_read": 1}, use_bin_type=True)  # an int is not a bool
    with pytest.raises(IntegrityError):
        SnapshotRecord.decode(bad)


def test_derived_hash_records_are_version_2_and_marked():
    """An incremental snapshot's record (hash of its extents) is version 2 with ``hash_of``: a reader of
    version 1 refuses it rather than compare an image with it; a version 1 record never carries the mark."""
    import msgpack

    fields = dict(name="vm1", time="2026-01-02T03:04:05+01:00", size=12, image_hash=b"\x02" * 32,
                  segments=[(b"\x03" * 32, 12)])
    plain = SnapshotRecord(**fields).encode()
    derived = SnapshotRecord(**fields, hash_of="extents").encode()
    doc = msgpack.unpackb(derived, raw=False)
    assert doc["v"] == 2 and doc["hash_of"] == "extents" and "hash_of" not in msgpack.unpackb(plain, raw=False)
    assert SnapshotRecord.decode(derived).hash_derived and not SnapshotRecord.decode(plain).hash_derived
    for bad in ({**doc, "v": 1}, {**doc, "hash_of": "image"}, {k: v for k, v in doc.items() if k != "hash_of"},
                {**doc, "v": 3}, {**doc, "hash_of": 1}):
        with pytest.raises(IntegrityError):
            SnapshotRecord.decode(msgpack.packb(bad, use_bin_type=True))


def test_extents_digest_joins_zero_runs_and_depends_on_every_extent():
    from dedupimg.core.manifest import ExtentsDigest, Segment

    a, b = b"\x0a" * 32, b"\x0b" * 32

    def digest(*segments: Segment) -> bytes:
        d = ExtentsDigest()
        for s in segments:
            d.add(s)
        return d.digest()

    one = digest(Segment([5, 100, 7], [a, None, b]))
    # A zero run split by a segment boundary (or in two extents) is the same image, the same manifest's digest.
    assert digest(Segment([5, 60], [a, None]), Segment([40, 7], [None, b])) == one
    assert digest(Segment([5, 60, 40, 7], [a, None, None, b])) == one
    for other in (Segment([5, 101, 7], [a, None, b]), Segment([5, 100, 7], [b, None, b]),
                  Segment([5, 100, 7], [a, a, b]), Segment([5, 107], [a, None])):
        assert digest(other) != one
    assert digest(Segment([1], [None])) != digest(Segment([2], [None])) != digest()


def test_snapshot_record_rejects_inconsistent_sizes():
    rec = SnapshotRecord(name="x", time="2026-01-02T03:04:05+00:00", size=13, image_hash=b"\x02" * 32,
                         segments=[(b"\x03" * 32, 12)])
    with pytest.raises(IntegrityError):
        SnapshotRecord.decode(rec.encode())


_extent_items = st.lists(
    st.one_of(
        st.tuples(st.just("zero"), st.integers(1, 3000)),
        st.tuples(st.just("chunks"), st.lists(st.tuples(st.integers(1, 100), st.binary(min_size=32, max_size=32)),
                                              max_size=40)),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(items=_extent_items, mask=st.sampled_from([0, 1, 3, 0xFF]), most=st.integers(1, 7))
def test_add_chunks_builds_the_segments_add_chunk_does(items, mask, most):
    """The bulk form (reused extents, whole batches) against one call per chunk: the same segments, cut at the
    same content-defined, zero-run and size boundaries."""
    params = SegmentParams(cut_mask=mask, max_extents=most, zero_cut=1000)
    one, b1 = _collect(params)
    bulk, b2 = _collect(params)
    for kind, value in items:
        if kind == "zero":
            b1.add_zero(value)
            b2.add_zero(value)
        else:
            for n, id_ in value:
                b1.add_chunk(n, id_)
            b2.add_chunks([n for n, _ in value], [i for _, i in value])
    b1.flush()
    b2.flush()
    assert [(s.lengths, s.ids) for s in bulk] == [(s.lengths, s.ids) for s in one]


@settings(max_examples=300, deadline=None)
@given(extents=st.lists(st.tuples(st.integers(1, 3000), st.one_of(st.none(), st.binary(min_size=32, max_size=32))),
                        max_size=60),
       splits=st.lists(st.integers(0, 60), max_size=5),
       mask=st.sampled_from([0, 1, 3, 0xFF]), most=st.integers(1, 7))
def test_add_extents_builds_the_segments_one_call_per_extent_does(extents, splits, mask, most):
    """A batch's extents with zero chunks among them, added in bulk in arbitrary slices: the segments of add_zero
    and add_chunk one extent at a time."""
    params = SegmentParams(cut_mask=mask, max_extents=most, zero_cut=1000)
    one, b1 = _collect(params)
    bulk, b2 = _collect(params)
    for n, id_ in extents:
        if id_ is None:
            b1.add_zero(n)
        else:
            b1.add_chunk(n, id_)
    bounds = sorted({0, len(extents), *(min(s, len(extents)) for s in splits)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        b2.add_extents([n for n, _ in extents[a:b]], [i for _, i in extents[a:b]])
    b1.flush()
    b2.flush()
    assert [(s.lengths, s.ids) for s in bulk] == [(s.lengths, s.ids) for s in one]
