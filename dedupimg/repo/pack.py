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

This module is the byte format only: it writes into a store's object writer and reads from a store's reader
handle (``dedupimg.store``), and never opens, lists or deletes anything itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

from dedupimg.core.codecs import MAX_BLOB, MIN_SAVING, RAW, ZSTD, Compressor, decode_blob  # noqa: F401
from dedupimg.core.errors import IntegrityError
from dedupimg.core.ids import BLOB_TYPES, CHUNK, SEGMENT, SNAPSHOT, TOMBSTONE, blob_id  # noqa: F401
from dedupimg.store.base import Listing, ObjectInfo, ObjectReader, ObjectWriter, Store

PACK_MAGIC = b"DIMGPK\x00\x01"
FOOTER_MAGIC = b"DIMGEND1"
BLOB_HEADER = struct.Struct("<2sBBII32s")
BLOB_MAGIC = b"BL"
FOOTER = struct.Struct("<QII32s8s")

# Blob types and codecs live in core (ids, codecs); the pack format names them here too.


@dataclass(frozen=True)
class BlobEntry:
    type: int
    codec: int
    offset: int  # of the blob header within the pack
    raw_len: int
    stored_len: int
    id: bytes

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


class PackWriter:
    """Lays out a pack in a store's object writer; ``finish`` makes it a durable, named pack.

    The object writer gathers the small writes (a header and the stored bytes per blob) into large ones.
    """

    def __init__(self, out: ObjectWriter) -> None:
        self._out = out
        self._offset = len(PACK_MAGIC)
        self.entries: list[BlobEntry] = []
        # The stored bytes of metadata blobs (segments, records, tombstones): a remote repository publishes
        # them in the pack's index object (repo/indexobjects.py), so that other hosts need not read the pack.
        self.metadata: dict[bytes, tuple[int, bytes]] = {}
        out.write(PACK_MAGIC)

    @property
    def size(self) -> int:
        return self._offset

    @property
    def temp_name(self) -> str:
        return self._out.temp_name

    def add(self, type_: int, id_: bytes, codec: int, stored: bytes, raw_len: int) -> BlobEntry:
        entry = BlobEntry(type_, codec, self._offset, raw_len, len(stored), id_)
        write = self._out.write
        write(BLOB_HEADER.pack(BLOB_MAGIC, type_, codec, raw_len, len(stored), id_))
        write(stored)
        self._offset += BLOB_HEADER.size + len(stored)
        self.entries.append(entry)
        if type_ != CHUNK:
            self.metadata[id_] = (codec, bytes(stored))
        return entry

    def finish(self) -> tuple[bytes, int]:
        """Write trailer and footer and commit the object as :func:`pack_name` of its id (durable when this
        returns: docs/format.md §8); returns (pack id, size). On an error the caller calls :meth:`abort`.

        The pack id is the blake3 of the trailer, which lists every blob's id (the hash of its content),
        type, codec, offset and lengths: it names the content without hashing the data a second time.
        """
        trailer = msgpack.packb(
            [[e.type, e.codec, e.offset, e.raw_len, e.stored_len, e.id] for e in self.entries],
            use_bin_type=True,
        )
        pack_id = blob_id(trailer)
        footer = FOOTER.pack(self._offset, len(trailer), len(self.entries), pack_id, FOOTER_MAGIC)
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


def read_blob(reader: ObjectReader, entry_offset: int, expect_id: bytes, where: str) -> tuple[int, bytes]:
    """Read and verify one blob at ``entry_offset``; returns (type, raw bytes)."""
    if entry_offset < 0:
        raise IntegrityError(f"{where}: blob offset {entry_offset} is negative")
    header = reader.pread(BLOB_HEADER.size, entry_offset)
    if len(header) != BLOB_HEADER.size:
        raise IntegrityError(f"{where}: blob header at {entry_offset} is truncated")
    stored_len = BLOB_HEADER.unpack(header)[4]
    if stored_len > MAX_BLOB:
        raise IntegrityError(f"{where}: blob header at {entry_offset} is damaged")
    data = header + reader.pread(stored_len, entry_offset + BLOB_HEADER.size)
    return parse_blob(memoryview(data), 0, expect_id, where, entry_offset)


