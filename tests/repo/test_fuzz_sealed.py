"""Malformed sealed input: hypothesis property tests of every decoder that decrypts (format version 2).

Whatever the bytes, a decoder returns the right value or raises the documented DedupimgError subclass
(IntegrityError for stored data; UnsupportedFormat for a config or key object; None from ``KeyObject.unwrap``
for a wrong password): never another exception, never a wrong value. Sealed data adds a rule: damage of any
kind (a flipped bit, bytes cut, added or taken out, a blob asked for as another type or id, another key) is
always an error, since an AEAD tag covers every byte and the associated data.

Decoders: ``SealedFormat.open_blob`` through ``pack.parse_blob`` and ``pack.read_blob`` (AES-256-GCM and
ChaCha20-Poly1305), ``SealedFormat.open_trailer`` and ``pack.read_pack_info`` on a real sealed pack,
``indexobjects.decode``, ``crypto.KeyObject.parse`` and ``unwrap``, ``config.parse_config_file`` and
``keys.open_sealed_config``. Inputs: real encodings from the real encoders, damaged; and contents that
authenticate (sealed with the key) but are malformed, as a buggy writer could make them.
"""

from __future__ import annotations

import base64
import functools
import json
from datetime import timedelta
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedupimg.core import crypto
from dedupimg.core.config import Config, SealedConfig, parse_config_file
from dedupimg.core.errors import DedupimgError, IntegrityError, UnsupportedFormat, WrongPassword
from dedupimg.core.manifest import Segment, encode_tombstone
from dedupimg.core.password import PasswordSource
from dedupimg.repo import indexobjects, keys, pack
from dedupimg.repo.index import SealedPack
from dedupimg.store.base import write_object
from dedupimg.store.memory import MemoryReader, MemoryStore
from tests.helpers import det_bytes, record, text_bytes

