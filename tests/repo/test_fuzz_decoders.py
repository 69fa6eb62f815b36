"""Malformed input: hypothesis fuzzing of the pack, manifest and config decoders.

Whatever the bytes, a decoder either returns a correct decode or raises the documented DedupimgError
subclass (IntegrityError for stored data, UnsupportedFormat for the config) with a one-line message naming
what is damaged: never another exception, never a hang (hypothesis deadline), never a huge allocation
(the address space is capped while this module runs, and the hostile length claims are also checked with
tracemalloc).

Inputs: arbitrary bytes; real encodings from the real encoders, mutated (flips, truncation, extension,
splices, planted length fields); structurally valid msgpack/JSON with wrong types and huge length claims.
"""

from __future__ import annotations

import functools
import json
import struct
import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedupimg.core.config import ChunkerParams, Config, SegmentParams
from dedupimg.core.errors import DedupimgError, IntegrityError, UnsupportedFormat
from dedupimg.core.manifest import ID_LEN, Segment, SnapshotRecord, chunker_dict, decode_segment
from dedupimg.repo import pack
from tests.helpers import det_bytes, record, text_bytes
from tests.packfiles import open_file, trailer, write_pack

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=1),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WHERE = "fuzz.pack"

# -- guards -----------------------------------------------------------------------------------------------


def _vm_size() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.fixture(autouse=True, scope="module")
def _bounded_address_space() -> Iterator[None]:
    """While this module runs, allocating more than ~1 GiB at once raises MemoryError (a test failure).

    No decoder may allocate more than MAX_BLOB (64 MiB) for one input, so the headroom is ample.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    vm = _vm_size() if sys.platform.startswith("linux") else None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = None if vm is None else vm + (1 << 30)
    if limit is not None and hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if limit is None or (soft != resource.RLIM_INFINITY and soft <= limit):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def clean(fn: Callable[..., Any], *args: Any, error: type[DedupimgError] = IntegrityError, about: str = "") -> Any:
    """``fn(*args)``, or None if it raised ``error`` with a clear message; anything else escapes (a failure)."""
    try:
        return fn(*args)
    except DedupimgError as exc:
        assert isinstance(exc, error), f"{type(exc).__name__} instead of {error.__name__}: {exc}"
        msg = str(exc)
        assert msg.strip(), "empty message"
        assert len(msg.splitlines()) == 1, f"message is not one line: {msg!r}"
        assert len(msg) < 1000, f"message too long: {len(msg)} chars"
        assert about in msg, f"message does not say what is damaged ({about!r}): {msg}"
        return None


@functools.cache
def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="dedupimg-fuzz-"))


def write_file(data: bytes) -> Path:
    path = _scratch() / "fuzz.pack"
    path.write_bytes(data)
    return path


# -- a real pack, built by the real writer ----------------------------------------------------------------


@dataclass(frozen=True)
class BasePack:
    data: bytes
    entries: list[pack.BlobEntry]
    blobs: list[tuple[int, bytes]]  # (type, raw) in file order
    trailer_offset: int
    trailer: bytes

    @property
    def body(self) -> bytes:
        return self.data[: self.trailer_offset]


def _record(segments: list[tuple[bytes, int]]) -> SnapshotRecord:
    """A record with every field set, so that every field's encoding is fuzzed."""
    return record(
        "vm1", "2026-01-02T03:04:05.123456+01:00", ["a", "b"], segments, image_hash=det_bytes(9, 32),
        source="/images/vm1.img", host="host", chunker=chunker_dict(ChunkerParams()),
        stats={"bytes_read": 1, "bytes_new": 2, "chunks_new": 3},
    )


@functools.cache
def base_pack() -> BasePack:
    root = _scratch() / "base"
    (root / "tmp").mkdir(parents=True)
    for i in range(256):
        (root / "packs" / f"{i:02x}").mkdir(parents=True)
    chunks = [text_bytes(1, 3000), det_bytes(2, 600), b"x"]
    ids = [pack.blob_id(c) for c in chunks]
    segment = Segment([3000, 4096, 600, 1], [ids[0], None, ids[1], ids[2]]).encode()
    record = _record([(pack.blob_id(segment), 3000 + 4096 + 600 + 1)]).encode()
    blobs = [(pack.CHUNK, c) for c in chunks] + [(pack.SEGMENT, segment), (pack.SNAPSHOT, record)]
    comp = pack.Compressor(3)
    _, path, size = write_pack(root, [(type_, pack.blob_id(raw), *comp.encode(raw), len(raw)) for type_, raw in blobs])
    data = path.read_bytes()
    assert len(data) == size
    entries = trailer(path)
    assert entries[0].codec == pack.ZSTD and entries[1].codec == pack.RAW  # both codecs are fuzzed
    t_off, t_len = pack.FOOTER.unpack(data[-pack.FOOTER.size :])[:2]
    return BasePack(data, entries, blobs, t_off, data[t_off : t_off + t_len])


