"""The LMDB index: the only module that imports lmdb.

Named databases (docs/format.md gives each key and value byte for byte):

``blobs``     blob id -> location, lengths, codec, type and reference count
``packs``     pack number (u32 big endian) -> pack id, size, blob count
``pack_ids``  pack id -> pack number
``segments``  segment id -> encoded segment (a copy of the blob, for fast reads)
``snapshots`` snapshot id -> encoded snapshot record
``meta``      b"next_pack" -> u32

Reference counts: a segment's count is the number of times live snapshot records list it; a chunk's count is
the number of times stored segments list it. Both change in the same transaction as the records that cause
them, so a prune can see what died without reading every snapshot.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import lmdb

from dedupimg.errors import IntegrityError, NoSpaceError, RepositoryLocked

BLOB_VALUE = struct.Struct("<BBIQIII")
PACK_NO = struct.Struct(">I")
PACK_VALUE = struct.Struct("<32sQI")
INITIAL_MAP = 64 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class BlobLocation:
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


class Index:
    def __init__(self, path: Path) -> None:
        try:
            self._env = lmdb.open(
                str(path), map_size=INITIAL_MAP, max_dbs=8, subdir=True, mode=0o600, create=True
            )
        except lmdb.Error as exc:
            raise _translate(exc, path) from None
        self._path = path
        self._blobs = self._env.open_db(b"blobs")
        self._packs = self._env.open_db(b"packs")
        self._pack_ids = self._env.open_db(b"pack_ids")
        self._segments = self._env.open_db(b"segments")
        self._snapshots = self._env.open_db(b"snapshots")
        self._meta = self._env.open_db(b"meta")

    def close(self) -> None:
        self._env.close()

    # -- reading -------------------------------------------------------------------------------------------

    def _read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        try:
            with self._env.begin() as txn:
                return fn(txn)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process grew the map: adopt its size
            with self._env.begin() as txn:
                return fn(txn)

    def lookup_blobs(self, ids: list[bytes]) -> list[BlobLocation | None]:
        def run(txn: lmdb.Transaction) -> list[BlobLocation | None]:
            out: list[BlobLocation | None] = []
            for i in ids:
                v = txn.get(i, db=self._blobs)
                out.append(BlobLocation(*BLOB_VALUE.unpack(v)) if v is not None else None)
            return out

        return self._read(run)

    def has_blobs(self, ids: list[bytes]) -> list[bool]:
        return self._read(lambda txn: [txn.get(i, db=self._blobs) is not None for i in ids])

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

    def packs(self) -> list[tuple[int, bytes, int]]:
        def run(txn: lmdb.Transaction) -> list[tuple[int, bytes, int]]:
            rows = []
            for k, v in txn.cursor(db=self._packs).iternext():
                pid, size, _count = PACK_VALUE.unpack(v)
                rows.append((PACK_NO.unpack(k)[0], bytes(pid), size))
            return rows

        return self._read(run)

    def iter_blob_locations(self) -> Iterator[tuple[bytes, BlobLocation]]:
        rows = self._read(lambda txn: list(txn.cursor(db=self._blobs).iternext()))
        for k, v in rows:
            yield bytes(k), BlobLocation(*BLOB_VALUE.unpack(v))

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
        self,
        pack_id: bytes,
        pack_size: int,
        blobs: list[NewBlob],
        segments: list[NewSegment],
        snapshot: NewSnapshot | None = None,
    ) -> None:
        """Register a durable pack, its blobs and segments, and optionally a snapshot, in one transaction."""

        def run(txn: lmdb.Transaction) -> None:
            raw_no = txn.get(b"next_pack", db=self._meta)
            pack_no = PACK_NO.unpack(raw_no)[0] if raw_no else 0
            txn.put(b"next_pack", PACK_NO.pack(pack_no + 1), db=self._meta)
            txn.put(PACK_NO.pack(pack_no), PACK_VALUE.pack(pack_id, pack_size, len(blobs)), db=self._packs)
            txn.put(pack_id, PACK_NO.pack(pack_no), db=self._pack_ids)
            for b in blobs:
                value = BLOB_VALUE.pack(b.type, b.codec, pack_no, b.offset, b.stored_len, b.raw_len, 0)
                # An id already indexed keeps its first location; this copy is dead space for prune.
                txn.put(b.id, value, db=self._blobs, overwrite=False)
            for seg in segments:
                if txn.put(seg.id, seg.raw, db=self._segments, overwrite=False):
                    _add_refs(txn, self._blobs, seg.chunk_ids, +1)
            if snapshot is not None:
                txn.put(snapshot.id, snapshot.raw, db=self._snapshots)
                _add_refs(txn, self._blobs, snapshot.segment_ids, +1)

        self._write(run)


def _add_refs(txn: lmdb.Transaction, db: lmdb._Database, ids: Iterable[bytes], delta: int) -> None:
    for i in ids:
        v = txn.get(i, db=db)
        if v is None:
            raise IntegrityError(f"reference to blob {i.hex()[:16]} that is not indexed")
        fields = list(BLOB_VALUE.unpack(v))
        fields[-1] += delta
        txn.put(i, BLOB_VALUE.pack(*fields), db=db)


def _translate(exc: lmdb.Error, path: Path) -> Exception:
    text = str(exc)
    if "No space left" in text or "MDB_MAP_FULL" in text:
        return NoSpaceError(f"no space left on device for the index at {path}")
    if "Resource temporarily unavailable" in text:
        return RepositoryLocked(f"index at {path} is locked")
    return IntegrityError(f"index at {path}: {text}")