SETTINGS = settings(max_examples=150, deadline=timedelta(seconds=2),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEY = det_bytes(101, 32)
ID_KEY = det_bytes(102, 32)
WHERE = "sealed.fuzz"
PASSWORD = b"test-password"  # tests/conftest.py: DEDUPIMG_PASSWORD
SMALL_KDF = crypto.KdfParams(1, 64, 1)
AEADS = st.sampled_from(crypto.AEADS)


def sealed_format(aead: str = crypto.AES_GCM, key: bytes = KEY) -> pack.SealedFormat:
    return pack.SealedFormat(crypto.Aead(aead, key), ID_KEY, 64)


def outcome(fn: Any, *args: Any, allowed: tuple[type[DedupimgError], ...] = (IntegrityError,)) -> Any:
    """``fn(*args)``; None when it raised one of ``allowed`` with a one-line message. Any other exception
    fails the test."""
    try:
        return fn(*args)
    except DedupimgError as exc:
        assert isinstance(exc, allowed), f"{type(exc).__name__}: {exc}"
        assert str(exc).strip() and "\n" not in str(exc) and len(str(exc)) < 1000, repr(str(exc))
        return None


def refused(fn: Any, *args: Any, allowed: tuple[type[DedupimgError], ...] = (IntegrityError,)) -> None:
    """``fn(*args)`` must raise one of ``allowed``."""
    assert outcome(fn, *args, allowed=allowed) is None, "damaged input was accepted"


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with one to three damages, each of which changes it: a bit flipped, an end cut off, bytes
    appended, a run taken out, a run replaced."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        n = len(out)
        kind = draw(st.sampled_from(["flip", "cut", "extend", "remove", "replace"] if n else ["extend"]))
        if kind == "flip":
            out[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del out[draw(st.integers(0, n - 1)) :]
        elif kind == "extend":
            out += draw(st.binary(min_size=1, max_size=80))
        elif kind == "remove":
            i = draw(st.integers(0, n - 1))
            del out[i : draw(st.integers(i + 1, min(n, i + 80)))]
        else:
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(i + 1, min(n, i + 40)))
            new = draw(st.binary(min_size=j - i, max_size=j - i))
            if new == out[i:j]:
                new = bytes(b ^ 0xFF for b in new)
            out[i:j] = new
    if out == data:  # a later damage undid an earlier one (cut, then the same bytes appended)
        out.append(0)
    return bytes(out)


# -- blobs ------------------------------------------------------------------------------------------------

RAWS = st.one_of(st.binary(max_size=3000), st.integers(0, 5000).map(lambda n: text_bytes(n, n)))


def seal_blob(fmt: pack.SealedFormat, type_: int, raw: bytes) -> tuple[bytes, bytes, int]:
    """(sealed blob, its id, stored_len) as PackWriter writes it."""
    id_ = fmt.verify_id(type_, raw)
    codec, stored = pack.Compressor(3).encode(raw)
    pieces, stored_len = fmt.encode(type_, id_, codec, stored, len(raw))
    blob = b"".join(pieces)
    assert len(blob) == pack.blob_span(stored_len) and len(blob) % 64 == 0
    return blob, id_, stored_len


def parse(fmt: pack.BlobFormat, data: bytes, pos: int, type_: int, id_: bytes, stored_len: int) -> Any:
    return pack.parse_blob(memoryview(data), pos, type_, id_, stored_len, WHERE, 8, fmt)


@SETTINGS
@given(AEADS, st.sampled_from(sorted(pack.BLOB_TYPES)), RAWS, st.binary(max_size=70), st.data())
def test_sealed_blob_decodes_and_any_damage_is_refused(aead: str, type_: int, raw: bytes, prefix: bytes,
                                                        data: st.DataObject) -> None:
    fmt = sealed_format(aead)
    blob, id_, stored_len = seal_blob(fmt, type_, raw)
    assert parse(fmt, blob, 0, type_, id_, stored_len) == (type_, raw)
    assert parse(fmt, prefix + blob + prefix, len(prefix), type_, id_, stored_len) == (type_, raw)

    bad = data.draw(damaged(blob))
    for claim in {stored_len, len(bad) - pack.BLOB_HEADER.size}:
        got = outcome(parse, fmt, bad, 0, type_, id_, claim)
        # Bytes past the blob's span are not its bytes: only an undamaged span may decode.
        assert got is None or (got == (type_, raw) and bad[: len(blob)] == blob and claim == stored_len)


@SETTINGS
@given(AEADS, st.booleans(), st.sampled_from(sorted(pack.BLOB_TYPES)), RAWS, st.data())
def test_salvage_scan_finds_an_intact_blob_and_never_a_damaged_one(aead: str, sealed: bool, type_: int, raw: bytes,
                                                                   data: st.DataObject) -> None:
    """``find_blob`` (repair's scan of a pack without its trailer, plain or sealed: the sealed inner header
    peeked unauthenticated) finds an intact blob's row and span; after any damage it finds nothing, or only
    that very blob, unchanged (damage past its span), never anything else. (A plain blob's type byte is in
    no hash: a flipped one can make the same bytes another type of blob with the same id.)"""
    fmt: pack.BlobFormat = sealed_format(aead) if sealed else pack.PLAIN
    id_ = fmt.verify_id(type_, raw)
    codec, stored = pack.Compressor(3).encode(raw)
    pieces, stored_len = fmt.encode(type_, id_, codec, stored, len(raw))
    blob = b"".join(pieces)
    head = b"\0" * 8
    found = fmt.find_blob(memoryview(head + blob), 8, WHERE)
    assert found == pack.Found(pack.BlobEntry(type_, codec, 8, len(raw), stored_len, id_), len(blob))

    bad = data.draw(damaged(blob))
    got = fmt.find_blob(memoryview(head + bad), 8, WHERE)
    if got.entry is not None and sealed:  # the AEAD covers every byte, and the type and id (its ad)
        assert got.entry == found.entry and bad[: len(blob)] == blob
    elif got.entry is not None:  # a plain header's type byte is covered by nothing: the same bytes, the same id
        assert (got.entry.id, got.entry.raw_len) == (id_, len(raw))


@SETTINGS
@given(AEADS, st.sampled_from(sorted(pack.BLOB_TYPES)), RAWS, st.data())
def test_sealed_blob_in_another_context_is_refused(aead: str, type_: int, raw: bytes, data: st.DataObject) -> None:
    """Asked for as another type or id, with another length, key or AEAD, at another offset: refused."""
    fmt = sealed_format(aead)
    blob, id_, stored_len = seal_blob(fmt, type_, raw)
    padded = blob + det_bytes(7, 4096)
    other_type = data.draw(st.integers(0, 255).filter(lambda t: t != type_))
    refused(parse, fmt, blob, 0, other_type, id_, stored_len)
    bit = data.draw(st.integers(0, 255))
    other_id = bytearray(id_)
    other_id[bit // 8] ^= 1 << (bit % 8)
    refused(parse, fmt, blob, 0, type_, bytes(other_id), stored_len)
    other_len = data.draw(st.one_of(st.integers(-pack.BLOB_HEADER.size, 4096), st.sampled_from(
        [-(2**31), 2**31, pack.MAX_BLOB, pack.MAX_BLOB + 1, 2**64])).filter(lambda n: n != stored_len))
    refused(parse, fmt, padded, 0, type_, id_, other_len)
    refused(parse, fmt, padded, data.draw(st.sampled_from([-1, 1, 12, 16, 28, 44, 64])), type_, id_, stored_len)
    refused(parse, sealed_format(aead, det_bytes(103, 32)), blob, 0, type_, id_, stored_len)
    other_aead = crypto.CHACHA if aead == crypto.AES_GCM else crypto.AES_GCM
    refused(parse, sealed_format(other_aead), blob, 0, type_, id_, stored_len)
    refused(parse, pack.PLAIN, blob, 0, type_, id_, stored_len)  # a sealed blob is no plain blob


INTS = [0, 1, 3, 15, 16, 17, 0xFF, 0xFFFF, 2**31, 2**32 - 1, pack.MAX_BLOB, pack.MAX_BLOB + 1]


@SETTINGS
@given(AEADS, st.sampled_from(sorted(pack.BLOB_TYPES)), st.integers(0, 255), st.integers(0, 255),
       st.one_of(st.integers(0, 4000), st.sampled_from(INTS)), st.one_of(st.integers(0, 4000), st.sampled_from(INTS)),
       st.binary(min_size=6, max_size=6), st.one_of(RAWS, RAWS.map(zstandard.ZstdCompressor().compress)),
       st.booleans())
def test_authentic_blob_with_malformed_content(aead: str, type_: int, codec: int, zero: int, raw_len: int,
                                               data_len: int, zeros: bytes, payload: bytes, id_of_payload: bool
                                               ) -> None:
    """An inner header and bytes that a buggy writer could seal (they authenticate): refused, or the bytes the
    id names."""
    fmt = sealed_format(aead)
    id_ = fmt.verify_id(type_, payload if id_of_payload else b"something else")
    inner = pack.SEALED_INNER.pack(codec, zero, raw_len & 0xFFFFFFFF, data_len & 0xFFFFFFFF, zeros) + payload
    blob = fmt.aead.seal(inner, pack.BLOB_AD + bytes((type_,)) + id_)
    got = outcome(parse, fmt, blob, 0, type_, id_, len(blob) - pack.BLOB_HEADER.size)
    if got is not None:
        assert got[0] == type_ and fmt.verify_id(type_, got[1]) == id_ and id_of_payload


@pytest.mark.parametrize("length", [0, 5, 15])
def test_authentic_blob_shorter_than_its_inner_header(length: int) -> None:
    fmt = sealed_format()
    id_ = fmt.verify_id(pack.CHUNK, b"x")
    blob = fmt.aead.seal(bytes(length), pack.BLOB_AD + bytes((pack.CHUNK,)) + id_)
    refused(parse, fmt, blob, 0, pack.CHUNK, id_, len(blob) - pack.BLOB_HEADER.size)


# -- packs and trailers -----------------------------------------------------------------------------------


class BasePack:
    """A real sealed pack (chunks of both codecs, a segment, a record, a tombstone) and its index object."""

    def __init__(self) -> None:
        fmt = sealed_format()
        chunks = [text_bytes(1, 3000), det_bytes(2, 600), b"x"]
        ids = [fmt.chunk_id(c) for c in chunks]
        segment = Segment([3000, 4096, 600, 1], [ids[0], None, ids[1], ids[2]]).encode()
        rec = record("vm1", segments=[(pack.blob_id(segment), 7697)], source="/images/vm1.img", host="h").encode()
        blobs = [(pack.CHUNK, c) for c in chunks] + [(pack.SEGMENT, segment), (pack.SNAPSHOT, rec),
                                                     (pack.TOMBSTONE, encode_tombstone([det_bytes(3, 32)]))]
        store = MemoryStore()
        writer = pack.PackWriter(store.create(), fmt)
        comp = pack.Compressor(3)
        for type_, raw in blobs:
            writer.add(type_, fmt.verify_id(type_, raw), *comp.encode(raw), len(raw))
        self.id, size = writer.finish()
        self.data = store.read(pack.pack_name(self.id))
        assert len(self.data) == size
        self.entries = writer.entries
        assert {e.codec for e in self.entries} == {pack.RAW, pack.ZSTD}
        self.blobs = blobs
        self.trailer_offset = int(pack.FOOTER.unpack(self.data[-pack.FOOTER.size :])[0])
        self.trailer = self.data[self.trailer_offset : -pack.FOOTER.size]
        self.sealed_pack = SealedPack.from_entries(self.id, size, self.entries)
        self.index_object = indexobjects.encode([(self.sealed_pack, writer.metadata)], fmt)
        self.metadata = {fmt.verify_id(t, raw): raw for t, raw in blobs if t != pack.CHUNK}

    def with_trailer(self, trailer: bytes) -> bytes:
        """This pack's blobs with ``trailer`` under a footer that finds it (right offset, length and hash)."""
        return self.data[: self.trailer_offset] + trailer + pack.FOOTER.pack(
            self.trailer_offset, len(trailer), 0, pack.blob_id(trailer), pack.SEALED_FOOTER_MAGIC)


@functools.cache
def base() -> BasePack:
    return BasePack()


def pack_info(data: bytes, fmt: pack.BlobFormat | None = None) -> pack.PackInfo:
    return pack.read_pack_info(MemoryReader(data, WHERE), fmt or sealed_format())


def test_base_pack_reads_back() -> None:
    b = base()
    info = pack_info(b.data)
    assert (info.id, info.size, info.trailer_offset, info.entries) == (b.id, len(b.data), b.trailer_offset, b.entries)
    reader = MemoryReader(b.data, WHERE)
    assert [pack.read_blob(reader, e, WHERE, sealed_format()) for e in b.entries] == b.blobs
    assert pack.FOOTER.unpack(b.data[-pack.FOOTER.size :])[2] == 0  # a sealed footer does not count blobs


@SETTINGS
@given(st.data())
def test_damaged_sealed_pack(data: st.DataObject) -> None:
    """Damage anywhere: the trailer reads back as written or not at all; each blob reads as written or not."""
    b = base()
    bad = data.draw(damaged(b.data))
    info = outcome(pack_info, bad)
    if info is not None:
        assert (info.id, info.entries) == (b.id, b.entries)
    reader = MemoryReader(bad, WHERE)
    for e, blob in zip(b.entries, b.blobs, strict=True):
        got = outcome(pack.read_blob, reader, e, WHERE, sealed_format())
        assert got is None or got == blob


@SETTINGS
@given(st.data())
def test_damaged_sealed_trailer_under_a_fitting_footer(data: st.DataObject) -> None:
    b = base()
    trailer = data.draw(damaged(b.trailer))
    refused(pack_info, b.with_trailer(trailer))
    refused(sealed_format().open_trailer, trailer, WHERE)


def test_sealed_and_plain_packs_do_not_mix() -> None:
    b = base()
    with pytest.raises(IntegrityError, match="encrypted pack in an unencrypted repository"):
        pack_info(b.data, pack.PLAIN)
    refused(pack_info, b.data, sealed_format(key=det_bytes(104, 32)))  # another repository's key
    refused(pack_info, b.data, sealed_format(crypto.CHACHA))
    store = MemoryStore()
    writer = pack.PackWriter(store.create(), pack.PLAIN)
    writer.add(pack.CHUNK, pack.blob_id(b"abc"), pack.RAW, b"abc", 3)
    plain_id, _ = writer.finish()
    plain = store.read(pack.pack_name(plain_id))
    with pytest.raises(IntegrityError, match="unencrypted pack in an encrypted repository"):
        pack_info(plain)
    # its magics made version 2's: the plain trailer does not authenticate
    relabelled = pack.SEALED_PACK_MAGIC + plain[8:-8] + pack.SEALED_FOOTER_MAGIC
    refused(pack_info, relabelled)


ROW_INTS = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(INTS), st.integers(-(2**63), -1), st.booleans(),
                     st.floats(), st.none(), st.binary(max_size=33), st.text(max_size=4))
ROWS = st.lists(st.one_of(st.lists(ROW_INTS, min_size=6, max_size=6),
                          st.tuples(*[ROW_INTS] * 5, st.binary(min_size=32, max_size=32)).map(list),
                          st.lists(ROW_INTS, max_size=8), ROW_INTS), max_size=8)


@SETTINGS
@given(st.one_of(ROWS.map(lambda r: msgpack.packb(r, use_bin_type=True)), st.binary(max_size=200),
                 st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdc\xff\xff", b"\x91" * 5000 + b"\xc0"])))
def test_authentic_trailer_with_malformed_rows(plain_trailer: bytes) -> None:
    """A trailer sealed with the key: the rows are checked as a plain trailer's are."""
    info = outcome(pack_info, base().with_trailer(sealed_format().seal_trailer(plain_trailer)))
    if info is not None:
        for e in info.entries:
            assert all(type(v) is int and v >= 0 for v in (e.type, e.codec, e.offset, e.raw_len, e.stored_len))
            assert type(e.id) is bytes and len(e.id) == 32 and e.end <= info.trailer_offset


# -- index objects ----------------------------------------------------------------------------------------


def decode_object(data: bytes, name: str | None = None, fmt: pack.BlobFormat | None = None) -> Any:
    return indexobjects.decode(data, indexobjects.name_of(data) if name is None else name, WHERE,
                               fmt or sealed_format())


def test_base_index_object_decodes() -> None:
    b = base()
    [listing] = decode_object(b.index_object)
    assert listing.sealed.id == b.id and listing.sealed.size == len(b.data)
    assert listing.sealed.blobs == b.sealed_pack.blobs and listing.metadata == b.metadata


@SETTINGS
@given(st.data())
def test_damaged_index_object_is_refused(data: st.DataObject) -> None:
    b = base()
    bad = data.draw(damaged(b.index_object))
    refused(decode_object, bad)  # named by its own hash: the seal refuses it
    refused(decode_object, bad, indexobjects.name_of(b.index_object))  # under the original name


def test_index_object_of_another_key_or_format_is_refused() -> None:
    b = base()
    refused(decode_object, b.index_object, None, sealed_format(key=det_bytes(105, 32)))
    refused(decode_object, b.index_object, None, pack.PLAIN)
    plain = indexobjects.encode([(b.sealed_pack, {})], pack.PLAIN)
    refused(decode_object, plain)
    trailer_sealed = sealed_format().seal_trailer(zstandard.ZstdCompressor().compress(
        msgpack.packb({"v": 1, "packs": []})))  # sealed for another place (a trailer's associated data)
    refused(decode_object, trailer_sealed)


def seal_object(doc: Any) -> bytes:
    return sealed_format().seal(zstandard.ZstdCompressor().compress(msgpack.packb(doc, use_bin_type=True)),
                                indexobjects.SEAL_AD)


def base_doc() -> dict[str, Any]:
    b = base()
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(
        sealed_format().unseal(b.index_object, indexobjects.SEAL_AD, WHERE)), raw=False)


PACK_FIELDS = st.sampled_from(["id", "size", "rows", "meta"])


@SETTINGS
@given(st.lists(st.tuples(PACK_FIELDS, st.one_of(ROW_INTS, ROWS)), max_size=3), st.one_of(st.none(), ROWS))
def test_authentic_index_object_with_wrong_types(changes: list[tuple[str, Any]], rows: Any) -> None:
    """An index object sealed with the key, its pack's fields replaced: refused, or decoded as written."""
    doc = base_doc()
    entry = doc["packs"][0]
    for field, value in changes:
        entry[["id", "size", "rows", "meta"].index(field)] = value
    if rows is not None:
        entry[2] = rows
    got = outcome(decode_object, seal_object(doc))
    if got is not None:
        [listing] = got
        assert type(listing.sealed.id) is bytes and len(listing.sealed.id) == 32 and type(listing.sealed.size) is int
        for blob in listing.sealed.blobs:
            assert blob.type in pack.BLOB_TYPES and type(blob.id) is bytes and len(blob.id) == 32


@pytest.mark.parametrize("field,value", [(1, -1), (2, -8), (3, "x"), (4, 2**63), (2, 1.5)])
def test_authentic_index_object_row_out_of_range(field: int, value: Any) -> None:
    doc = base_doc()
    doc["packs"][0][2][0][field] = value
    refused(decode_object, seal_object(doc))


# -- key objects ------------------------------------------------------------------------------------------

MASTER = crypto.MasterKeys(det_bytes(106, 32), det_bytes(107, 32), 12345)


@functools.cache
def key_object(aead: str = crypto.AES_GCM) -> bytes:
    return crypto.wrap_keys(MASTER, aead, PASSWORD, {"host": "h", "user": "u"}, SMALL_KDF)


def unwrap(data: bytes, password: bytes = PASSWORD) -> crypto.MasterKeys | None:
    """KeyObject.parse, then unwrap when the (damaged) parameters are cheap and the salt is one argon2 takes
    (shorter ones: test_key_object_with_a_short_salt)."""
    key = outcome(crypto.KeyObject.parse, data, WHERE, allowed=(UnsupportedFormat,))
    if key is None or len(key.salt) < 8 or key.params.memory_kib > 4096 or key.params.time_cost > 3:
        return None
    return outcome(key.unwrap, password, allowed=())


def test_key_object_unwraps() -> None:
    for aead in crypto.AEADS:
        assert unwrap(key_object(aead)) == MASTER
        assert unwrap(key_object(aead), b"wrong") is None
        assert crypto.KeyObject.parse(key_object(aead), WHERE).info(MASTER) == {"host": "h", "user": "u"}


@SETTINGS
@given(AEADS, st.data())
def test_damaged_key_object(aead: str, data: st.DataObject) -> None:
    """Damaged bytes: a damaged key object, or one that opens as written, or a wrong password."""
    assert unwrap(data.draw(damaged(key_object(aead)))) in (None, MASTER)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=30),
              st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
    max_leaves=8,
)
KEY_FIELDS = ["v", "kdf", "time_cost", "memory_kib", "parallelism", "salt", "aead", "keys", "info", "extra"]