def with_footer(body: bytes, trailer: bytes, count: int) -> bytes:
    """A pack whose footer is consistent with ``trailer`` (right offset, length and hash), so the trailer's
    msgpack is what gets parsed."""
    footer = pack.FOOTER.pack(len(body), len(trailer), count, pack.blob_id(trailer), pack.FOOTER_MAGIC)
    return body + trailer + footer


# -- strategies -------------------------------------------------------------------------------------------

INTERESTING_INTS = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, pack.MAX_BLOB,
                    pack.MAX_BLOB + 1, 2**40, 2**63 - 1, 2**64 - 1]


@st.composite
def mutated(draw: st.DrawFn, base: bytes, hot: tuple[int, ...] = ()) -> bytes:
    """``base`` with one to four damages; ``hot`` offsets (header fields, say) are favoured for planted ints."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        op = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "delete", "int", "int"]))
        if op == "flip" and n:
            data[draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, n)) :]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "splice":
            i = draw(st.integers(0, n))
            data[i : draw(st.integers(i, min(n, i + 64)))] = draw(st.binary(max_size=64))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del data[i : draw(st.integers(i + 1, min(n, i + 64)))]
        elif op == "int":
            fmt = draw(st.sampled_from(["<B", "<H", "<I", "<Q", ">H", ">I", ">Q"]))
            size = struct.calcsize(fmt)
            value = draw(st.sampled_from(INTERESTING_INTS)) & ((1 << (8 * size)) - 1)
            if hot and draw(st.booleans()):
                i = draw(st.sampled_from(hot))
            else:
                i = draw(st.integers(0, n))
            data[i : i + size] = struct.pack(fmt, value)
    return bytes(data)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from(INTERESTING_INTS),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.binary(min_size=32, max_size=32),
)
MSGPACK_VALUES = st.recursive(
    _scalars,
    lambda c: st.one_of(
        st.lists(c, max_size=8),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=8)), c, max_size=8),
    ),
    max_leaves=12,
)

# msgpack headers that claim huge lengths (array32, map32, bin32, str32, ext32, array16) and deep nesting
HUGE_HEADERS = [b"\xdd\xff\xff\xff\xff", b"\xdd\x00\x40\x00\x00", b"\xdd\x01\x00\x00\x00", b"\xdf\xff\xff\xff\xff",
                b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\xdc\xff\xff"]


def hostile_msgpack(prefix_values: st.SearchStrategy[Any] = MSGPACK_VALUES) -> st.SearchStrategy[bytes]:
    packed = prefix_values.map(lambda v: msgpack.packb(v, use_bin_type=True))
    return st.one_of(
        packed,
        st.tuples(st.sampled_from(HUGE_HEADERS), st.binary(max_size=64)).map(b"".join),
        st.tuples(st.sampled_from([b"\x92\x01", b"\x92", b"\x91", b"\x81\xa1v", b""]), st.sampled_from(HUGE_HEADERS),
                  st.binary(max_size=32)).map(b"".join),
        st.tuples(st.integers(1, 3000), st.sampled_from([b"\x91", b"\x81\xa1a", b"\x92\x01"])).map(
            lambda t: t[1] * t[0] + b"\xc0"
        ),
        packed.flatmap(mutated),
    )


# -- sanity: the unmutated encodings decode correctly -----------------------------------------------------


def test_base_encodings_decode_correctly() -> None:
    base = base_pack()
    path = write_file(base.data)
    assert trailer(path) == base.entries
    with open_file(path) as reader:
        got = [pack.read_blob(reader, e, WHERE) for e in base.entries]
        locs = [(e.offset, e.id, e.type, e.stored_len) for e in base.entries]
        run = pack.read_blob_run(reader, 8, base.trailer_offset - 8, locs, WHERE)
    assert got == base.blobs
    assert run == [raw for _, raw in base.blobs]
    seg = decode_segment(base.blobs[3][1])
    assert seg.size == 3000 + 4096 + 600 + 1
    rec = SnapshotRecord.decode(base.blobs[4][1])
    assert rec.id == pack.blob_id(base.blobs[4][1]) and rec.segments == [(pack.blob_id(base.blobs[3][1]), seg.size)]


# -- packs ------------------------------------------------------------------------------------------------


def check_entries(entries: list[pack.BlobEntry], data: bytes) -> None:
    """A successful read_trailer: every documented structural check holds."""
    t_off = struct.unpack_from("<Q", data, len(data) - pack.FOOTER.size)[0]
    for e in entries:
        assert isinstance(e.id, bytes) and len(e.id) == 32
        for v in (e.type, e.codec, e.offset, e.raw_len, e.stored_len):
            assert type(v) is int and v >= 0
        assert e.offset + pack.BLOB_HEADER.size + e.stored_len <= t_off


def read_pack(data: bytes) -> list[pack.BlobEntry] | None:
    path = write_file(data)
    entries = clean(trailer, path, about=str(path))
    if entries is not None:
        check_entries(entries, data)
    return entries


def read_blobs(data: bytes, base: BasePack) -> None:
    """Read every blob of ``base`` from ``data`` at its original offset: the original blob or IntegrityError."""
    path = write_file(data)
    with open_file(path) as reader:
        for e, blob in zip(base.entries, base.blobs, strict=True):
            got = clean(pack.read_blob, reader, e, WHERE, about=WHERE)
            if got is not None:
                # The id covers the raw bytes, not the header's type byte (a flipped one reads back as
                # another valid type): the bytes must be the original ones.
                assert got[1] == blob[1] and got[0] in pack.BLOB_TYPES
        locs = [(e.offset, e.id, e.type, e.stored_len) for e in base.entries]
        got = clean(pack.read_blob_run, reader, 8, base.trailer_offset - 8, locs, WHERE, about=WHERE)
        assert got is None or got == [raw for _, raw in base.blobs]


@FUZZ
@given(st.binary(max_size=4096))
def test_read_trailer_arbitrary_bytes(data: bytes) -> None:
    read_pack(data)


@FUZZ
@given(st.binary(max_size=2048), st.binary(max_size=2048), st.integers(0, 2**32 - 1))
def test_read_trailer_arbitrary_trailer_with_valid_footer(body: bytes, trailer: bytes, count: int) -> None:
    read_pack(with_footer(pack.PACK_MAGIC + body, trailer, count))


def _header_hot_offsets() -> tuple[int, ...]:
    out = []
    for e in base_pack().entries:
        out += [e.offset + 2, e.offset + 3, e.offset + 4, e.offset + 8]  # type, codec, raw_len, stored_len
    return tuple(out)


@FUZZ
@given(st.data())
def test_mutated_real_pack(data: st.DataObject) -> None:
    base = base_pack()
    hot = _header_hot_offsets() + tuple(len(base.data) - pack.FOOTER.size + i for i in (0, 8, 12))
    damaged = data.draw(mutated(base.data, hot))
    entries = read_pack(damaged)
    if damaged == base.data:
        assert entries == base.entries
    read_blobs(damaged, base)


@FUZZ
@given(st.data())
def test_mutated_real_trailer_with_valid_footer(data: st.DataObject) -> None:
    base = base_pack()
    trailer = data.draw(mutated(base.trailer))
    count = data.draw(st.one_of(st.just(len(base.entries)), st.sampled_from(INTERESTING_INTS[:10])))
    entries = read_pack(with_footer(base.body, trailer, count))
    if trailer == base.trailer and count == len(base.entries):
        assert entries == base.entries


_ids32 = st.binary(min_size=32, max_size=32)
_row_int = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(INTERESTING_INTS), st.integers(-(2**63), -1),
                     st.booleans(), st.floats(), st.none())
_rows = st.lists(
    st.one_of(
        st.tuples(_row_int, _row_int, _row_int, _row_int, _row_int,
                  st.one_of(_ids32, st.binary(max_size=40), st.text(max_size=32))).map(list),
        st.lists(st.integers(0, 100), min_size=6, max_size=6),
        MSGPACK_VALUES,
    ),
    max_size=8,
)


@FUZZ
@given(st.one_of(_rows.map(lambda r: msgpack.packb(r, use_bin_type=True)), hostile_msgpack()),
       st.one_of(st.none(), st.integers(0, 2**32 - 1), st.sampled_from(INTERESTING_INTS[:10])))
@pytest.mark.slow
def test_trailer_wrong_types_and_huge_claims(trailer: bytes, count: int | None) -> None:
    base = base_pack()
    if count is None:  # the footer agrees with the array header, whatever it claims
        unpacker = msgpack.Unpacker()
        unpacker.feed(trailer)
        try:
            count = unpacker.read_array_header() & 0xFFFFFFFF
        except (ValueError, msgpack.UnpackException):
            count = 0
    read_pack(with_footer(base.body, trailer, count))


def _blob(type_: int, codec: int, raw_len: int, stored: bytes, id_: bytes) -> bytes:
    return pack.BLOB_HEADER.pack(pack.BLOB_MAGIC, type_, codec, raw_len, len(stored), id_) + stored


def zstd_frame(content_size: int, payload: bytes) -> bytes:
    """A zstd frame whose header claims ``content_size`` bytes, with one raw block of ``payload``."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", content_size)  # single segment, 8-byte size
    return header + ((len(payload) << 3) | 1).to_bytes(3, "little") + payload


