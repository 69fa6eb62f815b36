"""Pack files: immutable, self-describing containers of blobs (chunks, manifest segments, snapshot records).

Layout (docs/format.md has it byte for byte)::

    header   8 bytes   b"DIMGPK\\x00\\x01"
    blobs    each: 44-byte blob header (b"BL", type u8, codec u8, raw_len u32, stored_len u32, id 32 bytes)
             followed by stored_len bytes of data
    trailer  msgpack array of [type, codec, offset, raw_len, stored_len, id] (offset of the blob header)
    footer   56 bytes: trailer_offset u64, trailer_len u32, blob_count u32, blake3(trailer) 32 bytes,
             b"DIMGEND1"

A pack is readable without LMDB: the footer finds the trailer, the trailer lists every blob. Every blob's id
is the blake3-256 of its raw (uncompressed) bytes, so any blob read can be verified.

An encrypted repository (format version 2, :class:`SealedFormat`) keeps this layout with three changes: each
blob's 44 bytes of overhead are a nonce, a sealed inner header and the AEAD tag around its stored bytes (so no
id, type or length shows); the trailer is sealed; the footer's blob count is 0. Magics end in ``\x02``/``2``.

This module is the byte format only: it writes into a store's object writer and reads from a store's reader
handle (``dedupimg.store``), and never opens, lists or deletes anything itself.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import msgpack

from dedupimg.core.codecs import (  # noqa: F401
    CODECS,
    DELTA,
    MAX_BLOB,
    MIN_SAVING,
    RAW,
    ZSTD,
    Compressor,
    decode_blob,
    encode_delta,
)
from dedupimg.core.crypto import NONCE, TAG, Aead, chunk_hasher
from dedupimg.core.errors import IntegrityError
from dedupimg.core.ids import BLOB_TYPES, CHUNK, SEGMENT, SNAPSHOT, TOMBSTONE, blob_id  # noqa: F401
from dedupimg.store.base import Listing, ObjectInfo, ObjectReader, ObjectWriter, Store, StoreError

PACK_MAGIC = b"DIMGPK\x00\x01"
FOOTER_MAGIC = b"DIMGEND1"
BLOB_HEADER = struct.Struct("<2sBBII32s")
BLOB_MAGIC = b"BL"
FOOTER = struct.Struct("<QII32s8s")
SEALED_PACK_MAGIC = b"DIMGPK\x00\x02"
SEALED_FOOTER_MAGIC = b"DIMGEND2"
# A sealed blob: nonce (12) | AEAD(inner header (16) | stored bytes | zero padding) | tag (16): 44 bytes of
# overhead, as a plain blob's header, so that offsets and spans are computed alike in both formats.
SEALED_INNER = struct.Struct("<BBII6s")  # codec, 0, raw_len, data_len (stored bytes before padding), zeros
assert NONCE + SEALED_INNER.size + TAG == BLOB_HEADER.size
BLOB_AD = b"DIMGBL2"
TRAILER_AD = b"DIMGTR2"

# Blob types and codecs live in core (ids, codecs); the pack format names them here too.


@dataclass(frozen=True)
class BlobEntry:
    type: int
    codec: int
    offset: int  # of the blob header within the pack
    raw_len: int
    stored_len: int
    id: bytes
    base: bytes = b""  # a DELTA blob's base chunk (format 3); b"" for every other blob

    @property
    def data_offset(self) -> int:
        return self.offset + BLOB_HEADER.size

    @property
    def end(self) -> int:
        """Where the next blob starts: just past this one's stored bytes."""
        return self.offset + blob_span(self.stored_len)


def blob_span(stored_len: int) -> int:
    """The bytes a blob of ``stored_len`` stored bytes takes in its pack, header included."""
    return BLOB_HEADER.size + stored_len


