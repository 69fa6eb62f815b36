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
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zstandard

from dedupimg.core.errors import IntegrityError, PermissionDenied
from dedupimg.core.fsutil import FILE_MODE, fsync_dir, raise_for_space
from dedupimg.core.ids import blob_id

PACK_MAGIC = b"DIMGPK\x00\x01"
FOOTER_MAGIC = b"DIMGEND1"
BLOB_HEADER = struct.Struct("<2sBBII32s")
BLOB_MAGIC = b"BL"
FOOTER = struct.Struct("<QII32s8s")

# Blob types
CHUNK = 0
SEGMENT = 1
SNAPSHOT = 2
TOMBSTONE = 3  # msgpack list of forgotten snapshot ids: repair index must not bring them back
BLOB_TYPES = (CHUNK, SEGMENT, SNAPSHOT, TOMBSTONE)

# Codecs
RAW = 0
ZSTD = 1

MAX_BLOB = 64 << 20  # no blob is larger: refuse to allocate more when decoding damaged input
# Keep the compressed form only when it saves at least this share: decompressing a barely smaller blob
# costs more at restore time than the bytes it saves.
MIN_SAVING = 1 / 32


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


class Compressor:
    """zstd with the raw fallback; safe to share between threads (one zstd context per thread)."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._local = threading.local()

    def encode(self, raw: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        zstd = getattr(self._local, "zstd", None)
        if zstd is None:
            zstd = self._local.zstd = zstandard.ZstdCompressor(level=self._level)
        packed = zstd.compress(raw)
        if len(packed) <= len(raw) - len(raw) * MIN_SAVING:
            return ZSTD, packed
        return RAW, bytes(raw)


_local = threading.local()  # zstd contexts are not thread-safe: one per thread


def decode_blob(codec: int, stored: bytes | memoryview, raw_len: int) -> bytes:
    if not 0 <= raw_len <= MAX_BLOB:
        raise IntegrityError(f"blob raw length {raw_len} is out of range")
    if codec == RAW:
        if len(stored) != raw_len:
            raise IntegrityError(f"raw blob has {len(stored)} bytes, its header says {raw_len}")
        return bytes(stored)
    if codec == ZSTD:
        decompressor = getattr(_local, "zstd", None)
        if decompressor is None:
            decompressor = _local.zstd = zstandard.ZstdDecompressor()
        try:
            # zstandard allocates the size a frame header claims, whatever max_output_size says: refuse a
            # claim other than raw_len before decompressing (-1 = no size in the header: bounded by raw_len).
            claimed = zstandard.frame_content_size(stored)
            if claimed not in (-1, raw_len):
                raise IntegrityError(f"blob's zstd frame claims {claimed} bytes, its header says {raw_len}")
            raw = decompressor.decompress(stored, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"blob does not decompress: {exc}") from None
        if len(raw) != raw_len:
            raise IntegrityError("blob decompresses to the wrong length")
        return raw
    raise IntegrityError(f"blob has unknown codec {codec}")


class PackWriter:
    """Appends blobs to a temporary file; ``finish`` makes it a durable, named pack.

    Writes are gathered and issued with writev in pieces of about a megabyte: two small writes per chunk
    would cost more in system calls than the copy itself.
    """

    FLUSH_BYTES = 1 << 20
    FLUSH_PIECES = 512  # below Linux's IOV_MAX of 1024

    def __init__(self, tmp_dir: Path) -> None:
        self._tmp = tmp_dir / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._offset = 0
        self.entries: list[BlobEntry] = []
        self._write(PACK_MAGIC)

    @property
    def size(self) -> int:
        return self._offset

    def _write(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        self._offset += len(data)
        if self._buffered >= self.FLUSH_BYTES or len(self._pieces) >= self.FLUSH_PIECES:
            self._flush()

    def _flush(self) -> None:
        pieces, self._pieces, self._buffered = self._pieces, [], 0
        try:
            done = os.writev(self._fd, pieces)
            total = sum(len(p) for p in pieces)
            if done < total:  # short write: finish it piece by piece
                rest = memoryview(b"".join(pieces))[done:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except OSError as exc:
            raise_for_space(exc, self._tmp)
            raise

    def add(self, type_: int, id_: bytes, codec: int, stored: bytes, raw_len: int) -> BlobEntry:
        entry = BlobEntry(type_, codec, self._offset, raw_len, len(stored), id_)
        self._write(BLOB_HEADER.pack(BLOB_MAGIC, type_, codec, raw_len, len(stored), id_))
        self._write(stored)
        self.entries.append(entry)
        return entry

    def finish(self, packs_dir: Path) -> tuple[bytes, Path, int]:
        """Write trailer and footer, fsync, rename to ``packs/xx/<id>.pack``, fsync the directory.

        The pack id is the blake3 of the trailer, which lists every blob's id (the hash of its content),
        type, codec, offset and lengths: it names the content without hashing the data a second time.
        """
        trailer = msgpack.packb(
            [[e.type, e.codec, e.offset, e.raw_len, e.stored_len, e.id] for e in self.entries],
            use_bin_type=True,
        )
        pack_id = blob_id(trailer)
        footer = FOOTER.pack(self._offset, len(trailer), len(self.entries), pack_id, FOOTER_MAGIC)
        self._write(trailer)
        self._write(footer)
        self._flush()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise_for_space(exc, self._tmp)
            raise
        os.close(self._fd)
        self._fd = -1
        final = pack_path(packs_dir, pack_id)
        os.replace(self._tmp, final)
        fsync_dir(final.parent)
        return pack_id, final, self._offset

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)


def pack_path(packs_dir: Path, pack_id: bytes) -> Path:
    hex_id = pack_id.hex()
    return packs_dir / hex_id[:2] / f"{hex_id}.pack"


def read_blob(fd: int, entry_offset: int, expect_id: bytes, where: str) -> tuple[int, bytes]:
    """Read and verify one blob at ``entry_offset``; returns (type, raw bytes)."""
    if entry_offset < 0:
        raise IntegrityError(f"{where}: blob offset {entry_offset} is negative")
    header = os.pread(fd, BLOB_HEADER.size, entry_offset)
    if len(header) != BLOB_HEADER.size:
        raise IntegrityError(f"{where}: blob header at {entry_offset} is truncated")
    stored_len = BLOB_HEADER.unpack(header)[4]
    if stored_len > MAX_BLOB:
        raise IntegrityError(f"{where}: blob header at {entry_offset} is damaged")
    data = header + os.pread(fd, stored_len, entry_offset + BLOB_HEADER.size)
    return parse_blob(memoryview(data), 0, expect_id, where, entry_offset)


def read_blob_run(fd: int, start: int, length: int, blobs: list[tuple[int, bytes]], where: str) -> list[bytes]:
    """Read adjacent blobs with one pread: ``blobs`` are (offset, id) within ``[start, start+length)``."""
    if start < 0 or length < 0:
        raise IntegrityError(f"{where}: blob run at {start} (+{length}) is out of range")
    data = os.pread(fd, length, start)
    view = memoryview(data)
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


def open_pack(path: Path | str, where: str | None = None) -> int:
    """Open a pack file for reading: a descriptor of a regular file, or IntegrityError naming ``where``.

    Every reader of pack files opens them here. O_NONBLOCK keeps a FIFO named like a pack from blocking
    open() until some writer appears (a hang no signal ends while it lasts); fstat then refuses anything but
    a regular file (FIFO, device, socket, directory) before a byte is read. O_NONBLOCK changes nothing for
    reads of a regular file. A symlink is followed and the file it names gets the same checks (dedupimg
    never makes one, but an admin who moved packs elsewhere may have).
    """
    where = str(path) if where is None else where
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise IntegrityError(f"{where}: the pack file is missing") from None
    except PermissionError:  # not damage: repair must not leave out the snapshots it holds, check must not pass
        raise PermissionDenied(f"{where}: cannot open the pack file: permission denied") from None
    except OSError as exc:
        raise IntegrityError(f"{where}: cannot open the pack file: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise IntegrityError(f"{where}: cannot read pack: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise IntegrityError(f"{where}: is {_file_kind(mode)}, not a pack file")
    return fd


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def read_pack_file(path: Path | str, where: str | None = None) -> bytes:
    """A whole pack's bytes (prune's rewrite), opened with the checks of :func:`open_pack`."""
    where = str(path) if where is None else where
    fd = open_pack(path, where)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as exc:
        raise IntegrityError(f"{where}: cannot read pack: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_trailer(path: Path) -> list[BlobEntry]:
    """Parse a pack's footer and trailer, with every structural check; raises IntegrityError."""
    where = str(path)
    fd = open_pack(path, where)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < len(PACK_MAGIC) + FOOTER.size:
                raise IntegrityError(f"{where}: pack is truncated")
            if f.read(len(PACK_MAGIC)) != PACK_MAGIC:
                raise IntegrityError(f"{where}: not a pack (bad magic)")
            f.seek(size - FOOTER.size)
            t_off, t_len, count, t_hash, magic = FOOTER.unpack(f.read(FOOTER.size))
            if magic != FOOTER_MAGIC or t_off + t_len + FOOTER.size != size:
                raise IntegrityError(f"{where}: pack footer is damaged or the pack is truncated")
            f.seek(t_off)
            trailer = f.read(t_len)
    except OSError as exc:
        raise IntegrityError(f"{where}: cannot read pack: {exc.strerror}") from None
    if blob_id(trailer) != t_hash:
        raise IntegrityError(f"{where}: pack trailer fails its hash")
    return parse_trailer(trailer, count, t_off, where)


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


def iter_pack_paths(packs_dir: Path, skipped: list[Path] | None = None) -> Iterator[Path]:
    """Entries ``packs/xx/*.pack`` in order, but for directories (a pack is a file): those are appended to
    ``skipped`` for the caller to report, and never yielded, so no command tries to read or delete one.
    Other odd entries (a FIFO, a device) are yielded: opening one fails in :func:`open_pack`."""
    for sub in sorted(packs_dir.iterdir()):
        if sub.is_dir() and len(sub.name) == 2:
            for path in sorted(sub.glob("*.pack")):
                if path.is_dir():
                    if skipped is not None:
                        skipped.append(path)
                    continue
                yield path