_stored = st.one_of(
    st.binary(max_size=512),
    st.tuples(st.sampled_from(INTERESTING_INTS[:-1] + [3, 100]), st.binary(max_size=64)).map(lambda t: zstd_frame(*t)),
    st.binary(max_size=2000).map(lambda b: zstandard.ZstdCompressor().compress(b)).flatmap(mutated),
    st.binary(max_size=2000).map(lambda b: zstandard.ZstdCompressor(write_content_size=False).compress(b)),
)


@FUZZ
@given(st.integers(0, 255), st.integers(0, 255), st.one_of(st.integers(0, 4096), st.sampled_from(INTERESTING_INTS)),
       _stored, st.binary(max_size=64), st.integers(-8, 200))
def test_read_blob_crafted_headers(type_: int, codec: int, raw_len: int, stored: bytes, junk: bytes, at: int) -> None:
    """The header's id is the id asked for, so parsing reaches the codec: random codec, lengths, frames."""
    raw_len &= 0xFFFFFFFF  # the header field is a u32
    id_ = pack.blob_id(stored)
    blob = _blob(type_, codec, raw_len, stored, id_)
    path = write_file(pack.PACK_MAGIC + blob + junk)
    with open_file(path) as reader:
        entry = pack.BlobEntry(type_, codec, 8, raw_len, len(stored), id_)
        got = clean(pack.read_blob, reader, entry, WHERE, about=WHERE)
        if got is not None:
            assert got[0] in pack.BLOB_TYPES and pack.blob_id(got[1]) == id_
            assert len(got[1]) == raw_len
        at_entry = pack.BlobEntry(type_, codec, at, raw_len, len(stored), id_)
        clean(pack.read_blob, reader, at_entry, WHERE, about=WHERE)  # wrong or negative offsets
        run = clean(pack.read_blob_run, reader, 8, len(blob) + len(junk),
                    [(8, id_, type_, len(stored)), (8 + at, id_, type_, len(stored))], WHERE, about=WHERE)
        assert run is None or all(pack.blob_id(r) == id_ for r in run)