class BlobFormat:
    """How blobs and trailers are laid out: plain (format version 1). :class:`SealedFormat` encrypts."""

    version = 1
    encrypted = False
    pack_magic = PACK_MAGIC
    footer_magic = FOOTER_MAGIC

    chunk_id = staticmethod(blob_id)  # (called per chunk: no frame of its own)

    def verify_id(self, type_: int, raw: bytes | bytearray | memoryview) -> bytes:
        """The id ``raw`` must have as a blob of ``type_``: chunks may be keyed, other blobs are plain blake3."""
        return self.chunk_id(raw) if type_ == CHUNK else blob_id(raw)

    def encode(self, type_: int, id_: bytes, codec: int, stored: bytes, raw_len: int) -> tuple[list[bytes], int]:
        """The pieces a blob is written as, and its stored length (what trailer and index record)."""
        return [BLOB_HEADER.pack(BLOB_MAGIC, type_, codec, raw_len, len(stored), id_), stored], len(stored)

    def open_blob(self, view: memoryview, pos: int, expect_type: int, expect_id: bytes, stored_len: int,
                  where: str, offset: int) -> tuple[int, int, int, memoryview]:
        """(type, codec, raw_len, stored bytes) of the blob at ``view[pos]``, checked but not decompressed.
        A plain blob's header says its type and length (``expect_type``/``stored_len`` are not needed)."""
        header = view[pos : pos + BLOB_HEADER.size] if pos >= 0 else b""
        if len(header) != BLOB_HEADER.size:
            raise IntegrityError(f"{where}: blob header at {offset} is truncated")
        magic, type_, codec, raw_len, stored_len, id_ = BLOB_HEADER.unpack(header)
        if (
            magic != BLOB_MAGIC
            or id_ != expect_id
            or type_ not in BLOB_TYPES
            or raw_len > MAX_BLOB
            or stored_len > MAX_BLOB
        ):
            raise IntegrityError(f"{where}: blob header at {offset} is damaged")
        stored = view[pos + BLOB_HEADER.size : pos + BLOB_HEADER.size + stored_len]
        if len(stored) != stored_len:
            raise IntegrityError(f"{where}: blob at {offset} is truncated")
        return type_, codec, raw_len, stored

    def header_problem(self, view: memoryview, pos: int, e: BlobEntry) -> str:
        """Why the blob at ``view[pos]`` does not match its trailer row ``e`` ("" if it does), read cheaply:
        a plain header is compared; a sealed blob is authenticated by :meth:`open_blob` instead."""
        header = view[pos : pos + BLOB_HEADER.size]
        if len(header) != BLOB_HEADER.size:
            return f"blob header at {e.offset} is truncated"
        if BLOB_HEADER.unpack(header) != (BLOB_MAGIC, e.type, e.codec, e.raw_len, e.stored_len, e.id):
            return f"blob header at {e.offset} does not match the trailer (blob {e.id.hex()[:16]})"
        return ""

    def find_blob(self, view: memoryview, pos: int, where: str) -> Found:
        """The blob at ``view[pos]`` of a pack read without its trailer (repair's salvage of a cut pack): its
        header says what it is, its bytes must decode and hash to the id it claims."""
        header = view[pos : pos + BLOB_HEADER.size]
        if len(header) != BLOB_HEADER.size:
            return Found(None, 0)
        magic, type_, codec, raw_len, stored_len, id_ = BLOB_HEADER.unpack(header)
        if magic != BLOB_MAGIC or type_ not in BLOB_TYPES or codec not in CODECS or raw_len > MAX_BLOB \
                or stored_len > MAX_BLOB or pos + blob_span(stored_len) > len(view):
            return Found(None, 0)
        span = blob_span(stored_len)
        if codec == DELTA:
            return Found(None, span, delta=True)
        try:
            parse_blob(view, pos, type_, id_, stored_len, where, pos, self)
        except IntegrityError:
            return Found(None, span)
        return Found(BlobEntry(type_, codec, pos, raw_len, stored_len, id_), span)

    def seal_trailer(self, trailer: bytes) -> bytes:
        return trailer

    def open_trailer(self, stored: bytes, where: str) -> bytes:
        return stored

    def seal(self, data: bytes, ad: bytes) -> bytes:
        """Whole-object sealing (index objects, the config): plain in version 1."""
        return data

    def unseal(self, data: bytes, ad: bytes, what: str) -> bytes:
        return data