@SETTINGS
@given(AEADS, st.lists(st.tuples(st.sampled_from(KEY_FIELDS), st.booleans(), JSON_VALUES), min_size=1, max_size=3))
def test_key_object_with_wrong_fields(aead: str, changes: list[tuple[str, bool, Any]]) -> None:
    doc = json.loads(key_object(aead))
    for field, delete, value in changes:
        if delete:
            doc.pop(field, None)
        else:
            doc[field] = value
    assert unwrap(json.dumps(doc).encode()) in (None, MASTER)


@pytest.mark.parametrize("salt_len", [0, 4, 7])
def test_key_object_with_a_short_salt(salt_len: int) -> None:
    doc = json.loads(key_object())
    doc["salt"] = base64.b64encode(bytes(salt_len)).decode()
    data = json.dumps(doc).encode()
    try:
        key = crypto.KeyObject.parse(data, WHERE)
    except UnsupportedFormat:
        return
    assert outcome(key.unwrap, PASSWORD, allowed=()) is None


# -- the sealed config ------------------------------------------------------------------------------------

CONFIG = Config(repo_id="0123456789abcdef0123456789abcdef", version=2, encryption=crypto.AES_GCM, pack_size=1 << 20)


@functools.cache
def sealed_store() -> tuple[MemoryStore, bytes]:
    """A store with a key object of MASTER (the test password), and the config file sealed with it."""
    store = MemoryStore()
    keys.add_key(store, MASTER, crypto.AES_GCM, PASSWORD)
    return store, keys.seal_config(CONFIG, MASTER).to_bytes()