@FUZZ
@given(st.integers(0, 3), _stored, st.one_of(st.integers(0, 4096), st.sampled_from(INTERESTING_INTS)))
def test_decode_blob(codec: int, stored: bytes, raw_len: int) -> None:
    raw = clean(pack.decode_blob, codec, stored, raw_len, about="blob")
    assert raw is None or len(raw) == raw_len


@pytest.mark.parametrize("claim", [2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 3])
def test_zstd_size_claim_allocates_nothing(claim: int) -> None:
    """zstandard allocates what a frame header claims, whatever max_output_size says: it must not get there."""
    frame = zstd_frame(claim, b"abc")
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="claims"):
            pack.decode_blob(pack.ZSTD, frame, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_blob_header_claiming_4_gib_is_damaged() -> None:
    stored = b"abc"
    id_ = pack.blob_id(stored)
    path = write_file(pack.PACK_MAGIC + _blob(pack.CHUNK, pack.RAW, 2**32 - 1, stored, id_))
    with open_file(path) as reader, pytest.raises(IntegrityError, match="damaged"):
        pack.read_blob(reader, pack.BlobEntry(pack.CHUNK, pack.RAW, 8, 2**32 - 1, len(stored), id_), WHERE)


def _small_peak(fn: Callable[[], object], error: type[DedupimgError]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(error):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("header", HUGE_HEADERS + [b"\xdd\x00\x3f\xff\xff", b"\xdd\x00\xff\xff\xff"])
def test_huge_length_claims_allocate_nothing(header: bytes) -> None:
    base = base_pack()
    path = write_file(with_footer(base.body, header + b"\x00" * 16, 2**32 - 1))
    assert _small_peak(lambda: trailer(path), IntegrityError) < 1 << 20
    for prefix in (b"", b"\x92\x01"):
        assert _small_peak(lambda: decode_segment(prefix + header), IntegrityError) < 1 << 20  # noqa: B023
    assert _small_peak(lambda: SnapshotRecord.decode(header), IntegrityError) < 1 << 20


@pytest.mark.parametrize("unit", [b"\x91", b"\x81\xa1a", b"\x92\x01"])
def test_deep_nesting(unit: bytes) -> None:
    deep = unit * 10_000 + b"\xc0"
    base = base_pack()
    with pytest.raises(IntegrityError):
        trailer(write_file(with_footer(base.body, deep, 1)))
    with pytest.raises(IntegrityError):
        decode_segment(deep)
    with pytest.raises(IntegrityError):
        SnapshotRecord.decode(deep)


# -- manifest segments ------------------------------------------------------------------------------------

_ids = st.binary(min_size=32, max_size=32)
_extents = st.lists(st.tuples(st.integers(1, 2**64 - 1), st.one_of(st.none(), _ids)), max_size=40)


def check_segment(seg: Segment) -> None:
    assert len(seg.lengths) == len(seg.ids)
    for n, i in seg.extents():
        assert type(n) is int and n > 0
        assert i is None or (type(i) is bytes and len(i) == ID_LEN)
    assert decode_segment(seg.encode()) == seg


@FUZZ
@given(st.binary(max_size=4096))
def test_segment_arbitrary_bytes(raw: bytes) -> None:
    seg = clean(decode_segment, raw, about="manifest segment")
    if seg is not None:
        check_segment(seg)


@pytest.mark.slow
@FUZZ
@given(_extents, st.data())
def test_segment_mutated(ext: list[tuple[int, bytes | None]], data: st.DataObject) -> None:
    seg = Segment([n for n, _ in ext], [i for _, i in ext])
    raw = seg.encode()
    damaged = data.draw(mutated(raw))
    got = clean(decode_segment, damaged, about="manifest segment")
    if damaged == raw:
        assert got == seg
    if got is not None:
        check_segment(got)


_extent_value = st.one_of(st.integers(-(2**63), 2**64 - 1), st.booleans(), st.floats(), st.none(), _ids,
                          st.binary(max_size=40), MSGPACK_VALUES)


@pytest.mark.slow
@FUZZ
@given(st.one_of(
    st.tuples(st.one_of(st.just(1), st.just(True), st.just(1.0), _scalars), st.lists(_extent_value, max_size=12))
    .map(lambda t: msgpack.packb(list(t), use_bin_type=True)),
    hostile_msgpack(),
))
def test_segment_wrong_types_and_huge_claims(raw: bytes) -> None:
    seg = clean(decode_segment, raw, about="manifest segment")
    if seg is not None:
        check_segment(seg)


# -- snapshot records -------------------------------------------------------------------------------------

_times = st.tuples(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(-14 * 60, 14 * 60),
).map(lambda t: t[0].replace(tzinfo=timezone(timedelta(minutes=t[1]))).isoformat())


@st.composite
def records(draw: st.DrawFn) -> SnapshotRecord:
    segments = draw(st.lists(st.tuples(_ids, st.integers(0, 2**50)), max_size=6))
    return SnapshotRecord(
        name=draw(st.text(max_size=20)), time=draw(_times), size=sum(n for _, n in segments),
        image_hash=draw(_ids), segments=segments, source=draw(st.text(max_size=20)), host=draw(st.text(max_size=10)),
        tags=sorted(set(draw(st.lists(st.text(max_size=5), max_size=4)))),
        chunker=chunker_dict(ChunkerParams()),
        stats=draw(st.dictionaries(st.sampled_from(["bytes_read", "bytes_new", "chunks_new"]), st.integers(0, 2**40))),
        hash_of=draw(st.sampled_from(["image", "extents"])),
    )


def check_record(rec: SnapshotRecord, raw: bytes) -> None:
    assert rec.id == pack.blob_id(raw)
    assert type(rec.name) is str and type(rec.time) is str and type(rec.source) is str and type(rec.host) is str
    assert type(rec.size) is int and rec.size >= 0
    assert type(rec.image_hash) is bytes and len(rec.image_hash) == ID_LEN
    assert all(type(sid) is bytes and len(sid) == ID_LEN and type(n) is int and n >= 0 for sid, n in rec.segments)
    assert sum(n for _, n in rec.segments) == rec.size
    assert all(type(t) is str for t in rec.tags)
    assert isinstance(rec.chunker, dict) and isinstance(rec.stats, dict)
    assert rec.datetime.tzinfo is not None  # records sort by time: naive and aware times do not compare
    again = SnapshotRecord.decode(rec.encode())
    assert (again.name, again.time, again.size, again.image_hash, again.segments) == (
        rec.name, rec.time, rec.size, rec.image_hash, rec.segments)


@FUZZ
@given(st.binary(max_size=4096))
def test_record_arbitrary_bytes(raw: bytes) -> None:
    rec = clean(SnapshotRecord.decode, raw, about="snapshot record")
    if rec is not None:
        check_record(rec, raw)


@pytest.mark.slow
@FUZZ
@given(records(), st.data())
def test_record_mutated(rec: SnapshotRecord, data: st.DataObject) -> None:
    raw = rec.encode()
    damaged = data.draw(mutated(raw))
    got = clean(SnapshotRecord.decode, damaged, about="snapshot record")
    if damaged == raw:
        assert got == rec
    if got is not None:
        check_record(got, damaged)


_KEYS = ["v", "name", "time", "size", "hash", "segments", "source", "host", "tags", "chunker", "stats"]
_near_values = st.one_of(
    MSGPACK_VALUES,
    st.sampled_from([True, 1.0, float("inf"), float("nan"), 2**64 - 1, -1, 2**40, "2026-01-02T03:04:05",
                     "not a time", "2026-01-02T03:04:05+01:00", b"\x00" * 31, [], {}]),
    st.lists(st.one_of(st.tuples(st.one_of(st.integers(0, 2**64 - 1), _ids, st.binary(max_size=8)),
                                 st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=4)))
                       .map(list), MSGPACK_VALUES), max_size=4),
)