class Found(NamedTuple):
    """What :meth:`BlobFormat.find_blob` found at a pack offset: ``span`` 0 when no blob starts there (or its
    bytes are cut short); else the blob's span, and its row when it verified (decoded, hashed to its id, and
    in a sealed pack authenticated). ``delta``: a DELTA chunk, which no scan can verify (its base's id is
    only in its trailer row)."""

    entry: BlobEntry | None
    span: int
    delta: bool = False


PLAIN = BlobFormat()


class SealedFormat(BlobFormat):
    """Format version 2: every blob and trailer sealed with an AEAD; chunk ids keyed (core/crypto.py)."""

    version = 2
    encrypted = True
    pack_magic = SEALED_PACK_MAGIC
    footer_magic = SEALED_FOOTER_MAGIC

    def __init__(self, aead: Aead, id_key: bytes, padding: int) -> None:
        self.aead = aead
        self._hasher = chunk_hasher(id_key)
        self._ad = {t: BLOB_AD + bytes((t,)) for t in BLOB_TYPES}  # associated data, but for the id
        self.padding = max(1, padding)  # stored blob spans are multiples of this (hides exact chunk sizes)

    def chunk_id(self, raw: bytes | bytearray | memoryview) -> bytes:
        return self._hasher(raw).digest()

    def encode(self, type_: int, id_: bytes, codec: int, stored: bytes, raw_len: int) -> tuple[list[bytes], int]:
        span = BLOB_HEADER.size + len(stored)
        pad = -span % self.padding
        inner = SEALED_INNER.pack(codec, 0, raw_len, len(stored), bytes(6))
        sealed = self.aead.seal(b"".join((inner, stored, bytes(pad))), self._ad[type_] + id_)
        return [sealed], len(stored) + pad

    def open_blob(self, view: memoryview, pos: int, expect_type: int, expect_id: bytes, stored_len: int,
                  where: str, offset: int) -> tuple[int, int, int, memoryview]:
        if pos < 0 or stored_len > MAX_BLOB or expect_type not in BLOB_TYPES:
            raise IntegrityError(f"{where}: blob at {offset} is out of range")
        sealed = view[pos : pos + BLOB_HEADER.size + stored_len]
        if len(sealed) != BLOB_HEADER.size + stored_len:
            raise IntegrityError(f"{where}: blob at {offset} is truncated")
        opened = self.aead.try_open(sealed, self._ad[expect_type] + expect_id)  # (messages only on damage)
        if opened is None:
            raise IntegrityError(f"{where}: blob {expect_id.hex()[:16]} at {offset} fails authentication (altered, "
                                 "or not the one it should be)")
        plain = memoryview(opened)
        if len(plain) < SEALED_INNER.size:
            raise IntegrityError(f"{where}: blob {expect_id.hex()[:16]} at {offset} is shorter than its inner header")
        codec, _zero, raw_len, data_len, _zeros = SEALED_INNER.unpack(plain[: SEALED_INNER.size])
        if data_len > stored_len or raw_len > MAX_BLOB:
            raise IntegrityError(f"{where}: blob {expect_id.hex()[:16]} at {offset} has a damaged inner header")
        return expect_type, codec, raw_len, plain[SEALED_INNER.size : SEALED_INNER.size + data_len]

    def header_problem(self, view: memoryview, pos: int, e: BlobEntry) -> str:
        if len(view) < pos + blob_span(e.stored_len):
            return f"blob {e.id.hex()[:16]} at {e.offset} is truncated"
        try:
            _t, codec, raw_len, _data = self.open_blob(view, pos, e.type, e.id, e.stored_len, "", e.offset)
        except IntegrityError as exc:
            return str(exc).removeprefix(": ")
        if (codec, raw_len) != (e.codec, e.raw_len):
            return f"blob {e.id.hex()[:16]} at {e.offset} does not match the trailer"
        return ""

    def find_blob(self, view: memoryview, pos: int, where: str) -> Found:
        """A sealed blob shows no id, type or length: the inner header is peeked (decrypted unauthenticated,
        :meth:`Aead.peek`) for its length, the data decoded for the id, and the blob counts only when it
        authenticates as a blob of some type with that id (two candidate ids: keyed for a chunk, plain blake3
        for the other types)."""
        head = view[pos : pos + BLOB_HEADER.size]
        if len(head) != BLOB_HEADER.size:
            return Found(None, 0)
        codec, zero, raw_len, data_len, zeros = SEALED_INNER.unpack(self.aead.peek(head, SEALED_INNER.size))
        if codec not in CODECS or zero or zeros != bytes(6) or raw_len > MAX_BLOB or data_len > MAX_BLOB:
            return Found(None, 0)
        stored_len = data_len + (-(BLOB_HEADER.size + data_len) % self.padding)
        span = blob_span(stored_len)
        if pos + span > len(view):
            return Found(None, 0)
        if codec == DELTA:
            return Found(None, span, delta=True)
        sealed = view[pos : pos + span]
        try:
            raw = decode_blob(codec, self.aead.peek(sealed, SEALED_INNER.size + data_len)[SEALED_INNER.size :],
                              raw_len, None)
        except IntegrityError:
            return Found(None, span)
        for type_ in BLOB_TYPES:
            id_ = self.verify_id(type_, raw)
            if self.aead.try_open(sealed, self._ad[type_] + id_) is not None:
                return Found(BlobEntry(type_, codec, pos, raw_len, stored_len, id_), span)
        return Found(None, span)

    def seal_trailer(self, trailer: bytes) -> bytes:
        return self.aead.seal(trailer, TRAILER_AD)

    def open_trailer(self, stored: bytes, where: str) -> bytes:
        return self.aead.open(stored, TRAILER_AD, f"{where}: pack trailer")

    def seal(self, data: bytes, ad: bytes) -> bytes:
        return self.aead.seal(data, ad)

    def unseal(self, data: bytes, ad: bytes, what: str) -> bytes:
        return self.aead.open(data, ad, what)


