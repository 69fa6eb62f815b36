"""Chunks for the serving path (mount, serve): verified bytes by chunk id, pinned while a reader copies them.

A snapshot reader maps a read to chunk ids and asks its :class:`ChunkSource` for them; the source knows where
each chunk is and fetches the rest. With the repository's read pool (readpool.py), worker processes fetch runs
of chunks into the pool's shared arena; the source remembers which slot holds which chunk, and pins the slots
a read copies from. A slot that the pool gave to another run since (its generation moved on) fails to pin:
its chunks are forgotten and fetched again. Without a pool, chunks are read in the calling thread into an LRU
cache of the source's own. Every chunk is verified against its id by whoever reads it from its pack.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from typing import NamedTuple, cast

from dedupimg.repo.readpool import Landed, ReadPoolError
from dedupimg.repo.repository import Repository

CHUNK_CACHE_BYTES = 64 << 20  # chunks a source keeps when there is no read pool
PIN_ATTEMPTS = 4  # fetch-and-pin rounds before a read gives up on the shared cache and reads uncached


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


class Pinned(NamedTuple):
    """Chunks held for a copy: ``chunks[id]`` is the chunk's bytes (a view into the pool's arena, or bytes)
    until :meth:`ChunkSource.unpin`."""

    chunks: dict[bytes, bytes | memoryview]
    runs: list[Landed]


class ChunkSource:
    """Verified chunks of ``repo`` by id, for one reader (any number of its threads)."""

    def __init__(self, repo: Repository, cache_bytes: int = CHUNK_CACHE_BYTES) -> None:
        self._repo = repo
        self._pool = repo.read_pool  # pins go straight to it, not through the repository
        self.parallel = self._pool is not None  # fetched by the pool's workers while the caller goes on
        self._lock = threading.Lock()
        self._chunks = _LRU(cache_bytes)  # chunks read without a read pool
        self._pending: dict[bytes, tuple[Future[Landed], int]] = {}  # chunk id -> (its fetch, index in it)
        # With a read pool, chunks live in its shared cache: where each is, and what this source has per slot.
        self._in_pool: dict[bytes, tuple[Landed, int]] = {}
        self._slot_ids: dict[int, list[bytes]] = {}

    def wanted(self, ids: Iterable[bytes | None]) -> list[bytes]:
        """Those of ``ids`` (None, zeros, skipped) that are neither cached nor being fetched, once each: what a
        read-ahead should fetch."""
        out: dict[bytes, None] = {}
        with self._lock:
            for id_ in ids:
                if id_ is not None and id_ not in out and id_ not in self._pending and not self._cached(id_):
                    out[id_] = None
        return list(out)

    def prefetch(self, ids: Iterable[bytes | None]) -> None:
        """Start fetching those of ``ids`` that are neither cached nor being fetched (a restore's read-ahead)."""
        if wanted := self.wanted(ids):
            self._fetch(wanted)

    def pin(self, ids: list[bytes], ahead: list[bytes]) -> Pinned:
        """The chunks ``ids`` (distinct), fetched where needed and held until :meth:`unpin`; IntegrityError for
        a damaged one. The fetch of ``ahead`` (a read-ahead) starts after that of ``ids``, before the wait."""
        for _ in range(PIN_ATTEMPTS):
            try:
                chunks, in_pool = self._find(ids, ahead)
            except ReadPoolError:
                break  # a worker died with this fetch in flight: the data may be fine, read it here

            runs = list(in_pool.values())
            if not runs or self._pinned(runs):
                return Pinned(chunks, runs)
            self._forget_replaced(runs)  # another read refilled a slot between the fetch and the pin
            ahead = []
        # The shared cache is too busy to hold this read, or its worker died: read it here, uncached.
        return Pinned(dict(zip(ids, self._repo.read_blobs(ids), strict=True)), [])

    def unpin(self, pinned: Pinned) -> None:
        if pinned.runs and self._pool is not None:
            self._pool.unpin(pinned.runs)

    def _pinned(self, runs: list[Landed]) -> bool:
        """Pin the slots of ``runs``; False (nothing pinned) if any was given to another run since it landed."""
        return self._pool is None or self._pool.pin(runs)

    def _find(self, ids: list[bytes], ahead: list[bytes]) -> tuple[dict[bytes, bytes | memoryview], dict[int, Landed]]:
        """The chunks ``ids``, cached or once their fetch (started now, or earlier by a read-ahead) is done,
        and the pool's runs that hold them (to pin); the fetch of ``ahead`` is started before the wait."""
        chunks: dict[bytes, bytes | memoryview] = {}
        in_pool: dict[int, Landed] = {}  # by id(): a run holds many of the chunks
        waits: dict[bytes, tuple[Future[Landed], int]] = {}
        missing: list[bytes] = []
        with self._lock:
            for id_ in ids:
                hit = self._in_pool.get(id_)
                if hit is not None:
                    landed, i = hit
                    chunks[id_] = landed.blobs[i]
                    in_pool[id(landed)] = landed
                elif (data := self._chunks.get(id_)) is not None:
                    chunks[id_] = cast(bytes, data)
                elif (pending := self._pending.get(id_)) is not None:
                    waits[id_] = pending
                else:
                    missing.append(id_)
        if missing:
            waits.update(self._fetch(missing))
        if ahead:
            self._fetch(ahead)
        for id_, (future, i) in waits.items():
            landed = future.result()  # damage: the run's IntegrityError, raised here
            chunks[id_] = landed.blobs[i]
            if landed.slot is not None:
                in_pool[id(landed)] = landed
        return chunks, in_pool

    def _cached(self, id_: bytes) -> bool:
        """Called with the lock held."""
        return id_ in self._in_pool or self._chunks.get(id_) is not None

    def _fetch(self, ids: list[bytes]) -> dict[bytes, tuple[Future[Landed], int]]:
        """Start fetching ``ids``; with a read pool its workers read them while this thread goes on."""
        runs = self._repo.fetch_blobs(ids)
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
            # The pool refilled this slot: what this source had in it is gone (entries for slots that other
            # sources refilled fail to pin, and go then, or here once this source gets the slot back).
            for id_ in self._slot_ids.get(landed.slot, ()):
                hit = self._in_pool.get(id_)
                if hit is not None and hit[0].slot == landed.slot:
                    del self._in_pool[id_]
            self._slot_ids[landed.slot] = ids
            for i, id_ in enumerate(ids):
                self._in_pool[id_] = (landed, i)

    def _forget_replaced(self, runs: list[Landed]) -> None:
        stale = [r for r in runs if not self._pinned([r])]
        self.unpin(Pinned({}, [r for r in runs if r not in stale]))
        with self._lock:
            for run in stale:
                for id_ in self._slot_ids.pop(run.slot, []) if run.slot is not None else []:
                    if self._in_pool.get(id_, (None, 0))[0] is run:
                        del self._in_pool[id_]
