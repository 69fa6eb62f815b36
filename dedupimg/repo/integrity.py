"""Pack-level integrity helpers for ``check`` and ``repair index``: the parts that need pack offsets.

Everything here reads packs only (no index), through the store: a pack's identity and layout from its footer
and trailer, its data read sequentially in large runs with every blob's header compared to its trailer row,
and ``tmp/`` leftovers. Messages name the pack file; they never contain raw damaged bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace

from dedupimg.core.errors import IntegrityError
from dedupimg.repo import pack
from dedupimg.repo.pack import PackInfo
from dedupimg.store.base import TEMP_PREFIX, NotAnObject, Store, StoreError

WINDOW = 16 << 20  # bytes of adjacent blobs read with one pread when reading a whole pack
META_TYPES = (pack.SEGMENT, pack.SNAPSHOT, pack.TOMBSTONE)
_PACK_NAME = re.compile(r"^[0-9a-f]{64}\.pack$")
_TMP_NAME = re.compile(r"^(\d+)-[0-9a-f]{16}\.tmp$")
REBUILD_PREFIX = "index-rebuild-"  # tmp/index-rebuild-<pid>/: a new index being built by repair
OLD_PREFIX = "index-old-"  # tmp/index-old-<pid>/: the index a repair replaced, until it is deleted


@dataclass
class PackData:
    """Result of reading a whole pack: problems by blob, and the raw bytes of verified metadata blobs."""

    errors: list[tuple[pack.BlobEntry | None, str, bool]] = field(default_factory=list)  # (blob, problem, indexed)
    meta: list[tuple[pack.BlobEntry, bytes]] = field(default_factory=list)
    deltas: list[tuple[pack.BlobEntry, bytes]] = field(default_factory=list)  # (delta, stored bytes): decoded last
    bytes_read: int = 0


def base_name(name: str) -> str:
    """The last level of a store name: ``<64 hex>.pack`` of ``packs/xx/<64 hex>.pack``."""
    return name.rsplit("/", 1)[-1]


def pack_file_id(name: str) -> bytes | None:
    """The pack id a store name claims, or None when its last part is not ``<64 hex>.pack``."""
    base = base_name(name)
    return bytes.fromhex(base[:64]) if _PACK_NAME.match(base) else None


def read_pack_info(store: Store, name: str, fmt: pack.BlobFormat) -> PackInfo:
    """Footer and trailer with every check of :func:`pack.read_trailer`; raises IntegrityError naming the
    pack's location (local: its path)."""
    with store.open(name) as reader:
        return pack.read_pack_info(reader, fmt)


def layout_problems(info: PackInfo) -> list[str]:
    """How the trailer rows fail to tile the pack as the writer lays it out (docs/format.md §4)."""
    problems = []
    pos = len(pack.PACK_MAGIC)
    seen: set[bytes] = set()
    for e in info.entries:
        if e.offset != pos:
            problems.append(f"blob {e.id.hex()[:16]} is at offset {e.offset}, expected {pos}")
            break
        if e.type not in pack.BLOB_TYPES or e.codec not in pack.CODECS:
            problems.append(f"blob {e.id.hex()[:16]} has unknown type {e.type} or codec {e.codec}")
        if e.raw_len > pack.MAX_BLOB or e.stored_len > pack.MAX_BLOB:
            problems.append(f"blob {e.id.hex()[:16]} claims an impossible length")
        if e.id in seen:
            problems.append(f"blob {e.id.hex()[:16]} is listed twice")
        seen.add(e.id)
        pos = e.end
    else:
        if pos != info.trailer_offset:
            problems.append(f"the trailer starts at {info.trailer_offset}, after the last blob at {pos}")
    return problems


