"""The LMDB index: the only module that imports lmdb.

Named databases (docs/format.md gives each key and value byte for byte):

``blobs``     blob id -> location, lengths, codec, type and reference count
``packs``     pack number (u32 big endian) -> pack id, size, blob count
``pack_ids``  pack id -> pack number
``segments``  segment id -> encoded segment (a copy of the blob, for fast reads)
``snapshots`` snapshot id -> encoded snapshot record
``meta``      b"next_pack" -> u32; b"forgot/" + record id -> b"" for every record a tombstone named; in a
              remote repository's cache also b"obj/<index object name>" -> the ids of the packs it lists, for
              every index object applied (repo/indexobjects.py)
``dead``      blob id -> b"": every chunk or segment row with refcount 0, and every forgotten snapshot record's
              row; what a prune starts from, so that its work follows what died, not the repository's size
``garbage``   pack number -> u64: bytes of blobs in that pack that no row points at any more (a prune
              dropped their rows but kept the pack; a second copy of an id already indexed)

Reference counts: a segment's count is the number of times live snapshot records list it; a chunk's count is
the number of times stored segments list it. Both change in the same transaction as the records that cause
them, so a prune can see what died without reading every snapshot.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

import lmdb

from dedupimg.core.errors import IntegrityError, NoSpaceError, PermissionDenied, RepositoryLocked
from dedupimg.core.manifest import SnapshotRecord, decode_segment, decode_tombstone
from dedupimg.repo import lmdbpages
from dedupimg.repo.pack import RowLike

BLOB_VALUE = struct.Struct("<BBIQIII")
PACK_NO = struct.Struct(">I")
PACK_VALUE = struct.Struct("<32sQI")
GARBAGE_VALUE = struct.Struct("<Q")
REFCOUNT_OFFSET = BLOB_VALUE.size - 4  # the refcount is the last field of a blobs row
BLOB_HEADER_SIZE = 44  # pack.BLOB_HEADER.size: a blob takes this plus its stored length in its pack
INITIAL_MAP = 64 << 20
DATA_FILE = "data.mdb"
FORGOTTEN_KEY = b"forgot/"  # meta: b"forgot/" + record id -> b"": a record a tombstone names (forget, sync)
BASE_KEY = b"base/"  # meta: b"base/" + delta chunk id -> its base chunk's id (format 3: docs/format.md §7.3)
DELTA_CODEC = 2  # codecs.DELTA
OBJECT_KEY = b"obj/"  # meta: b"obj/" + index object name -> the 32-byte ids of the packs it lists (remote only)
# meta: b"leftout/" + record id -> b"": a record a repair (or a sync) found but could not list, its data being
# incomplete. Prune keeps what such a record still has until it is forgotten (docs/format.md §7, §8.5).
LEFT_OUT_KEY = b"leftout/"
# meta: b"salvaged/" + pack id -> b"": a pack whose trailer a repair could not use; its rows are the blobs a
# forward scan verified. Prune rewrites it (its intact blobs into a new pack) and deletes it (§8.5).
SALVAGED_KEY = b"salvaged/"
# Blob types whose rows are counted (pack.CHUNK, pack.SEGMENT), the record type, and the tombstone type
# (pack.TOMBSTONE), whose rows hold a permanent count of 1: tombstones are never garbage.
_COUNTED = (0, 1)
_CHUNK_TYPE = 0
_SEGMENT_TYPE = 1
_SNAPSHOT_TYPE = 2
_TOMBSTONE_TYPE = 3
T = TypeVar("T")


class BlobLocation(NamedTuple):
    """A blobs row. A named tuple, not a dataclass: every read of a chunk builds one, and a frozen
    dataclass costs several times more to build."""

    type: int
    codec: int
    pack_no: int
    offset: int
    stored_len: int
    raw_len: int
    refcount: int


@dataclass(frozen=True)
class NewBlob:
    type: int
    codec: int
    offset: int
    stored_len: int
    raw_len: int
    id: bytes
    base: bytes = b""  # a DELTA chunk's base chunk


@dataclass(frozen=True)
class SealedPack:
    """A durable pack (fsynced, renamed, directory fsynced) and the rows of every blob in it: what an index
    transaction registers. Made only by ``Repository.seal`` (or, for repair, from a checked trailer)."""

    id: bytes
    size: int
    blobs: list[NewBlob]
    # A remote repository's index object that lists this pack (repo/indexobjects.py), published before the
    # transaction that registers the pack; the transaction records it as seen (``meta``: b"obj/" + name).
    published: str | None = None

    @classmethod
    def from_entries(cls, pack_id: bytes, size: int, entries: Iterable[RowLike],
                     published: str | None = None) -> SealedPack:
        return cls(pack_id, size, [NewBlob(e.type, e.codec, e.offset, e.stored_len, e.raw_len, e.id, e.base)
                                   for e in entries], published)


@dataclass
class DeferredLinks:
    """DELTA rows that a sync or repair registered before every pack was (packs come in any order there):
    linked by :meth:`Index.link_deltas` at the end. ``spares`` keeps the other delta copies of a chunk (a stale
    copy left in a kept pack by a prune, another snapshot's): when the base of the copy that took the row is
    gone, a copy whose base is there takes the row instead of the chunk being dropped (found by review: a
    repair or a cache rebuild that met the stale copy first left a healthy snapshot out, and a prune then
    deleted it)."""

    links: dict[bytes, bytes] = field(default_factory=dict)  # delta id -> base of the copy that has the row
    spares: dict[bytes, list[tuple[int, NewBlob]]] = field(default_factory=dict)  # delta id -> (pack no, copy)


@dataclass(frozen=True)
class NewSegment:
    id: bytes
    raw: bytes
    chunk_ids: list[bytes]


@dataclass(frozen=True)
class NewSnapshot:
    id: bytes
    raw: bytes
    segment_ids: list[bytes]


class ObjectListing(Protocol):
    """One pack as an index object lists it (indexobjects.PackListing), without importing that module."""

    @property
    def sealed(self) -> SealedPack: ...
    @property
    def metadata(self) -> dict[bytes, bytes]: ...


@dataclass
class SyncReport:
    objects: int = 0  # index objects added
    packs: int = 0
    segments: int = 0
    snapshots: int = 0  # records listed
    forgotten: int = 0  # listed records a tombstone dropped
    left_out: list[bytes] = field(default_factory=list)  # records whose segments are not all stored


@dataclass(frozen=True)
class PackRow:
    pack_no: int
    id: bytes
    size: int
    blob_count: int


DATABASES = (b"blobs", b"packs", b"pack_ids", b"segments", b"snapshots", b"meta", b"dead", b"garbage")
MIN_DATA_FILE = 2 * 4096  # LMDB's two meta pages: anything shorter is not an index
# LMDB's on-disk structs (lmdb.h / mdb.c, 64-bit): a page header of 16 bytes; MDB_meta's main database
# record at 88 (its md_root at 128), mm_txnid at 144 (tree pages: repo/lmdbpages.py).
META_MAIN_ROOT = 128
META_TXNID = 144
META_END = 152


def _damaged(path: Path, why: str) -> IntegrityError:
    return IntegrityError(f"index {path} is damaged ({why}); rebuild it from the packs with 'dedupimg repair index'")


class Index:
    """The LMDB environment in ``path``.

    ``create`` (init and repair only) makes a new environment and its databases. Every other open refuses
    anything but a complete index: a missing, empty or truncated ``data.mdb`` or a missing database is damage
    (exit 17, "run repair index"), never an empty repository, since a prune would then take every pack for
    garbage (issue 11 §1b). A directory this process cannot write (read-only media, a read-only bind mount,
    a user with read access only) is opened read-only, so that snapshots, restore, verify, mount, serve and
    check still work there.
    """

    def __init__(self, path: Path, create: bool = False) -> None:
        self._path = path
        data = path / DATA_FILE
        readonly = False
        if not create:
            try:
                st = os.stat(data)
            except (FileNotFoundError, NotADirectoryError):
                # LMDB would quietly make an empty index: every snapshot would seem gone. (NotADirectory:
                # index/ is a file; found by review, it was exit 1 without the hint.)
                raise IntegrityError(
                    f"index {path} is missing (no {DATA_FILE}); rebuild it from the packs with "
                    "'dedupimg repair index'"
                ) from None
            except PermissionError:
                raise PermissionDenied(f"cannot open the index at {path}: permission denied") from None
            if not stat.S_ISREG(st.st_mode):
                raise _damaged(path, f"{DATA_FILE} is not a regular file")
            if st.st_size < MIN_DATA_FILE:
                raise _damaged(path, f"{DATA_FILE} is {st.st_size} bytes long")
            readonly = not (os.access(path, os.W_OK) and os.access(data, os.W_OK))
        self.readonly = readonly
        self._env = self._open_env(create, readonly)
        try:
            if not create:
                self._check_size(data)
            self._dbs = [self._open_db(name, create) for name in DATABASES]
        except BaseException:
            self._env.close()
            raise
        (self._blobs, self._packs, self._pack_ids, self._segments, self._snapshots, self._meta, self._dead,
         self._garbage) = self._dbs

    def _open_env(self, create: bool, readonly: bool) -> lmdb.Environment:
        path = self._path
        try:
            return lmdb.open(str(path), map_size=INITIAL_MAP, max_dbs=12, subdir=True, mode=0o600,
                             create=create, readonly=readonly)
        except lmdb.Error as exc:
            if readonly and _cannot_write(exc):
                # The lock file cannot be opened for writing: read without LMDB's reader table. The
                # repository's shared flock still keeps prune and forget out while this process reads.
                try:
                    return lmdb.open(str(path), max_dbs=12, subdir=True, create=False, readonly=True, lock=False)
                except lmdb.Error as exc2:
                    raise _translate(exc2, path) from None
            raise _translate(exc, path) from None

    def _check_size(self, data: Path) -> None:
        """Refuse a data file cut short, which would fault (SIGBUS) when a page past its end is read.

        The meta page's ``last_pgno`` may legitimately lie many pages past the end of the file: pages that a
        large transaction allocated and freed again ("loose" pages) are never written, nor read. A cut file
        is told apart by its trees: every page they point at must lie in the file and be a tree page (the
        walk of repo/lmdbpages.py; it found, where the roots alone did not, a cut of pages that a commit had
        reused from the free list). Where the file can be written, the gap is then filled with zeros
        (posix_fallocate only ever extends): pages no tree points at.
        """
        try:
            psize = int(self._env.stat()["psize"])
            needed = (int(self._env.info()["last_pgno"]) + 1) * psize
        except lmdb.Error as exc:
            raise _damaged(self._path, _one_line(exc)) from None
        size = os.stat(data).st_size
        if size >= needed:
            return
        # Every page the trees point at must lie in the file and be a tree page (repo/lmdbpages.py): a page past
        # the end faults, and a zeroed one read as a tree page aborts in an LMDB assertion. (Only when the file
        # is short: the pages read are then what any full scan reads anyway.)
        with open(data, "rb") as f:
            found = lmdbpages.problem(f.fileno(), psize, [("the main database", self._main_root(data, psize))])
        if found is not None:
            raise _damaged(self._path, f"{DATA_FILE} is {size} bytes long: {found}")
        if not self.readonly:
            try:
                fd = os.open(data, os.O_WRONLY)
                try:
                    os.posix_fallocate(fd, 0, needed)
                finally:
                    os.close(fd)
            except OSError:
                pass  # a full disk: the gap stays, and an intact tree never reads its pages

    def _main_root(self, data: Path, psize: int) -> int:
        """The main database's root page, from the newer meta page (LMDB's MDB_meta, 64-bit)."""
        with open(data, "rb") as f:
            metas = []
            for m in (0, psize):
                page = os.pread(f.fileno(), META_END, m)
                if len(page) == META_END:
                    metas.append((int.from_bytes(page[META_TXNID : META_TXNID + 8], "little"),
                                  int.from_bytes(page[META_MAIN_ROOT : META_MAIN_ROOT + 8], "little")))
        if not metas:
            raise _damaged(self._path, "no meta page")
        return max(metas)[1]

    def _open_db(self, name: bytes, create: bool) -> lmdb._Database:
        try:
            return self._env.open_db(name, create=create)
        except lmdb.NotFoundError:
            raise _damaged(self._path, f"its {name.decode()!r} database is missing") from None
        except lmdb.Error as exc:
            raise _damaged(self._path, _one_line(exc)) from None

    def close(self) -> None:
        self._env.close()

    # -- reading -------------------------------------------------------------------------------------------

    def _read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        with self._damage_is_integrity():
            try:
                with self._env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)  # another process grew the map: adopt its size
                with self._env.begin() as txn:
                    return fn(txn)

    @contextmanager
    def _damage_is_integrity(self) -> Iterator[None]:
        """A damaged page met while reading (MDB_CORRUPTED, a bad page number, ...) is exit 17, "run repair
        index", like a damaged file found at open."""
        try:
            yield
        except lmdb.MapResizedError:
            raise
        except lmdb.Error as exc:
            raise _damaged(self._path, _one_line(exc)) from None

    def lookup_blobs(self, ids: list[bytes]) -> list[BlobLocation | None]:
        def run(txn: lmdb.Transaction) -> list[BlobLocation | None]:
            out: list[BlobLocation | None] = []
            for i in ids:
                v = txn.get(i, db=self._blobs)
                out.append(BlobLocation(*BLOB_VALUE.unpack(v)) if v is not None else None)
            return out

        return self._read(run)

    def delta_bases(self, ids: list[bytes]) -> list[bytes | None]:
        """The base chunk of each id that is a DELTA chunk, None for every other id."""

        def run(txn: lmdb.Transaction) -> list[bytes | None]:
            get, meta = txn.get, self._meta
            return [None if (v := get(BASE_KEY + i, db=meta)) is None else bytes(v) for i in ids]

        return self._read(run)

    def has_blobs(self, ids: list[bytes]) -> list[bool]:
        return self._read(lambda txn: [txn.get(i, db=self._blobs) is not None for i in ids])

    def forgotten(self, record_ids: list[bytes]) -> list[bool]:
        """For each snapshot record id, whether a tombstone named it (forget, tag): such a record is never
        listed again, even once prune has dropped its row."""
        return self._read(lambda txn: [txn.get(FORGOTTEN_KEY + i, db=self._meta) is not None for i in record_ids])

    def get_segment(self, seg_id: bytes) -> bytes | None:
        return self._get(seg_id, self._segments)

    def get_snapshot(self, snap_id: bytes) -> bytes | None:
        return self._get(snap_id, self._snapshots)

    def _get(self, key: bytes, db: lmdb._Database) -> bytes | None:
        v = self._read(lambda txn: txn.get(key, db=db))
        return None if v is None else bytes(v)

    def snapshots(self) -> list[tuple[bytes, bytes]]:
        return self._read(lambda txn: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._snapshots).iternext()])

    def pack_id(self, pack_no: int) -> bytes:
        v = self._read(lambda txn: txn.get(PACK_NO.pack(pack_no), db=self._packs))
        if v is None:
            raise IntegrityError(f"index names pack number {pack_no}, which it does not list")
        return bytes(PACK_VALUE.unpack(v)[0])

    def pack_rows(self) -> list[PackRow]:
        def run(txn: lmdb.Transaction) -> list[PackRow]:
            rows = []
            for k, v in txn.cursor(db=self._packs).iternext():
                pid, size, count = PACK_VALUE.unpack(v)
                rows.append(PackRow(PACK_NO.unpack(k)[0], bytes(pid), size, count))
            return rows

        return self._read(run)

    def refcounts(self, ids: list[bytes]) -> list[int | None]:
        """Reference count of each blob (None if not indexed): prune's cascade asks this of many chunks."""
        def run(txn: lmdb.Transaction) -> list[int | None]:
            out: list[int | None] = []
            get = txn.get
            for i in ids:
                v = get(i, db=self._blobs)
                out.append(None if v is None else int.from_bytes(v[REFCOUNT_OFFSET:], "little"))
            return out

        return self._read(run)

    def pack_rows_of(self, pack_nos: Iterable[int]) -> dict[int, PackRow]:
        """The ``packs`` rows of ``pack_nos`` that exist (one read transaction)."""

        def run(txn: lmdb.Transaction) -> dict[int, PackRow]:
            out = {}
            for no in pack_nos:
                v = txn.get(PACK_NO.pack(no), db=self._packs)
                if v is not None:
                    pid, size, count = PACK_VALUE.unpack(v)
                    out[no] = PackRow(no, bytes(pid), size, count)
            return out

        return self._read(run)

    def pack_numbers(self, pack_ids: Iterable[bytes]) -> dict[bytes, int]:
        """Pack number of each of ``pack_ids`` that the index lists."""

        def run(txn: lmdb.Transaction) -> dict[bytes, int]:
            out = {}
            for pid in pack_ids:
                v = txn.get(pid, db=self._pack_ids)
                if v is not None:
                    out[pid] = PACK_NO.unpack(v)[0]
            return out

        return self._read(run)

    def dead_rows(self) -> list[tuple[bytes, BlobLocation | None]]:
        """Every row in ``dead`` with its blob row (None if the blob row is gone, which check reports)."""

        def run(txn: lmdb.Transaction) -> list[tuple[bytes, BlobLocation | None]]:
            out: list[tuple[bytes, BlobLocation | None]] = []
            for k in txn.cursor(db=self._dead).iternext(keys=True, values=False):
                v = txn.get(k, db=self._blobs)
                out.append((bytes(k), BlobLocation(*BLOB_VALUE.unpack(v)) if v is not None else None))
            return out

        return self._read(run)

    def garbage_bytes(self) -> dict[int, int]:
        return self._read(lambda txn: {
            PACK_NO.unpack(k)[0]: GARBAGE_VALUE.unpack(v)[0] for k, v in txn.cursor(db=self._garbage).iternext()
        })

    def iter_segments(self) -> Iterator[tuple[bytes, bytes]]:
        """(id, encoded segment) of every stored segment, from one read transaction held while iterating."""
        with self._damage_is_integrity(), self._env.begin() as txn:
            for k, v in txn.cursor(db=self._segments).iternext():
                yield bytes(k), bytes(v)

    def has_segments(self, ids: list[bytes]) -> list[bool]:
        return self._read(lambda txn: [txn.get(i, db=self._segments) is not None for i in ids])

    def entry_counts(self) -> dict[str, int]:
        """Number of entries in each database (for progress totals; one read transaction)."""
        dbs = {"blobs": self._blobs, "packs": self._packs, "segments": self._segments,
               "snapshots": self._snapshots, "dead": self._dead}
        return self._read(lambda txn: {name: int(txn.stat(db)["entries"]) for name, db in dbs.items()})

    def has_unforgotten_records(self) -> bool:
        """Whether a snapshot record's row is neither listed in ``snapshots`` nor in ``dead`` nor left out by a
        repair (damage: an index that lost its listings)."""

        def run(txn: lmdb.Transaction) -> bool:
            for k, v in txn.cursor(db=self._blobs).iternext():
                if v[0] == _SNAPSHOT_TYPE and txn.get(k, db=self._snapshots) is None \
                        and txn.get(k, db=self._dead) is None and txn.get(LEFT_OUT_KEY + k, db=self._meta) is None:
                    return True
            return False

        return self._read(run)

    def left_out(self) -> list[bytes]:
        """The records a repair (or a sync) left out, their data incomplete: ``meta`` b"leftout/" keys."""
        return self._read(lambda txn: self._ids_under(txn, LEFT_OUT_KEY))

    def salvaged_packs(self) -> list[bytes]:
        """The packs a repair registered from a forward scan, their trailer unusable: b"salvaged/" keys."""
        return self._read(lambda txn: self._ids_under(txn, SALVAGED_KEY))

    def _ids_under(self, txn: lmdb.Transaction, prefix: bytes) -> list[bytes]:
        out = []
        with txn.cursor(db=self._meta) as cur:
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if not bytes(k).startswith(prefix):
                        break
                    out.append(bytes(k)[len(prefix):])
        return out

    def note_left_out(self, record_ids: Iterable[bytes]) -> None:
        """Mark records a repair could not list (repair index, in the index it builds)."""
        self._write(lambda txn: [txn.put(LEFT_OUT_KEY + i, b"", db=self._meta) for i in record_ids])

    def note_salvaged(self, pack_ids: Iterable[bytes]) -> None:
        """Mark packs a repair registered from a forward scan (repair index, in the index it builds)."""
        self._write(lambda txn: [txn.put(SALVAGED_KEY + i, b"", db=self._meta) for i in pack_ids])

    def drop_salvaged_marks(self) -> None:
        """Drop the marks of salvaged packs the index no longer lists (prune, once their files are deleted: until
        then the mark tells the leftover file of a rewrite from a damaged pack that may hold lost snapshots)."""

        def run(txn: lmdb.Transaction) -> None:
            for pack_id in self._ids_under(txn, SALVAGED_KEY):
                if txn.get(pack_id, db=self._pack_ids) is None:
                    txn.delete(SALVAGED_KEY + pack_id, db=self._meta)

        self._write(run)

    def pack_rows_in(self, pack_nos: Iterable[int]) -> dict[int, list[tuple[bytes, BlobLocation]]]:
        """The ``blobs`` rows that point into each of ``pack_nos`` (a scan of every row: prune asks this only
        of salvaged packs, whose trailer cannot say what they hold)."""
        wanted = set(pack_nos)

        def run(txn: lmdb.Transaction) -> dict[int, list[tuple[bytes, BlobLocation]]]:
            out: dict[int, list[tuple[bytes, BlobLocation]]] = {n: [] for n in wanted}
            for k, v in txn.cursor(db=self._blobs).iternext():
                loc = BlobLocation(*BLOB_VALUE.unpack(v))
                if loc.pack_no in wanted:
                    out[loc.pack_no].append((bytes(k), loc))
            return out

        return self._read(run)

    def tombstone_ids(self) -> list[bytes]:
        return self._read(lambda txn: [bytes(k) for k, v in txn.cursor(db=self._blobs).iternext()
                                       if v[0] == _TOMBSTONE_TYPE])

    def iter_blob_rows(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """Every ``blobs`` row in id order, streamed from one read transaction held while iterating."""
        with self._damage_is_integrity(), self._begin_read() as txn:
            for k, v in txn.cursor(db=self._blobs).iternext():
                yield bytes(k), BlobLocation(*BLOB_VALUE.unpack(v))

    def scan(
        self,
        on_segment: Callable[[bytes, bytes], None],
        on_snapshot: Callable[[bytes, bytes], None],
        on_blob: Callable[[bytes, BlobLocation | None, bool], None],
        on_link: Callable[[bytes, bytes], None] = lambda delta, base: None,
    ) -> tuple[list[PackRow], dict[bytes, int], int, dict[int, int]]:
        """Everything ``check`` compares, from ONE read transaction, so that a concurrent commit cannot make
        the counts disagree: calls ``on_segment(id, encoded)`` for every stored segment, then
        ``on_snapshot(id, encoded)`` for every record, ``on_link(delta id, base id)`` for every delta's link, then
        ``on_blob(id, row or None, in_dead)`` for every id
        in ``blobs`` or ``dead`` (the two merged in key order); returns the ``packs`` rows, ``pack_ids``
        (pack id -> number), ``meta/next_pack`` and ``garbage`` (pack number -> bytes).
        """
        with self._damage_is_integrity(), self._begin_read() as txn:
            packs = []
            for k, v in txn.cursor(db=self._packs).iternext():
                pid, size, count = PACK_VALUE.unpack(v)
                packs.append(PackRow(PACK_NO.unpack(k)[0], bytes(pid), size, count))
            pack_ids = {bytes(k): int(PACK_NO.unpack(v)[0]) for k, v in txn.cursor(db=self._pack_ids).iternext()}
            raw_no = txn.get(b"next_pack", db=self._meta)
            next_pack = int(PACK_NO.unpack(raw_no)[0]) if raw_no else 0
            garbage = {int(PACK_NO.unpack(k)[0]): int(GARBAGE_VALUE.unpack(v)[0])
                       for k, v in txn.cursor(db=self._garbage).iternext()}
            for k, v in txn.cursor(db=self._segments).iternext():
                on_segment(bytes(k), bytes(v))
            for k, v in txn.cursor(db=self._snapshots).iternext():
                on_snapshot(bytes(k), bytes(v))
            with txn.cursor(db=self._meta) as cur:
                if cur.set_range(BASE_KEY):
                    for k, v in cur:
                        if not bytes(k).startswith(BASE_KEY):
                            break
                        on_link(bytes(k)[len(BASE_KEY):], bytes(v))
            dead = (bytes(k) for k in txn.cursor(db=self._dead).iternext(keys=True, values=False))
            next_dead = next(dead, None)
            for k, v in txn.cursor(db=self._blobs).iternext():
                key = bytes(k)
                while next_dead is not None and next_dead < key:
                    on_blob(next_dead, None, True)
                    next_dead = next(dead, None)
                in_dead = next_dead == key
                if in_dead:
                    next_dead = next(dead, None)
                on_blob(key, BlobLocation(*BLOB_VALUE.unpack(v)), in_dead)
            while next_dead is not None:
                on_blob(next_dead, None, True)
                next_dead = next(dead, None)
        return packs, pack_ids, next_pack, garbage

    def _begin_read(self) -> lmdb.Transaction:
        try:
            return self._env.begin()
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process grew the map: adopt its size
            return self._env.begin()

    # -- writing -------------------------------------------------------------------------------------------

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                # The map is only an address-space reservation: grow it and redo the whole transaction.
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
            except lmdb.Error as exc:
                raise _translate(exc, self._path) from None

    def commit_pack(
        self, sealed: SealedPack, segments: list[NewSegment], snapshot: NewSnapshot | None = None,
        present: Callable[[], bool] | None = None, links: DeferredLinks | None = None,
    ) -> None:
        """Register a durable pack, its blobs and segments, and optionally a snapshot, in one transaction.

        ``present``: asked inside the transaction whether the pack's file is still there (see
        :meth:`discard_unlisted`); IntegrityError, and nothing registered, when it is not. ``links``: delta
        rows are linked later (:meth:`link_deltas`; repair registers packs in any order)."""

        def run(txn: lmdb.Transaction) -> None:
            if present is not None and not present():
                raise IntegrityError(f"pack {sealed.id.hex()} vanished before its commit (another snapshot that "
                                     "wrote the very same pack failed and removed it); nothing was listed")
            self._register_pack(txn, sealed, links)
            self._store_segments(txn, segments)
            if snapshot is not None:
                self._store_snapshot(txn, snapshot)

        self._write(run)

    def discard_unlisted(self, pack_id: bytes, delete: Callable[[], object]) -> None:
        """``delete()`` the file of a pack whose commit failed, unless the index lists that pack: inside a write
        transaction, so that it cannot fall between another process's check that the same pack's file is there
        and that process's commit (two snapshots can write byte-identical packs, and so the same file)."""

        def run(txn: lmdb.Transaction) -> None:
            if txn.get(pack_id, db=self._pack_ids) is None:
                delete()

        self._write(run)

    def add_references(self, segments: list[NewSegment], snapshots: list[NewSnapshot]) -> None:
        """Store segments and snapshot records whose blobs are already registered (repair index)."""

        def run(txn: lmdb.Transaction) -> None:
            self._store_segments(txn, segments)
            for snap in snapshots:
                self._store_snapshot(txn, snap)

        self._write(run)

    def mark_dead(self, ids: Iterable[bytes]) -> None:
        """Record rows as garbage for the next prune (repair index: records that a tombstone forgets)."""

        def run(txn: lmdb.Transaction) -> None:
            for i in ids:
                txn.put(i, b"", db=self._dead)

        self._write(run)

    def forget(self, tombstone_pack: SealedPack, forgotten: list[NewSnapshot]) -> None:
        """Register the pack holding the tombstone, and drop the snapshot records it names, in one transaction.

        Each record's segments lose one reference per listing; segments that reach 0 and the records' own rows
        go to ``dead``. Chunks are not touched: a prune cascades from dead segments (format.md §7.3).
        """

        def run(txn: lmdb.Transaction) -> None:
            self._register_pack(txn, tombstone_pack)
            self._note_forgotten(txn, [snap.id for snap in forgotten])
            for snap in forgotten:
                if not self._drop_snapshot(txn, snap.id, snap.segment_ids):  # forgotten already (a re-run),
                    self._forget_left_out(txn, snap.id)  # or a record a repair left out

        self._write(run)

    def replace_snapshots(self, sealed: SealedPack, new: list[NewSnapshot], old: list[NewSnapshot]) -> None:
        """Register ``sealed`` (which holds the ``new`` records and a tombstone naming the ``old`` ones), list
        the new records and drop the old ones, in one transaction (``tag``). The new records are counted
        before the old ones are dropped, so a shared segment's count never passes through 0."""

        def run(txn: lmdb.Transaction) -> None:
            self._register_pack(txn, sealed)
            for snap in new:
                self._store_snapshot(txn, snap)
            self._note_forgotten(txn, [snap.id for snap in old])
            for snap in old:
                if not self._drop_snapshot(txn, snap.id, snap.segment_ids):
                    raise IntegrityError(f"snapshot {snap.id.hex()[:8]} is no longer listed; nothing was changed")

        self._write(run)

    def apply_prune(
        self,
        new_packs: list[SealedPack],
        dropped_segments: list[NewSegment],
        dropped_blobs: list[bytes],
        deleted_packs: list[int],
        garbage: dict[int, int],
    ) -> None:
        """Everything a prune changes in the index, in one transaction (docs/format.md §8.5).

        ``new_packs`` hold copies of live blobs: their rows move there, keeping their counts. Dropped segments
        leave ``segments`` and take one reference from each chunk they list. Dropped blobs lose their rows; a
        row that is still referenced at this point aborts the whole transaction (a chunk is never dropped
        while something points at it). ``deleted_packs`` leave ``packs``; ``garbage`` adds bytes to packs that
        stay.
        """

        def run(txn: lmdb.Transaction) -> None:
            lost: Counter[bytes] = Counter()
            for seg in dropped_segments:
                if txn.delete(seg.id, db=self._segments):
                    lost.update(seg.chunk_ids)
            _add_counts(txn, self._blobs, self._dead, lost, -1)
            self._unlink_deltas(txn, dropped_blobs)
            for i in dropped_blobs:
                v = txn.get(i, db=self._blobs)
                if v is None:
                    txn.delete(i, db=self._dead)
                    continue
                loc = BlobLocation(*BLOB_VALUE.unpack(v))
                live = loc.refcount > 0 if loc.type in _COUNTED else (
                    loc.type == _TOMBSTONE_TYPE or txn.get(i, db=self._snapshots) is not None
                )
                if live or (loc.type == 1 and txn.get(i, db=self._segments) is not None):
                    raise IntegrityError(f"prune would drop blob {i.hex()[:16]}, which is still referenced")
                txn.delete(i, db=self._blobs)
                txn.delete(i, db=self._dead)
            for sealed in new_packs:
                if sealed.published is not None:
                    self._note_object(txn, sealed.published, [sealed.id])
                pack_no, _new = self._list_pack(txn, sealed.id, sealed.size, len(sealed.blobs))  # rows move there
                # A salvaged pack rewritten with all its blobs in order is the same pack again (same trailer,
                # same id), now whole: its row takes the new size, and it is no longer salvaged.
                txn.put(PACK_NO.pack(pack_no), PACK_VALUE.pack(sealed.id, sealed.size, len(sealed.blobs)),
                        db=self._packs)
                txn.delete(SALVAGED_KEY + sealed.id, db=self._meta)
                # Every blob of it is live and pointed at: a listed pack of the same content (a rewrite that an
                # interrupted prune made durable, or another host's twin) loses the garbage it had counted.
                txn.delete(PACK_NO.pack(pack_no), db=self._garbage)
                for b in sealed.blobs:
                    v = txn.get(b.id, db=self._blobs)
                    if v is None:
                        raise IntegrityError(f"prune copied blob {b.id.hex()[:16]}, which has no row")
                    refcount = BLOB_VALUE.unpack(v)[-1]
                    txn.put(b.id, BLOB_VALUE.pack(b.type, b.codec, pack_no, b.offset, b.stored_len, b.raw_len,
                                                  refcount), db=self._blobs)
            for pack_no in deleted_packs:
                key = PACK_NO.pack(pack_no)
                v = txn.get(key, db=self._packs)
                if v is not None:
                    txn.delete(bytes(PACK_VALUE.unpack(v)[0]), db=self._pack_ids)
                    txn.delete(key, db=self._packs)
                txn.delete(key, db=self._garbage)
            for pack_no, nbytes in garbage.items():
                _add_garbage(txn, self._garbage, pack_no, nbytes)

        self._write(run)

    # -- a remote repository's cache: index objects (repo/indexobjects.py) ---------------------------------------

    def index_objects(self) -> dict[str, list[bytes]]:
        """The index objects this cache holds, each with the ids of the packs it lists."""

        def run(txn: lmdb.Transaction) -> dict[str, list[bytes]]:
            out = {}
            with txn.cursor(db=self._meta) as cur:
                if cur.set_range(OBJECT_KEY):
                    for k, v in cur:
                        if not bytes(k).startswith(OBJECT_KEY):
                            break
                        v = bytes(v)
                        out[bytes(k)[len(OBJECT_KEY):].decode()] = [v[i:i + 32] for i in range(0, len(v), 32)]
            return out

        return self._read(run)

    def replace_objects(self, removed: Iterable[str], added: dict[str, list[bytes]]) -> None:
        """Record that index objects were replaced (a prune rewrote those listing deleted packs)."""

        def run(txn: lmdb.Transaction) -> None:
            for name in removed:
                txn.delete(OBJECT_KEY + name.encode(), db=self._meta)
            for name, pack_ids in added.items():
                self._note_object(txn, name, pack_ids)

        self._write(run)

    def sync(self, objects: Mapping[str, Sequence[ObjectListing]], replace: bool = False) -> SyncReport:
        """Add what index objects list to this cache, in one transaction; with ``replace``, the cache is
        emptied first and rebuilt from ``objects`` alone (they must then be every object in the store).

        The same derivation as ``repair index`` (repo/repair.py), from listings instead of pack trailers:
        packs are registered with all their blobs; a segment all of whose chunks are indexed is stored; a new
        snapshot record is listed when no tombstone names it and its segments are stored; a tombstone drops
        the listed records it names. Objects this cache has seen already are skipped (another process of this
        host may have applied them meanwhile).
        """

        def run(txn: lmdb.Transaction) -> SyncReport:
            report = SyncReport()
            numbers: dict[bytes, int] = {}
            if replace:
                # Packs keep their numbers and gone packs' numbers are never given again: a process of this
                # host that is open meanwhile (a mount, a restore: unlocked commands sync too) holds pack
                # numbers from before, and must never find another pack under one of them.
                numbers = {bytes(k): PACK_NO.unpack(v)[0] for k, v in txn.cursor(db=self._pack_ids)}
                next_no = txn.get(b"next_pack", db=self._meta)
                # The marks of packs this host's repair salvaged are in no index object: a rebuild keeps them,
                # or this host's prune would stop at such a pack's cut trailer (and never rewrite it).
                salvaged = self._ids_under(txn, SALVAGED_KEY)
                for db in self._dbs:
                    txn.drop(db, delete=False)
                if next_no is not None:
                    txn.put(b"next_pack", next_no, db=self._meta)
                for pack_id in salvaged:
                    txn.put(SALVAGED_KEY + pack_id, b"", db=self._meta)
            todo = {n: ls for n, ls in objects.items() if txn.get(OBJECT_KEY + n.encode(), db=self._meta) is None}
            new_records: dict[bytes, bytes] = {}
            segments: dict[bytes, bytes] = {}
            forgotten: set[bytes] = set()
            links = DeferredLinks()
            for name, listings in sorted(todo.items()):
                for listing in listings:
                    for b in listing.sealed.blobs:
                        raw = listing.metadata.get(b.id)
                        if b.type == _SNAPSHOT_TYPE and raw is not None and txn.get(b.id, db=self._blobs) is None:
                            new_records[b.id] = raw
                        elif b.type == _SEGMENT_TYPE and raw is not None:
                            segments[b.id] = raw
                        elif b.type == _TOMBSTONE_TYPE and raw is not None:
                            forgotten.update(decode_tombstone(raw))
                    self._register_pack(txn, listing.sealed, links, numbers)
                    report.packs += 1
                self._note_object(txn, name, [ls.sealed.id for ls in listings])
            self._link_deferred(txn, links)
            stored = []
            for seg_id, raw in segments.items():
                # Only a segment with a row: a prune of this cache drops the rows of dead segments in packs it
                # keeps, and an object listing such a pack must not bring the segment back without its row.
                if txn.get(seg_id, db=self._segments) is None and txn.get(seg_id, db=self._blobs) is not None:
                    chunk_ids = decode_segment(raw).chunk_ids()
                    if all(txn.get(c, db=self._blobs) is not None for c in chunk_ids):
                        stored.append(NewSegment(seg_id, raw, chunk_ids))
            self._store_segments(txn, stored)
            report.segments = len(stored)
            self._note_forgotten(txn, forgotten)
            for rec_id, raw in sorted(new_records.items()):
                if rec_id in forgotten or txn.get(FORGOTTEN_KEY + rec_id, db=self._meta) is not None:
                    txn.put(rec_id, b"", db=self._dead)
                    continue
                seg_ids = [sid for sid, _ in SnapshotRecord.decode(raw).segments]
                if all(txn.get(sid, db=self._segments) is not None for sid in seg_ids):
                    self._store_snapshot(txn, NewSnapshot(rec_id, raw, seg_ids))
                    report.snapshots += 1
                else:
                    report.left_out.append(rec_id)
                    txn.put(LEFT_OUT_KEY + rec_id, b"", db=self._meta)  # prune keeps what it has (as repair's)
            for rec_id in sorted(forgotten):
                listed = txn.get(rec_id, db=self._snapshots)
                if listed is not None:
                    self._drop_snapshot(txn, rec_id, [sid for sid, _ in SnapshotRecord.decode(bytes(listed)).segments])
                    report.forgotten += 1
                else:  # another host's 'forget --left-out' of a record this cache left out too
                    self._forget_left_out(txn, rec_id)
            report.objects = len(todo)
            return report

        return self._write(run)

    def note_forgotten(self, record_ids: Iterable[bytes]) -> None:
        """Remember records that tombstones name (repair index: the tombstones it read)."""
        self._write(lambda txn: self._note_forgotten(txn, record_ids))

    def _note_forgotten(self, txn: lmdb.Transaction, record_ids: Iterable[bytes]) -> None:
        # Forgotten records stay forgotten: an index object that reappears (a prune killed before it deleted
        # the objects it replaced) must not list a record again whose tombstone this cache applied long ago.
        for rec_id in record_ids:
            txn.put(FORGOTTEN_KEY + rec_id, b"", db=self._meta)

    def _note_object(self, txn: lmdb.Transaction, name: str, pack_ids: list[bytes]) -> None:
        key = OBJECT_KEY + name.encode()
        before = txn.get(key, db=self._meta) or b""
        have = {bytes(before[i:i + 32]) for i in range(0, len(before), 32)}
        txn.put(key, bytes(before) + b"".join(p for p in pack_ids if p not in have), db=self._meta)

    # -- shared steps of the writes ----------------------------------------------------------------------------

    def _next_pack_no(self, txn: lmdb.Transaction) -> int:
        raw_no = txn.get(b"next_pack", db=self._meta)
        pack_no = PACK_NO.unpack(raw_no)[0] if raw_no else 0
        txn.put(b"next_pack", PACK_NO.pack(pack_no + 1), db=self._meta)
        return int(pack_no)

    def _list_pack(self, txn: lmdb.Transaction, pack_id: bytes, size: int, blob_count: int,
                   numbers: Mapping[bytes, int] | None = None) -> tuple[int, bool]:
        """(pack number, newly listed). Pack ids name content, so a writer can make a pack that is already
        listed (the same blobs in the same order): it is the same file, and must keep one number, or dropping
        one number's row would delete the file the other still names. ``numbers``: the numbers packs had
        before a rebuild (Index.sync), kept."""
        listed = txn.get(pack_id, db=self._pack_ids)
        if listed is not None:
            return PACK_NO.unpack(listed)[0], False
        pack_no = numbers.get(pack_id) if numbers else None
        if pack_no is None:
            pack_no = self._next_pack_no(txn)
        txn.put(PACK_NO.pack(pack_no), PACK_VALUE.pack(pack_id, size, blob_count), db=self._packs)
        txn.put(pack_id, PACK_NO.pack(pack_no), db=self._pack_ids)
        return pack_no, True

    def _register_pack(self, txn: lmdb.Transaction, sealed: SealedPack,
                       links: DeferredLinks | None = None, numbers: Mapping[bytes, int] | None = None) -> int:
        """Register a pack and rows for its blobs not indexed yet. A new DELTA row is linked to its base at once
        (the base must be indexed), or, given ``links``, put there for :meth:`_link_deltas` once every pack of
        a sync or repair is registered (packs come in any order there). A whole copy of a chunk indexed as a
        delta takes its row: a base must never be a delta, and a chunk that was written twice (two snapshots
        at once) may be the base of others in one copy and a delta in the other."""
        if sealed.published is not None:
            self._note_object(txn, sealed.published, [sealed.id])
        pack_no, new = self._list_pack(txn, sealed.id, sealed.size, len(sealed.blobs), numbers)
        if not new:
            return pack_no  # its blobs are registered already, at these very offsets
        duplicate_bytes = 0
        for b in sealed.blobs:
            refcount = 1 if b.type == _TOMBSTONE_TYPE else 0
            value = BLOB_VALUE.pack(b.type, b.codec, pack_no, b.offset, b.stored_len, b.raw_len, refcount)
            # An id already indexed keeps its first location; this copy is garbage in its pack.
            if not txn.put(b.id, value, db=self._blobs, overwrite=False):
                old_value = txn.get(b.id, db=self._blobs)
                assert old_value is not None
                old = BlobLocation(*BLOB_VALUE.unpack(old_value))
                if old.codec == DELTA_CODEC and b.codec != DELTA_CODEC and b.type == old.type:
                    txn.put(b.id, BLOB_VALUE.pack(b.type, b.codec, pack_no, b.offset, b.stored_len, b.raw_len,
                                                  old.refcount), db=self._blobs)
                    _add_garbage(txn, self._garbage, old.pack_no, BLOB_HEADER_SIZE + old.stored_len)
                    if links is not None and b.id in links.links:
                        del links.links[b.id]
                    else:
                        self._unlink_deltas(txn, [b.id])
                else:
                    duplicate_bytes += BLOB_HEADER_SIZE + b.stored_len
                    if links is not None and b.codec == DELTA_CODEC:
                        links.spares.setdefault(b.id, []).append((pack_no, b))
                continue
            if b.type in _COUNTED:
                txn.put(b.id, b"", db=self._dead)  # until a segment or a record references it
            if b.codec == DELTA_CODEC:
                if links is None:
                    self._link_deltas(txn, [(b.id, b.base)])
                else:
                    links.links[b.id] = b.base
        if duplicate_bytes:
            _add_garbage(txn, self._garbage, pack_no, duplicate_bytes)
        return pack_no

    def link_deltas(self, links: DeferredLinks) -> list[bytes]:
        """Link DELTA rows registered with deferred links (repair index); returns the deltas dropped because
        no copy of them has a usable base."""
        return self._write(lambda txn: self._link_deferred(txn, links))

    def _link_deferred(self, txn: lmdb.Transaction, links: DeferredLinks) -> list[bytes]:
        """:meth:`_link_deltas` for deferred links, where a delta whose base is unusable first tries its spare
        copies (:class:`DeferredLinks`)."""
        pairs = []
        for delta, base in links.links.items():
            if not self._usable_base(txn, delta, base):
                base = self._switch_to_spare(txn, delta, links.spares.get(delta, [])) or base
            pairs.append((delta, base))
        return self._link_deltas(txn, pairs, drop_unbased=True)

    def _usable_base(self, txn: lmdb.Transaction, delta: bytes, base: bytes) -> bool:
        """A base is an indexed chunk that is not a delta itself (deltas are one deep), and not the delta."""
        v = txn.get(base, db=self._blobs)
        if v is None or delta == base:
            return False
        type_, codec = BLOB_VALUE.unpack(v)[:2]
        return type_ == _CHUNK_TYPE and codec != DELTA_CODEC

    def _switch_to_spare(self, txn: lmdb.Transaction, delta: bytes, spares: list[tuple[int, NewBlob]]
                         ) -> bytes | None:
        """Point ``delta``'s row at the first spare copy whose base is usable (its count kept; the garbage
        moves from the spare's pack to the old copy's); returns that base, or None."""
        row = txn.get(delta, db=self._blobs)
        if row is None:
            return None
        old = BlobLocation(*BLOB_VALUE.unpack(row))
        for pack_no, b in spares:
            if self._usable_base(txn, delta, b.base):
                txn.put(delta, BLOB_VALUE.pack(b.type, b.codec, pack_no, b.offset, b.stored_len, b.raw_len,
                                               old.refcount), db=self._blobs)
                _add_garbage(txn, self._garbage, old.pack_no, BLOB_HEADER_SIZE + old.stored_len)
                _add_garbage(txn, self._garbage, pack_no, -(BLOB_HEADER_SIZE + b.stored_len))
                return b.base
        return None

    def _link_deltas(self, txn: lmdb.Transaction, links: list[tuple[bytes, bytes]], drop_unbased: bool = False
                     ) -> list[bytes]:
        """Record each (delta, base) link and count it as a reference of the base, so that no prune drops a base
        while a delta on it is indexed (docs/format.md §7.3). A base must be indexed and not a delta itself:
        otherwise IntegrityError, or with ``drop_unbased`` the delta's row is dropped (its data cannot be read;
        segments listing it are then not stored, as for a chunk whose pack is missing)."""
        dropped = []
        for delta, base in links:
            if not self._usable_base(txn, delta, base):
                if not drop_unbased:
                    raise IntegrityError(f"chunk {delta.hex()[:16]} is stored as a delta on {base.hex()[:16]}, which "
                                         "is not an indexed chunk stored whole")
                row = txn.get(delta, db=self._blobs)
                if row is not None:
                    loc = BlobLocation(*BLOB_VALUE.unpack(row))
                    _add_garbage(txn, self._garbage, loc.pack_no, BLOB_HEADER_SIZE + loc.stored_len)
                    txn.delete(delta, db=self._blobs)
                txn.delete(delta, db=self._dead)
                dropped.append(delta)
                continue
            txn.put(BASE_KEY + delta, base, db=self._meta)
            _add_counts(txn, self._blobs, self._dead, Counter([base]), +1)
        return dropped

    def _unlink_deltas(self, txn: lmdb.Transaction, ids: Iterable[bytes]) -> None:
        """Drop the links of the DELTA rows among ``ids`` (rows a prune drops): each base loses the reference."""
        bases: Counter[bytes] = Counter()
        for i in ids:
            base = txn.get(BASE_KEY + i, db=self._meta)
            if base is not None:
                bases[bytes(base)] += 1
                txn.delete(BASE_KEY + i, db=self._meta)
        _add_counts(txn, self._blobs, self._dead, bases, -1)

    def _store_segments(self, txn: lmdb.Transaction, segments: list[NewSegment]) -> None:
        for seg in segments:
            if txn.put(seg.id, seg.raw, db=self._segments, overwrite=False):
                _add_refs(txn, self._blobs, self._dead, seg.chunk_ids, +1)

    def _drop_snapshot(self, txn: lmdb.Transaction, rec_id: bytes, segment_ids: list[bytes]) -> bool:
        """Unlist a record (forget, or a tombstone a sync applies): its segments lose one reference each and
        its row goes to ``dead``. False when it was not listed."""
        if not txn.delete(rec_id, db=self._snapshots):
            return False
        _add_refs(txn, self._blobs, self._dead, segment_ids, -1)
        txn.put(rec_id, b"", db=self._dead)
        return True

    def _forget_left_out(self, txn: lmdb.Transaction, rec_id: bytes) -> None:
        """A left-out record that is forgotten: its mark goes and its row joins ``dead``, so that prune frees
        what it still held (nothing else references that, or the count would keep it)."""
        if txn.delete(LEFT_OUT_KEY + rec_id, db=self._meta) and txn.get(rec_id, db=self._blobs) is not None:
            txn.put(rec_id, b"", db=self._dead)

    def _store_snapshot(self, txn: lmdb.Transaction, snapshot: NewSnapshot) -> None:
        if txn.get(FORGOTTEN_KEY + snapshot.id, db=self._meta) is not None:
            # Its tombstone would take it out again (repair index, another host's sync) and prune would then
            # free its data: a snapshot that printed its id and is gone later. The callers refuse earlier.
            raise IntegrityError(f"snapshot {snapshot.id.hex()[:8]} was forgotten before; it is not listed again")
        if txn.put(snapshot.id, snapshot.raw, db=self._snapshots, overwrite=False):
            _add_refs(txn, self._blobs, self._dead, snapshot.segment_ids, +1)
            txn.delete(snapshot.id, db=self._dead)
            txn.delete(LEFT_OUT_KEY + snapshot.id, db=self._meta)  # complete now (a sync that found the rest)


def _add_refs(txn: lmdb.Transaction, db: lmdb._Database, dead: lmdb._Database, ids: Iterable[bytes],
              delta: int) -> None:
    _add_counts(txn, db, dead, Counter(ids), delta)


def _add_counts(txn: lmdb.Transaction, db: lmdb._Database, dead: lmdb._Database, counts: Counter[bytes],
                sign: int) -> None:
    """Add ``sign * n`` to the count of each id (one read and write per distinct id); keeps ``dead`` exact."""
    at = REFCOUNT_OFFSET
    get, put = txn.get, txn.put
    for i, n in counts.items():
        v = get(i, db=db)
        if v is None:
            raise IntegrityError(f"reference to blob {i.hex()[:16]} that is not indexed")
        before = int.from_bytes(v[at:], "little")
        after = before + sign * n
        if after < 0:
            raise IntegrityError(f"reference count of blob {i.hex()[:16]} would go below zero")
        put(i, bytes(v[:at]) + after.to_bytes(4, "little"), db=db)  # the count is the row's last field, a u32
        if before == 0:
            txn.delete(i, db=dead)
        elif after == 0:
            put(i, b"", db=dead)


def _add_garbage(txn: lmdb.Transaction, db: lmdb._Database, pack_no: int, nbytes: int) -> None:
    key = PACK_NO.pack(pack_no)
    v = txn.get(key, db=db)
    txn.put(key, GARBAGE_VALUE.pack((GARBAGE_VALUE.unpack(v)[0] if v else 0) + nbytes), db=db)


def _cannot_write(exc: lmdb.Error) -> bool:
    """py-lmdb keeps only the message (strerror), not the errno."""
    text = str(exc)
    return isinstance(exc, lmdb.ReadonlyError) or any(
        os.strerror(code) in text for code in (errno.EACCES, errno.EROFS, errno.EPERM))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


LOW_SPACE = 4 << 20  # free bytes below which an I/O error while writing the index is taken for a full disk


def _low_space(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE


def _translate(exc: lmdb.Error, path: Path) -> Exception:
    text = str(exc)
    if "No space left" in text or "MDB_MAP_FULL" in text or (os.strerror(errno.EIO) in text and _low_space(path)):
        # A full disk often shows as EIO, not ENOSPC: ext4 with delayed allocation fails the fdatasync of the
        # commit when writeback finds no room. The transaction did not commit (its meta page was not written).
        return NoSpaceError(f"no space left on device for the index at {path}")
    if "Resource temporarily unavailable" in text:
        return RepositoryLocked(f"index at {path} is locked")
    if "Permission denied" in text or "Operation not permitted" in text:
        return PermissionDenied(f"cannot open the index at {path}: permission denied")
    return IntegrityError(f"index at {path}: {text}")