class EncodedBlob(NamedTuple):
    """A blob as its pack stores it (:meth:`BlobFormat.encode`'s pieces), ready for :meth:`PackWriter.add_encoded`."""

    type: int
    id: bytes
    codec: int
    raw_len: int
    pieces: list[bytes]
    stored_len: int
    base: bytes = b""  # a DELTA chunk's base


class RowLike(Protocol):
    """A blob's row as trailers and index objects hold it (BlobEntry, index.NewBlob): what the index registers."""

    @property
    def type(self) -> int: ...
    @property
    def codec(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def raw_len(self) -> int: ...
    @property
    def stored_len(self) -> int: ...
    @property
    def id(self) -> bytes: ...
    @property
    def base(self) -> bytes: ...


def trailer_row(e: RowLike) -> list[object]:
    """A blob's trailer row (and index object row): 6 fields, and a 7th, the base's id, for a DELTA blob."""
    row: list[object] = [e.type, e.codec, e.offset, e.raw_len, e.stored_len, e.id]
    if e.codec == DELTA:
        row.append(e.base)
    return row


class PackWriter:
    """Lays out a pack in a store's object writer; ``finish`` makes it a durable, named pack.

    The object writer gathers the small writes (a header and the stored bytes per blob) into large ones.
    """

    def __init__(self, out: ObjectWriter, fmt: BlobFormat) -> None:
        self._out = out
        self._fmt = fmt
        self._offset = len(fmt.pack_magic)
        self.entries: list[BlobEntry] = []
        # The stored bytes of metadata blobs (segments, records, tombstones): a remote repository publishes
        # them in the pack's index object (repo/indexobjects.py), so that other hosts need not read the pack.
        self.metadata: dict[bytes, tuple[int, bytes]] = {}
        out.write(fmt.pack_magic)

    @property
    def size(self) -> int:
        return self._offset

    @property
    def temp_name(self) -> str:
        return self._out.temp_name

    def add(self, type_: int, id_: bytes, codec: int, stored: bytes, raw_len: int, base: bytes = b"") -> BlobEntry:
        pieces, stored_len = self._fmt.encode(type_, id_, codec, stored, raw_len)
        entry = self.add_encoded(EncodedBlob(type_, id_, codec, raw_len, pieces, stored_len, base))
        if type_ != CHUNK:
            self.metadata[id_] = (codec, bytes(stored))
        return entry

    def add_encoded(self, blob: EncodedBlob) -> BlobEntry:
        """Append a blob its format has encoded already (a chunk: metadata blobs go through :meth:`add`)."""
        if (blob.codec == DELTA) != (len(blob.base) == 32) or (blob.codec == DELTA and blob.type != CHUNK):
            raise ValueError("a DELTA blob, and only a DELTA chunk, names a 32-byte base")
        entry = BlobEntry(blob.type, blob.codec, self._offset, blob.raw_len, blob.stored_len, blob.id, blob.base)
        for piece in blob.pieces:
            self._out.write(piece)
        self._offset += BLOB_HEADER.size + blob.stored_len
        self.entries.append(entry)
        return entry

    def finish(self) -> tuple[bytes, int]:
        """Write trailer and footer and commit the object as :func:`pack_name` of its id (durable when this
        returns: docs/format.md §8); returns (pack id, size). On an error the caller calls :meth:`abort`.

        The pack id is the blake3 of the trailer as stored, which lists every blob's id (the hash of its
        content), type, codec, offset and lengths: it names the content without hashing the data a second
        time. A sealed trailer's footer does not say how many blobs the pack holds.
        """
        trailer = self._fmt.seal_trailer(msgpack.packb(
            [trailer_row(e) for e in self.entries],
            use_bin_type=True,
        ))
        pack_id = blob_id(trailer)
        count = 0 if self._fmt.encrypted else len(self.entries)
        footer = FOOTER.pack(self._offset, len(trailer), count, pack_id, self._fmt.footer_magic)
        self._out.write(trailer)
        self._out.write(footer)
        self._offset += len(trailer) + len(footer)
        self._out.commit(pack_name(pack_id))
        return pack_id, self._offset

    def abort(self) -> None:
        self._out.abort()


PACKS_PREFIX = "packs/"


def pack_name(pack_id: bytes) -> str:
    """The store name of a pack: ``packs/<first 2 hex digits>/<64 hex>.pack``."""
    hex_id = pack_id.hex()
    return f"{PACKS_PREFIX}{hex_id[:2]}/{hex_id}.pack"


def pack_file_name(pack_id: bytes) -> str:
    """The last part of :func:`pack_name` (``<64 hex>.pack``): what messages call a pack."""
    return f"{pack_id.hex()}.pack"


def pack_levels() -> list[str]:
    """The levels under ``packs/`` that ``init`` creates (``packs`` and ``packs/00`` ... ``packs/ff``)."""
    return ["packs"] + [f"{PACKS_PREFIX}{i:02x}" for i in range(256)]


def list_packs(store: Store, skipped: list[str] | None = None) -> list[ObjectInfo]:
    """Entries ``packs/xx/*.pack`` in name order, but for directories (a pack is a file): those are appended
    to ``skipped`` for the caller to report, and never returned, so no command tries to read or delete one.
    Other odd entries (a FIFO, a device) are returned: opening one fails in the store (NotAnObject)."""
    out: list[ObjectInfo] = []
    for level in store.list(PACKS_PREFIX).dirs:
        if len(level) != len(PACKS_PREFIX) + 2:
            continue
        listing: Listing = store.list(level + "/")
        out += [o for o in listing.objects if o.name.endswith(".pack")]
        if skipped is not None:
            skipped += [d for d in listing.dirs if d.endswith(".pack")]
    return out


def read_blob(reader: ObjectReader, e: BlobEntry, where: str, fmt: BlobFormat = PLAIN,
              bases: Bases | None = None) -> tuple[int, bytes]:
    """Read and verify the blob of trailer row ``e``; returns (type, raw bytes)."""
    if e.offset < 0 or e.stored_len > MAX_BLOB:
        raise IntegrityError(f"{where}: blob offset {e.offset} or length is out of range")
    data = reader.pread(blob_span(e.stored_len), e.offset)
    return parse_blob(memoryview(data), 0, e.type, e.id, e.stored_len, where, e.offset, fmt, bases)


# A blob of a run: (offset in the pack, id, type, stored length), as the index has it.
RunBlob = tuple[int, bytes, int, int]
# The raw bytes of DELTA blobs' bases, by the *delta's* id: what decoding a delta needs besides its own bytes.
Bases = Mapping[bytes, bytes]


def read_blob_run(reader: ObjectReader, start: int, length: int, blobs: list[RunBlob], where: str,
                  fmt: BlobFormat = PLAIN, bases: Bases | None = None) -> list[bytes]:
    """Read blobs near each other with one pread: ``blobs`` lie within ``[start, start+length)``."""
    if start < 0 or length < 0:
        raise IntegrityError(f"{where}: blob run at {start} (+{length}) is out of range")
    pread_view = getattr(reader, "pread_view", None)  # an object store's reader: the bytes as received
    view = memoryview(reader.pread(length, start) if pread_view is None else pread_view(length, start))
    return [parse_blob(view, offset - start, type_, id_, stored_len, where, offset, fmt, bases)[1]
            for offset, id_, type_, stored_len in blobs]


def parse_blob(view: memoryview, pos: int, expect_type: int, expect_id: bytes, stored_len: int, where: str,
               offset: int, fmt: BlobFormat = PLAIN, bases: Bases | None = None) -> tuple[int, bytes]:
    """Check and decode the blob that starts at ``view[pos]`` (``offset`` in the pack, for messages)."""
    type_, codec, raw_len, stored = fmt.open_blob(view, pos, expect_type, expect_id, stored_len, where, offset)
    return type_, decode_checked(fmt, type_, codec, raw_len, stored, expect_id, where, offset, bases)


def decode_checked(fmt: BlobFormat, type_: int, codec: int, raw_len: int, stored: bytes | memoryview,
                   expect_id: bytes, where: str, offset: int, bases: Bases | None = None) -> bytes:
    """The raw bytes of an opened blob (:meth:`BlobFormat.open_blob`), checked against its id. A DELTA blob
    needs its base's raw bytes, ``bases[delta id]``; a wrong base decodes to bytes that fail the id check.
    (Which base a delta has is its trailer row's and index row's business: the blob does not say.)"""
    base = None
    if codec == DELTA:
        base = bases.get(expect_id) if bases is not None and type_ == CHUNK else None
        if base is None:
            raise IntegrityError(f"{where}: blob {expect_id.hex()[:16]} at {offset} is a delta read without "
                                 "its base")
    try:
        raw = decode_blob(codec, stored, raw_len, base)
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: blob {expect_id.hex()[:16]} at {offset}: {_one_line(exc)}") from None
    if fmt.verify_id(type_, raw) != expect_id:
        raise IntegrityError(f"{where}: blob {expect_id.hex()[:16]} at {offset} fails its hash")
    return raw


@dataclass(frozen=True)
class PackInfo:
    """What a pack says about itself: its id (the footer's trailer hash), size and trailer rows."""

    id: bytes
    size: int
    trailer_offset: int
    entries: list[BlobEntry]


def read_trailer(reader: ObjectReader, fmt: BlobFormat = PLAIN, where: str | None = None) -> list[BlobEntry]:
    """Parse a pack's footer and trailer, with every structural check; raises IntegrityError."""
    return read_pack_info(reader, fmt, where).entries


def read_pack_info(reader: ObjectReader, fmt: BlobFormat = PLAIN, where: str | None = None) -> PackInfo:
    """Footer and trailer of an open pack, with every structural check (docs/format.md §4.4); raises
    IntegrityError naming ``where`` (default: the reader's)."""
    where = reader.where if where is None else where
    size = reader.size
    try:
        if size < len(fmt.pack_magic) + FOOTER.size:
            raise IntegrityError(f"{where}: pack is truncated")
        magic = reader.pread(len(fmt.pack_magic), 0)
        if magic != fmt.pack_magic:
            other = "an encrypted pack in an unencrypted repository" if magic == SEALED_PACK_MAGIC else \
                "an unencrypted pack in an encrypted repository" if magic == PACK_MAGIC else "not a pack"
            raise IntegrityError(f"{where}: {other} (bad magic)")
        t_off, t_len, count, t_hash, magic = FOOTER.unpack(reader.pread(FOOTER.size, size - FOOTER.size))
        if magic != fmt.footer_magic or t_off + t_len + FOOTER.size != size:
            raise IntegrityError(f"{where}: pack footer is damaged or the pack is truncated")
        trailer = reader.pread(t_len, t_off)
    except OSError as exc:  # not damage: what the pack holds is unknown (repair must not skip it)
        raise StoreError(where, f"cannot read pack: {exc.strerror}", exc.strerror) from None
    except struct.error:  # the file shrank since it was opened
        raise IntegrityError(f"{where}: pack footer is damaged or the pack is truncated") from None
    if blob_id(trailer) != t_hash:
        raise IntegrityError(f"{where}: pack trailer fails its hash")
    plain = fmt.open_trailer(trailer, where)
    return PackInfo(bytes(t_hash), size, t_off, parse_trailer(plain, None if fmt.encrypted else count, t_off, where))


def parse_trailer(trailer: bytes, count: int | None, limit: int, where: str) -> list[BlobEntry]:
    """The rows of a trailer; ``count`` None: as many as it holds (a sealed pack's footer says none)."""
    try:
        # Every msgpack item takes at least a byte: no array can be longer than the trailer.
        bound = len(trailer) if count is None else min(count, len(trailer))
        rows = msgpack.unpackb(trailer, use_list=True, raw=False, max_array_len=max(bound, 7))
        if not isinstance(rows, list) or (count is not None and len(rows) != count):
            raise ValueError("wrong blob count")
        entries = []
        for row in rows:
            entries.append(parse_row(row, limit))
        return entries
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"{where}: pack trailer is damaged ({_one_line(exc)})") from None


