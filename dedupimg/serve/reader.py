"""Random access to a snapshot's image: any (offset, length), from any number of threads.

The snapshot's :class:`ExtentMap` (core/extents.py, shared with restore) finds the extents of a range. Zero
extents are served without touching a pack. Every chunk is verified against its id before
it is served (IntegrityError otherwise). A read that continues one of the recent sequential streams starts
the fetch of the chunks ahead of it, so that a sequential scan costs few round trips.

Where chunks come from: with the repository's read pool (mount, serve), worker processes fetch them into
the pool's shared cache while the reader goes on, and a read pins the cache slots it copies from; without
it, fetches happen in the calling thread and land in this reader's own LRU cache.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import cast

from dedupimg.core.errors import IntegrityError, UsageError
from dedupimg.core.extents import Extent, ExtentMap
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.zeros import ZERO_BLOCK
from dedupimg.repo.readpool import Landed
from dedupimg.repo.repository import Repository

CHUNK_CACHE_BYTES = 64 << 20
READ_AHEAD = 1 << 20  # bytes of image fetched ahead, in line, when access is sequential
READ_AHEAD_POOL = 8 << 20  # ... and by the repository's read workers, in the background
STREAMS = 8  # sequential readers of one snapshot followed at once
PIN_ATTEMPTS = 4  # fetch-and-pin rounds before a read gives up on the shared cache and reads uncached
_ZEROS = memoryview(ZERO_BLOCK)


class _LRU:
    """Least recently used entries, up to ``capacity`` in total size (each entry's size given when put)."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._capacity = capacity
        self._size = 0

    def get(self, key: bytes) -> object | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: bytes, value: object, size: int = 1) -> None:
        if key in self._items:
            return
        self._items[key] = (value, size)
        self._size += size
        while self._size > self._capacity and len(self._items) > 1:
            _, (_, old_size) = self._items.popitem(last=False)
            self._size -= old_size