def read_blob_run(reader: ObjectReader, start: int, length: int, blobs: list[tuple[int, bytes]], where: str
                  ) -> list[bytes]:
    """Read adjacent blobs with one pread: ``blobs`` are (offset, id) within ``[start, start+length)``."""
    if start < 0 or length < 0:
        raise IntegrityError(f"{where}: blob run at {start} (+{length}) is out of range")
    pread_view = getattr(reader, "pread_view", None)  # an object store's reader: the bytes as received
    view = memoryview(reader.pread(length, start) if pread_view is None else pread_view(length, start))
    return [parse_blob(view, offset - start, id_, where, offset)[1] for offset, id_ in blobs]


def parse_blob(view: memoryview, pos: int, expect_id: bytes, where: str, offset: int) -> tuple[int, bytes]:
    """Check and decode the blob whose header starts at ``view[pos]`` (``offset`` in the pack, for messages)."""
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
    try:
        raw = decode_blob(codec, stored, raw_len)
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: blob {expect_id.hex()[:16]} at {offset}: {_one_line(exc)}") from None
    if blob_id(raw) != expect_id:
        raise IntegrityError(f"{where}: blob {expect_id.hex()[:16]} at {offset} fails its hash")
    return type_, raw


@dataclass(frozen=True)
class PackInfo:
    """What a pack says about itself: its id (the footer's trailer hash), size and trailer rows."""

    id: bytes
    size: int
    trailer_offset: int
    entries: list[BlobEntry]


def read_trailer(reader: ObjectReader, where: str | None = None) -> list[BlobEntry]:
    """Parse a pack's footer and trailer, with every structural check; raises IntegrityError."""
    return read_pack_info(reader, where).entries


def read_pack_info(reader: ObjectReader, where: str | None = None) -> PackInfo:
    """Footer and trailer of an open pack, with every structural check (docs/format.md §4.4); raises
    IntegrityError naming ``where`` (default: the reader's)."""
    where = reader.where if where is None else where
    size = reader.size
    try:
        if size < len(PACK_MAGIC) + FOOTER.size:
            raise IntegrityError(f"{where}: pack is truncated")
        if reader.pread(len(PACK_MAGIC), 0) != PACK_MAGIC:
            raise IntegrityError(f"{where}: not a pack (bad magic)")
        t_off, t_len, count, t_hash, magic = FOOTER.unpack(reader.pread(FOOTER.size, size - FOOTER.size))
        if magic != FOOTER_MAGIC or t_off + t_len + FOOTER.size != size:
            raise IntegrityError(f"{where}: pack footer is damaged or the pack is truncated")
        trailer = reader.pread(t_len, t_off)
    except OSError as exc:
        raise IntegrityError(f"{where}: cannot read pack: {exc.strerror}") from None
    except struct.error:  # the file shrank since it was opened
        raise IntegrityError(f"{where}: pack footer is damaged or the pack is truncated") from None
    if blob_id(trailer) != t_hash:
        raise IntegrityError(f"{where}: pack trailer fails its hash")
    return PackInfo(bytes(t_hash), size, t_off, parse_trailer(trailer, count, t_off, where))


def parse_trailer(trailer: bytes, count: int, limit: int, where: str) -> list[BlobEntry]:
    try:
        # Every msgpack item takes at least a byte: no array can be longer than the trailer.
        rows = msgpack.unpackb(trailer, use_list=True, raw=False, max_array_len=max(min(count, len(trailer)), 6))
        if not isinstance(rows, list) or len(rows) != count:
            raise ValueError("wrong blob count")
        entries = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 6):
                raise ValueError("a row is not 6 fields")
            t, c, off, raw_len, stored_len, id_ = row
            if not (isinstance(id_, bytes) and len(id_) == 32):
                raise ValueError("bad blob id")
            if not all(type(v) is int and v >= 0 for v in (t, c, off, raw_len, stored_len)):
                raise ValueError("bad blob field")
            if off + blob_span(stored_len) > limit:
                raise ValueError("blob extends past the trailer")
            entries.append(BlobEntry(t, c, off, raw_len, stored_len, id_))
        return entries
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"{where}: pack trailer is damaged ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (messages may quote damaged input)."""
    return " ".join(str(exc).split()) or type(exc).__name__