def parse_row(row: object, limit: int) -> BlobEntry:
    """One trailer row (or index object row), checked: 6 fields, or 7 for a DELTA chunk (its base's id);
    ``limit``: where the blobs end (the trailer's offset, or the pack's size). ValueError when damaged."""
    if not (isinstance(row, list) and len(row) in (6, 7)):
        raise ValueError("a row is not 6 or 7 fields")
    t, c, off, raw_len, stored_len, id_ = row[:6]
    base = row[6] if len(row) == 7 else b""
    if (c == DELTA) != (len(row) == 7):
        raise ValueError("a delta row without its base, or a base on another row")
    if c == DELTA and not (t == CHUNK and isinstance(base, bytes) and len(base) == 32 and base != id_):
        raise ValueError("a delta that is not a chunk, or a bad base")
    if not (isinstance(id_, bytes) and len(id_) == 32):
        raise ValueError("bad blob id")
    if not all(type(v) is int and v >= 0 for v in (t, c, off, raw_len, stored_len)):
        raise ValueError("bad blob field")
    if off + blob_span(stored_len) > limit:
        raise ValueError("blob extends past the trailer")
    return BlobEntry(t, c, off, raw_len, stored_len, id_, base)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (messages may quote damaged input)."""
    return " ".join(str(exc).split()) or type(exc).__name__