def verify_pack_data(store: Store, name: str, info: PackInfo, full: Container[int], fmt: pack.BlobFormat,
                     bases_of: Callable[[list[bytes]], pack.Bases] | None = None) -> PackData:
    """Read the whole pack sequentially and check it.

    Every blob's header must match its trailer row. Blobs whose offset is in ``full`` (those the index points
    at) are also decoded and hashed against their id; the raw bytes of those that are segments, snapshot
    records or tombstones are returned for the caller to compare with the index. Never raises IntegrityError:
    problems are returned. A delta chunk is decoded after the pack is read, with its base read through
    ``bases_of(delta ids)`` (the repository's: the base is where the index says, often in another pack).
    """
    out = PackData()
    where = base_name(name)
    try:
        reader = store.open(name, where)
    except IntegrityError as exc:
        out.errors.append((None, str(exc).removeprefix(f"{where}: "), False))
        return out
    with reader:
        reader.advise_sequential()
        head = reader.pread(len(fmt.pack_magic), 0)
        if head != fmt.pack_magic:
            out.errors.append((None, "bad pack magic", False))
        entries = sorted(info.entries, key=lambda e: e.offset)
        i = 0
        while i < len(entries):
            start = entries[i].offset
            j = i + 1
            end = entries[i].end
            while j < len(entries) and entries[j].offset == end and entries[j].end - start <= WINDOW:
                end = entries[j].end
                j += 1
            try:
                data = reader.pread(end - start, start)
            except OSError as exc:
                for e in entries[i:j]:
                    out.errors.append((e, f"cannot read: {exc.strerror}", e.offset in full))
                i = j
                continue
            out.bytes_read += len(data)
            view = memoryview(data)
            for e in entries[i:j]:
                indexed = e.offset in full
                problem = _check_blob(view, e.offset - start, e, indexed, where, out, fmt)
                if problem:
                    out.errors.append((e, problem, indexed))
            i = j
        reader.drop_cache()  # a check should not evict the cache
    _check_deltas(out, where, fmt, bases_of)
    return out


DELTA_BATCH = 256  # deltas decoded at once: their bases (~20 KiB each) are held meanwhile


def _check_deltas(out: PackData, where: str, fmt: pack.BlobFormat,
                  bases_of: Callable[[list[bytes]], pack.Bases] | None) -> None:
    """Decode the pack's delta chunks with their bases, a batch at a time (a pack of nightly deltas holds
    thousands: all their bases at once would take hundreds of MB). When a batch's bases cannot all be read,
    each delta's base is read alone, so that a damaged base is blamed on its own deltas only."""
    for i in range(0, len(out.deltas), DELTA_BATCH):
        batch = out.deltas[i : i + DELTA_BATCH]
        try:
            bases: pack.Bases | None = bases_of([e.id for e, _ in batch]) if bases_of is not None else {}
        except IntegrityError:
            bases = None
        for e, stored in batch:
            own = bases
            if own is None and bases_of is not None:
                try:
                    own = bases_of([e.id])
                except IntegrityError as exc:
                    out.errors.append((e, f"its base cannot be read: {exc}", True))
                    continue
            try:
                pack.decode_checked(fmt, e.type, e.codec, e.raw_len, stored, e.id, where, e.offset, own)
            except IntegrityError as exc:
                out.errors.append((e, str(exc).removeprefix(f"{where}: "), True))


def _check_blob(view: memoryview, pos: int, e: pack.BlobEntry, full: bool, where: str, out: PackData,
                fmt: pack.BlobFormat) -> str:
    if len(view) < pos + pack.blob_span(e.stored_len):
        return f"blob {e.id.hex()[:16]} at {e.offset} is truncated"
    if not full:
        return fmt.header_problem(view, pos, e)
    # Opened once (a sealed blob: one decryption), compared with its trailer row, then decoded and hashed.
    try:
        type_, codec, raw_len, stored = fmt.open_blob(view, pos, e.type, e.id, e.stored_len, where, e.offset)
        # (A sealed blob's stored bytes are shorter than its row's length by its padding.)
        if (type_, codec, raw_len) != (e.type, e.codec, e.raw_len) or \
                (not fmt.encrypted and len(stored) != e.stored_len):
            return f"blob header at {e.offset} does not match the trailer (blob {e.id.hex()[:16]})"
        if codec == pack.DELTA:
            out.deltas.append((e, bytes(stored)))  # decoded once the pack is read, with its base
            return ""
        raw = pack.decode_checked(fmt, type_, codec, raw_len, stored, e.id, where, e.offset)
    except IntegrityError as exc:
        return str(exc).removeprefix(f"{where}: ")
    if e.type in META_TYPES:
        out.meta.append((e, raw))
    return ""