@FUZZ
@given(records(), st.lists(st.tuples(st.sampled_from(_KEYS + ["extra"]), st.booleans(), _near_values), max_size=4))
@pytest.mark.slow
def test_record_wrong_types(rec: SnapshotRecord, changes: list[tuple[str, bool, Any]]) -> None:
    doc = msgpack.unpackb(rec.encode(), raw=False)
    for key, delete, value in changes:
        if delete:
            doc.pop(key, None)
        else:
            doc[key] = value
    raw = msgpack.packb(doc, use_bin_type=True)
    got = clean(SnapshotRecord.decode, raw, about="snapshot record")
    if got is not None:
        check_record(got, raw)


@FUZZ
@given(hostile_msgpack())
@pytest.mark.slow
def test_record_huge_claims(raw: bytes) -> None:
    got = clean(SnapshotRecord.decode, raw, about="snapshot record")
    if got is not None:
        check_record(got, raw)


def test_record_int_where_bytes_belong_allocates_nothing() -> None:
    """``bytes(n)`` of a damaged int field would allocate n bytes."""
    doc = msgpack.unpackb(_record([(b"\x01" * 32, 5)]).encode(), raw=False)
    for key, value in [("hash", 2**40), ("segments", [[2**40, 5]]), ("segments", [b"\xff\xff"]), ("size", 2**63)]:
        bad = dict(doc, **{key: value})
        raw = msgpack.packb(bad, use_bin_type=True)
        assert _small_peak(lambda: SnapshotRecord.decode(raw), IntegrityError) < 1 << 20  # noqa: B023