class SnapshotReader:
    def __init__(self, repo: Repository, record: SnapshotRecord, cache_bytes: int = CHUNK_CACHE_BYTES) -> None:
        self.repo = repo
        self.record = record
        self.size = record.size
        self.map = ExtentMap(record, repo.segment)
        self._lock = threading.Lock()
        self._chunks = _LRU(cache_bytes)  # chunks read without a read pool
        # Sequential streams: the end of a stream's last read -> how far its read-ahead has been started. A
        # read that starts where a stream ended continues it. Several, because NBD clients such as nbdcopy
        # read different parts of the image over parallel connections, each part front to back.
        self._streams: OrderedDict[int, int] = OrderedDict()
        self._pending: dict[bytes, tuple[Future[Landed], int]] = {}  # chunk id -> (its fetch, index in it)
        # With a read pool the window runs ahead while this thread serves; without, it is read in line.
        self._window = READ_AHEAD_POOL if repo.parallel_reads else READ_AHEAD
        # With a read pool, chunks live in its shared cache: where each is, and what this reader has per slot.
        self._in_pool: dict[bytes, tuple[Landed, int]] = {}
        self._slot_ids: dict[int, list[bytes]] = {}

    # -- mapping ----------------------------------------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The extents that cover ``[offset, offset+length)`` (clipped to the image), in order."""
        return self.map.extents(offset, length)

    # -- reading ----------------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The image's bytes ``[offset, offset+length)``; short at the end of the image, empty past it."""
        if offset < 0 or length < 0:
            raise UsageError(f"negative offset or length ({offset}, {length})")
        buf = bytearray(max(0, min(length, self.size - offset)))
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` with the image's bytes from ``offset``; returns how many (short at the end of the image).

        The chunks are copied from the cache straight into ``buf`` (a FUSE reply buffer, say): with a read
        pool they are pinned in its shared cache for just that copy."""
        view = memoryview(buf).cast("B")
        if offset < 0:
            raise UsageError(f"negative offset ({offset})")
        end = min(offset + len(view), self.size)
        if offset >= end:
            return 0
        extents = self.map.extents(offset, end - offset)
        with self._lock:
            ahead_until = self._streams.pop(offset, None)
            sequential = ahead_until is not None
            self._streams[end] = max(end, ahead_until or 0)
            if len(self._streams) > STREAMS:
                self._streams.popitem(last=False)
        for _ in range(PIN_ATTEMPTS):
            found = self._chunks_for(extents, end, sequential)
            runs = list({id(landed): landed for landed, _ in found.values()}.values())
            if self.repo.pin(runs):
                break
            self._forget_replaced(runs)  # another read refilled a slot between the fetch and the pin
            sequential = False
        else:  # the shared cache is too busy to hold this read: read it here, uncached
            found = {id_: (Landed(None, 0, [raw]), 0) for id_, raw in self._read_here(extents).items()}
            runs = []
        try:
            pos = 0
            for ext in extents:
                lo = max(offset, ext.offset) - ext.offset
                hi = min(end, ext.offset + ext.length) - ext.offset
                n = hi - lo
                if ext.id is None:
                    for at in range(pos, pos + n, len(ZERO_BLOCK)):
                        stop = min(pos + n, at + len(ZERO_BLOCK))
                        view[at:stop] = _ZEROS[: stop - at]
                else:
                    landed, i = found[ext.id]
                    chunk = landed.blobs[i]
                    if len(chunk) != ext.length:  # the check restore makes: a chunk fills its extent exactly
                        raise IntegrityError(f"chunk {ext.id.hex()[:16]} is {len(chunk)} bytes long, its extent at "
                                             f"{ext.offset} {ext.length}")
                    view[pos : pos + n] = chunk[lo:hi]
                pos += n
        finally:
            self.repo.unpin(runs)
        return end - offset

    def _read_here(self, extents: list[Extent]) -> dict[bytes, bytes]:
        ids = list(dict.fromkeys(ext.id for ext in extents if ext.id is not None))
        return dict(zip(ids, self.repo.read_blobs(ids), strict=True))

    def _chunks_for(self, extents: list[Extent], end: int, sequential: bool) -> dict[bytes, tuple[Landed, int]]:
        """Where the chunks of ``extents`` are: cached, or once their fetch (started now, or earlier by the
        read-ahead) is done; and, when access is sequential, the fetch of the chunks ahead started."""
        found: dict[bytes, tuple[Landed, int]] = {}
        waits: dict[bytes, tuple[Future[Landed], int]] = {}
        missing: dict[bytes, None] = {}
        with self._lock:
            for ext in extents:
                id_ = ext.id
                if id_ is None or id_ in found or id_ in waits or id_ in missing:
                    continue
                hit = self._cached(id_)
                if hit is not None:
                    found[id_] = hit
                elif (pending := self._pending.get(id_)) is not None:
                    waits[id_] = pending
                else:
                    missing[id_] = None
        ahead = self._plan_ahead(end, sequential)
        if missing:
            waits.update(self._fetch(list(missing)))
        if ahead:
            self._fetch(ahead)
        for id_, (future, i) in waits.items():
            found[id_] = (future.result(), i)  # damage: the run's IntegrityError, raised here
        return found

    def _cached(self, id_: bytes) -> tuple[Landed, int] | None:
        """Called with the lock held."""
        hit = self._in_pool.get(id_)
        if hit is not None:
            return hit
        data = self._chunks.get(id_)
        return None if data is None else (Landed(None, 0, [cast(bytes, data)]), 0)

    def _plan_ahead(self, end: int, sequential: bool) -> list[bytes]:
        """Ids of the chunks in the read-ahead window after ``end`` (where a sequential read ended) that are
        neither cached nor in flight. The stream's window only moves forward, so each extent is looked at
        once."""
        if not sequential:
            return []
        with self._lock:
            limit = min(self.size, end + self._window)
            start = max(end, self._streams.get(end, end))
            if start >= limit or (start - end > self._window // 2 and limit < self.size):
                return []  # enough is ahead: top the window up in large steps, which make large runs
            if end in self._streams:
                self._streams[end] = limit
        ahead = self.map.extents(start, limit - start)
        out: dict[bytes, None] = {}
        with self._lock:
            for ext in ahead:
                if ext.id is not None and ext.id not in out and ext.id not in self._pending \
                        and self._cached(ext.id) is None:
                    out[ext.id] = None
        return list(out)

    def _fetch(self, ids: list[bytes]) -> dict[bytes, tuple[Future[Landed], int]]:
        """Start fetching ``ids``; with a read pool its workers read them while this thread goes on."""
        runs = self.repo.fetch_blobs(ids)
        where: dict[bytes, tuple[Future[Landed], int]] = {}
        with self._lock:
            for run_ids, future in runs:
                for i, id_ in enumerate(run_ids):
                    where[id_] = self._pending[id_] = (future, i)
        for run_ids, future in runs:
            future.add_done_callback(functools.partial(self._landed, run_ids))
        return where

    def _landed(self, ids: list[bytes], future: Future[Landed]) -> None:
        """A fetch is done: its chunks go to the cache (a failed one is just forgotten: a read that needs it
        raises the error, and a later one fetches again)."""
        landed = None if future.exception() is not None else future.result()
        with self._lock:
            for id_ in ids:
                if self._pending.get(id_, (None, 0))[0] is future:
                    del self._pending[id_]
            if landed is None:
                return
            if landed.slot is None:
                for id_, raw in zip(ids, landed.blobs, strict=True):
                    self._chunks.put(id_, raw, len(raw))
                return
            # The pool refilled this slot: what this reader had in it is gone (entries for slots that other
            # readers refilled fail to pin, and go then, or here once this reader gets the slot back).
            for id_ in self._slot_ids.get(landed.slot, ()):
                hit = self._in_pool.get(id_)
                if hit is not None and hit[0].slot == landed.slot:
                    del self._in_pool[id_]
            self._slot_ids[landed.slot] = ids
            for i, id_ in enumerate(ids):
                self._in_pool[id_] = (landed, i)

    def _forget_replaced(self, runs: list[Landed]) -> None:
        stale = [r for r in runs if not self.repo.pin([r])]
        self.repo.unpin([r for r in runs if r not in stale])
        with self._lock:
            for run in stale:
                for id_ in self._slot_ids.pop(run.slot, []) if run.slot is not None else []:
                    if self._in_pool.get(id_, (None, 0))[0] is run:
                        del self._in_pool[id_]

    def is_zero_range(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, zero)`` runs for ``[offset, offset+length)``: what NBD block status reports."""
        return self.map.zero_runs(offset, length)