def read_blobs(store: Store, name: str, entries: list[pack.BlobEntry], fmt: pack.BlobFormat
               ) -> list[tuple[pack.BlobEntry, bytes | str]]:
    """Each blob's verified raw bytes, or why its bytes are damaged (repair: the metadata blobs of a pack).

    A blob that cannot be *read* (an I/O error, a server that does not answer, a pack gone since it was
    listed) raises StoreError instead: its bytes may be fine, and a repair that left out what it holds would
    let prune delete the rest of those snapshots."""
    out: list[tuple[pack.BlobEntry, bytes | str]] = []
    where = base_name(name)
    try:
        reader = store.open(name, where)
    except NotAnObject as exc:
        return [(e, str(exc)) for e in entries]
    with reader:
        for e in entries:
            try:
                type_, raw = pack.read_blob(reader, e, where, fmt)
                out.append((e, raw) if type_ == e.type else (e, f"{where}: blob at {e.offset} has the wrong type"))
            except StoreError:
                raise
            except IntegrityError as exc:
                out.append((e, str(exc)))
            except OSError as exc:
                raise StoreError(where, f"cannot read blob at {e.offset}: {exc.strerror}", exc.strerror) from None
    return out


@dataclass
class Salvage:
    """The blobs of a pack read without its trailer (repair index, on a pack whose trailer is cut or damaged):
    a forward scan from the first blob, each blob verified as a read verifies it."""

    entries: list[pack.BlobEntry] = field(default_factory=list)  # verified, at their offsets in the pack
    deltas: int = 0  # DELTA chunks passed over: the base each needs is named only by the trailer
    damaged: int = 0  # blobs whose bytes did not verify
    end: int = 0  # where the scan stopped: the first offset where no whole blob starts


# The longest span a blob can have (MAX_BLOB stored bytes, its header, a sealed blob's padding of at most 4096):
# the salvage scan keeps at most two of these in memory, whatever the size of the damaged file.
_SCAN_WINDOW = pack.blob_span(pack.MAX_BLOB) + 4096


def salvage_pack(store: Store, name: str, fmt: pack.BlobFormat) -> Salvage | None:
    """Scan the pack ``name`` blob by blob from offset 8 (blobs lie back to back, docs/format.md §4); None when
    it does not even start with the pack magic (not a pack of this repository: nothing to salvage). A StoreError
    (the pack cannot be read) propagates: repair stops rather than guess.

    A blob that fails to verify is passed over by the length its header claims: when the damage is in that
    length, the next offsets hold no blob and the scan ends there; a blob found at a wrong offset would still
    have to decode and hash to its id, so nothing unverified is ever registered. The file is read in windows
    (a damaged file may be of any size): each blob is looked at with at least the longest span a blob can
    have, or the rest of the file, in memory."""
    where = base_name(name)
    with store.open(name, where) as reader:
        size = reader.size

        def read(offset: int, length: int) -> bytes:
            try:
                return reader.pread(length, offset)
            except OSError as exc:
                raise StoreError(where, f"cannot read pack at {offset}: {exc.strerror}", exc.strerror) from None

        magic = fmt.pack_magic
        if read(0, len(magic)) != magic:
            return None
        out = Salvage(end=len(magic))
        seen: set[bytes] = set()
        start, buf = out.end, b""  # buf holds the file's bytes from ``start``
        while True:
            have = start + len(buf)
            if have < size and out.end + _SCAN_WINDOW > have:
                buf = buf[out.end - start :] + read(have, min(size, out.end + 2 * _SCAN_WINDOW) - have)
                start = out.end
            found = fmt.find_blob(memoryview(buf), out.end - start, where)
            if not found.span:
                return out
            entry = found.entry
            if entry is not None and entry.id not in seen:  # (a pack never holds an id twice)
                out.entries.append(replace(entry, offset=out.end))
                seen.add(entry.id)
            elif found.delta:
                out.deltas += 1
            elif entry is None:
                out.damaged += 1
            out.end += found.span


def tmp_leftovers(store: Store) -> list[tuple[str, str]]:
    """Entries of the store's ``tmp/`` that no running process is writing, with what each one is; each
    named by its location (local: its path)."""
    out = []
    try:
        listing = store.list(TEMP_PREFIX)
    except OSError:
        return []
    for full in sorted([o.name for o in listing.objects] + listing.dirs):
        name = full[len(TEMP_PREFIX) :]
        m = _TMP_NAME.match(name)
        if m and _pid_alive(int(m.group(1))):
            continue  # a pack being written right now
        if m:
            what = "a pack left by an interrupted snapshot"
        elif name.startswith(REBUILD_PREFIX):
            what = "a partial index left by an interrupted 'repair index'"
        elif name.startswith(OLD_PREFIX):
            what = "the old index a 'repair index' replaced"
        else:
            what = "an unknown file"
        out.append((store.location(full), what))
    return out


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