# -- config -----------------------------------------------------------------------------------------------

configs = st.builds(
    Config,
    repo_id=st.text("0123456789abcdef", min_size=32, max_size=32),
    chunker=st.integers(10, 20).map(lambda k: ChunkerParams.for_average(1 << k)),
    segments=st.builds(SegmentParams, cut_mask=st.integers(0, 0xFFFF), max_extents=st.integers(1, 1 << 20),
                       zero_cut=st.integers(0, 1 << 40)),
    compression_level=st.integers(-7, 22),
    pack_size=st.integers(1 << 16, 1 << 30),
    version=st.sampled_from([1, 3]),  # unencrypted: before deltas, and with them
)


def check_config(cfg: Config) -> None:
    for params in (cfg.chunker, cfg.segments):
        for f in fields(params):
            value = getattr(params, f.name)
            assert type(value) is (str if f.name == "algorithm" else int), (f.name, value)
    assert type(cfg.compression_level) is int and type(cfg.pack_size) is int and type(cfg.version) is int
    assert cfg.version in (1, 3) and not cfg.encrypted and cfg.chunker.algorithm == "fastcdc2020"
    assert Config.from_bytes(cfg.to_bytes()) == cfg


def load_config(data: bytes) -> None:
    cfg = clean(Config.from_bytes, data, "fuzzconfig", error=UnsupportedFormat, about="fuzzconfig")
    if cfg is not None:
        check_config(cfg)