def open_config(data: bytes, store: MemoryStore | None = None) -> Config | None:
    """parse_config_file, then keys.open_sealed_config: the config as sealed (seeded by the key), or None for a
    damaged one."""
    parsed = outcome(parse_config_file, data, WHERE, allowed=(UnsupportedFormat,))
    if not isinstance(parsed, SealedConfig):
        return parsed
    opened = outcome(keys.open_sealed_config, store or sealed_store()[0], parsed, PasswordSource(), WHERE,
                     allowed=(UnsupportedFormat, IntegrityError))
    return None if opened is None else opened[0]


SEEDED = keys.with_key_seed(CONFIG, MASTER)


def test_sealed_config_opens() -> None:
    store, data = sealed_store()
    assert set(json.loads(data)) == {"format", "version", "repo_id", "encryption", "sealed"}
    assert open_config(data) == SEEDED


@SETTINGS
@given(st.data())
def test_damaged_sealed_config(data: st.DataObject) -> None:
    bad = data.draw(damaged(sealed_store()[1]))
    got = open_config(bad)
    # JSON allows some damage that changes nothing (white space): then the config is the original one.
    assert got is None or (got == SEEDED and json.loads(bad) == json.loads(sealed_store()[1]))


CONFIG_FIELDS = ["format", "version", "repo_id", "encryption", "sealed", "chunker", "extra"]


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(CONFIG_FIELDS), st.booleans(),
                          st.one_of(JSON_VALUES, st.sampled_from([2, 2.0, True, "aes-256-gcm", "chacha20-poly1305",
                                                                  "none", CONFIG.repo_id]))),
                min_size=1, max_size=3))