@FUZZ
@given(st.one_of(st.binary(max_size=4096), st.text(max_size=2000).map(str.encode)))
def test_config_arbitrary_bytes(data: bytes) -> None:
    load_config(data)


@FUZZ
@given(configs, st.data())
def test_config_mutated(cfg: Config, data: st.DataObject) -> None:
    raw = cfg.to_bytes()
    assert Config.from_bytes(raw) == cfg
    damaged = data.draw(mutated(raw))
    load_config(damaged)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(INTERESTING_INTS), st.floats(),
              st.text(max_size=20)),
    lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(st.text(max_size=8), c, max_size=5)),
    max_leaves=12,
)
_CONFIG_PATHS = (["format", "version", "hash", "repo_id", "compression", "compression_level", "pack_size",
                  "chunker", "segments", "extra"]
                 + [f"chunker.{f.name}" for f in fields(ChunkerParams)] + ["chunker.extra\nkey"]
                 + [f"segments.{f.name}" for f in fields(SegmentParams)] + ["segments.extra"])


@FUZZ
@given(configs, st.lists(st.tuples(st.sampled_from(_CONFIG_PATHS), st.booleans(),
                                   st.one_of(JSON_VALUES, st.sampled_from([True, 1.0, 16384.0, float("inf"),
                                                                           float("nan"), "16384", -1, 2**70]))),
                         max_size=4))
def test_config_wrong_types(cfg: Config, changes: list[tuple[str, bool, Any]]) -> None:
    doc = json.loads(cfg.to_bytes())
    for path, delete, value in changes:
        *parents, key = path.split(".", 1)
        target = doc
        for p in parents:
            target = target.get(p) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        if delete:
            target.pop(key, None)
        else:
            target[key] = value
    load_config(json.dumps(doc).encode())  # json.dumps writes inf and nan as Infinity and NaN


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999", "true", "16384.0", "16384.5",
                                     '"16384"', "9" * 5000, "[]", "{}", "null", "[" * 100_000])
def test_config_hostile_literals(literal: str) -> None:
    text = Config().to_bytes().decode()
    for key in ("avg_size", "compression_level", "pack_size", "version", "seed", "zero_cut"):
        start = text.index(f'"{key}": ') + len(key) + 4
        end = min(i for i in (text.find(",", start), text.find("\n", start)) if i >= 0)
        with pytest.raises(UnsupportedFormat):
            Config.from_bytes((text[:start] + literal + text[end:]).encode())


def test_config_unknown_key_message_is_one_line() -> None:
    doc = json.loads(Config().to_bytes())
    doc["chunker"]["bad\nkey"] = 1
    with pytest.raises(UnsupportedFormat) as info:
        Config.from_bytes(json.dumps(doc).encode())
    assert len(str(info.value).splitlines()) == 1 and "chunker" in str(info.value)


def test_config_deep_nesting() -> None:
    for data in (b"[" * 100_000, b'{"a":' * 100_000):
        with pytest.raises(UnsupportedFormat):
            Config.from_bytes(data)


def test_every_decoder_error_is_a_dedupimg_error() -> None:
    assert issubclass(IntegrityError, DedupimgError) and IntegrityError.exit_code == 17
    assert issubclass(UnsupportedFormat, DedupimgError) and UnsupportedFormat.exit_code == 12