def test_sealed_config_with_wrong_fields(changes: list[tuple[str, bool, Any]]) -> None:
    doc = json.loads(sealed_store()[1])
    original = dict(doc)
    for field, delete, value in changes:
        if delete:
            doc.pop(field, None)
        else:
            doc[field] = value
    got = open_config(json.dumps(doc).encode())
    if got is not None:
        assert got == SEEDED and doc["sealed"] == original["sealed"] and doc["repo_id"] == original["repo_id"]


def test_sealed_config_with_a_wrong_key(monkeypatch: pytest.MonkeyPatch) -> None:
    _store, data = sealed_store()
    sealed = parse_config_file(data)
    assert isinstance(sealed, SealedConfig)
    other = MemoryStore()  # another repository's key, same password: it opens, but not this config
    keys.add_key(other, crypto.MasterKeys.generate(), crypto.AES_GCM, PASSWORD)
    with pytest.raises(IntegrityError, match="fails authentication"):
        keys.open_sealed_config(other, sealed, PasswordSource(), WHERE)
    with pytest.raises(UnsupportedFormat, match="without key objects"):
        keys.open_sealed_config(MemoryStore(), sealed, PasswordSource(), WHERE)
    damaged_only = MemoryStore()
    write_object(damaged_only, keys.KEYS_PREFIX + "0" * 64, key_object())  # not named by its hash
    with pytest.raises(IntegrityError, match="does not match its name"):
        keys.open_sealed_config(damaged_only, sealed, PasswordSource(), WHERE)
    for field, value in (("repo_id", "f" * 32), ("encryption", crypto.CHACHA)):
        moved = SealedConfig(**{"repo_id": sealed.repo_id, "encryption": sealed.encryption, "sealed": sealed.sealed,
                                field: value})
        with pytest.raises(IntegrityError):
            keys.open_sealed_config(sealed_store()[0], moved, PasswordSource(), WHERE)
    monkeypatch.setenv("DEDUPIMG_PASSWORD", "wrong-password")
    with pytest.raises(WrongPassword):
        keys.open_sealed_config(sealed_store()[0], sealed, PasswordSource(), WHERE)
