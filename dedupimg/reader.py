"""Random access to a snapshot's image: any (offset, length), from any number of threads.

Two bisections find the bytes: one over the snapshot's segment offsets, one over the extent offsets of the
segment. Decoded segments and decompressed chunks live in LRU caches; zero extents are served without
touching a pack. A reader that sees sequential access keeps the next few MiB of chunks being fetched on a
background thread (pread, zstd and blake3 release the GIL), so a sequential scan finds its chunks decoded
and its caller (a FUSE or NBD request) overlaps with the fetching; a read that needs a chunk already in
flight waits for that fetch instead of starting another. Every chunk is verified against its id
(IntegrityError otherwise, raised to the reader that needs the chunk).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from dedupimg.errors import IntegrityError
from dedupimg.manifest import Segment, SnapshotRecord
from dedupimg.repository import Repository
from dedupimg.zeros import ZERO_BLOCK

CHUNK_CACHE_BYTES = 64 << 20
SEGMENT_CACHE = 64
READ_AHEAD = 32  # chunks fetched in one batch when access is sequential
PREFETCH_BYTES = 8 << 20  # image bytes kept in flight ahead of a sequential reader
PREFETCH_WORKERS = 2

_prefetch_pool: ThreadPoolExecutor | None = None
_prefetch_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One pool per process, made on first use (after a mount's fork into the background, never before)."""
    global _prefetch_pool
    with _prefetch_pool_lock:
        if _prefetch_pool is None:
            _prefetch_pool = ThreadPoolExecutor(PREFETCH_WORKERS, thread_name_prefix="dedupimg-prefetch")
        return _prefetch_pool


@dataclass(frozen=True)
class _SegmentIndex:
    segment: Segment
    starts: list[int]  # offset of each extent within the segment


@dataclass(frozen=True)
class Extent:
    """One extent of the image: ``[offset, offset+length)`` is zeros (id None) or the chunk ``id``."""

    offset: int
    length: int
    id: bytes | None


class _LRU:
    def __init__(self, capacity: int, weigh: bool) -> None:
        self._items: OrderedDict[bytes, object] = OrderedDict()
        self._capacity = capacity
        self._weigh = weigh
        self._size = 0

    def get(self, key: bytes) -> object | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: object) -> None:
        if key in self._items:
            return
        self._items[key] = value
        self._size += len(value) if self._weigh else 1  # type: ignore[arg-type]
        while self._size > self._capacity and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._size -= len(old) if self._weigh else 1  # type: ignore[arg-type]


class SnapshotReader:
    def __init__(self, repo: Repository, record: SnapshotRecord, cache_bytes: int = CHUNK_CACHE_BYTES) -> None:
        self.repo = repo
        self.record = record
        self.size = record.size
        self._seg_starts: list[int] = []
        pos = 0
        for _, n in record.segments:
            self._seg_starts.append(pos)
            pos += n
        self._lock = threading.Lock()
        self._segments = _LRU(SEGMENT_CACHE, weigh=False)
        self._chunks = _LRU(cache_bytes, weigh=True)
        self._last_end = -1  # end of the previous read: equal to the next offset means sequential
        self._inflight: dict[bytes, tuple[Future[list[bytes]], int]] = {}  # id -> (batch fetch, index in it)
        self._horizon = 0  # prefetching has been scheduled up to this image offset

    # -- mapping ----------------------------------------------------------------------------------------------

    def _segment(self, index: int) -> _SegmentIndex:
        seg_id = self.record.segments[index][0]
        with self._lock:
            cached = self._segments.get(seg_id)
        if cached is not None:
            return cached  # type: ignore[return-value]
        segment = self.repo.segment(seg_id)
        if segment.size != self.record.segments[index][1]:
            raise IntegrityError(f"manifest segment {seg_id.hex()[:16]} has the wrong length")
        entry = _SegmentIndex(segment, segment.starts())
        with self._lock:
            self._segments.put(seg_id, entry)
        return entry

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The extents that cover ``[offset, offset+length)`` (clipped to the image), in order."""
        end = min(offset + length, self.size)
        out: list[Extent] = []
        if offset >= end or offset < 0:
            return out
        s = bisect.bisect_right(self._seg_starts, offset) - 1
        while s < len(self._seg_starts) and self._seg_starts[s] < end:
            entry = self._segment(s)
            base = self._seg_starts[s]
            e = max(0, bisect.bisect_right(entry.starts, offset - base) - 1)
            seg = entry.segment
            while e < len(seg.lengths) and base + entry.starts[e] < end:
                out.append(Extent(base + entry.starts[e], seg.lengths[e], seg.ids[e]))
                e += 1
            s += 1
        return out

    # -- reading ----------------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The image's bytes ``[offset, offset+length)``; short at the end of the image, empty past it."""
        return b"".join(self.read_parts(offset, length))

    def read_parts(self, offset: int, length: int) -> list[bytes | memoryview]:
        """:meth:`read` as pieces (cached chunks and their slices, zeros), for callers that copy them anyway
        (into a FUSE buffer, or a socket with scatter-gather): one copy of the data fewer than ``read``."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        extents = self.extents(offset, end - offset)
        sequential = offset == self._last_end
        self._last_end = end
        chunks = self._chunks_for(extents, sequential)
        parts: list[bytes | memoryview] = []
        for ext in extents:
            lo = max(offset, ext.offset) - ext.offset
            hi = min(end, ext.offset + ext.length) - ext.offset
            if ext.id is None:
                parts.append(memoryview(ZERO_BLOCK)[: hi - lo] if hi - lo <= len(ZERO_BLOCK) else bytes(hi - lo))
            else:
                data = chunks[ext.id]
                parts.append(data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi])
        return parts

    def _chunks_for(self, extents: list[Extent], sequential: bool) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        missing: list[bytes] = []
        waiting: dict[bytes, tuple[Future[list[bytes]], int]] = {}
        with self._lock:
            for ext in extents:
                if ext.id is None or ext.id in found or ext.id in waiting:
                    continue
                data = self._chunks.get(ext.id)
                if data is not None:
                    found[ext.id] = data  # type: ignore[assignment]
                elif ext.id in self._inflight:
                    waiting[ext.id] = self._inflight[ext.id]
                else:
                    missing.append(ext.id)
        end = extents[-1].offset + extents[-1].length if extents else 0
        if missing:
            fetch = list(dict.fromkeys(missing))
            if sequential and not self._prefetching(end):
                fetch += self._ahead(end, set(fetch))  # first sequential miss: fetch ahead in this batch
            data = self.repo.read_blobs(fetch)
            with self._lock:
                for id_, raw in zip(fetch, data, strict=True):
                    self._chunks.put(id_, raw)
            found.update(zip(fetch, data, strict=True))
        if sequential:
            self._prefetch(end)
        for id_, (future, i) in waiting.items():
            found[id_] = future.result()[i]
        return found

    # -- prefetching ------------------------------------------------------------------------------------------

    def _prefetching(self, end: int) -> bool:
        with self._lock:
            return self._horizon > end

    def _prefetch(self, end: int) -> None:
        """Keep ``[end, end + PREFETCH_BYTES)`` scheduled: fetch batches of READ_AHEAD chunks in the background."""
        with self._lock:
            start = max(self._horizon, end)
            if start - end > PREFETCH_BYTES // 2:
                return  # enough in flight already
            self._horizon = end + PREFETCH_BYTES
        batch: list[bytes] = []
        seen: set[bytes] = set()
        for ext in self.extents(start, end + PREFETCH_BYTES - start):
            if ext.id is None or ext.id in seen:
                continue
            seen.add(ext.id)
            with self._lock:
                if self._chunks.get(ext.id) is not None or ext.id in self._inflight:
                    continue
            batch.append(ext.id)
            if len(batch) == READ_AHEAD:
                self._submit(batch)
                batch = []
        if batch:
            self._submit(batch)

    def _submit(self, ids: list[bytes]) -> None:
        future = _pool().submit(self.repo.read_blobs, ids)
        with self._lock:
            for i, id_ in enumerate(ids):
                self._inflight[id_] = (future, i)
        future.add_done_callback(lambda f: self._landed(ids, f))

    def _landed(self, ids: list[bytes], future: Future[list[bytes]]) -> None:
        data = None if future.exception() is not None else future.result()
        with self._lock:
            for i, id_ in enumerate(ids):
                if self._inflight.get(id_, (None, 0))[0] is future:
                    del self._inflight[id_]
                if data is not None:
                    self._chunks.put(id_, data[i])

    def _ahead(self, offset: int, have: set[bytes]) -> list[bytes]:
        """Ids of the next READ_AHEAD chunks after ``offset`` that are not cached or in flight."""
        out: list[bytes] = []
        probe = offset
        while len(out) < READ_AHEAD and probe < self.size:
            extents = self.extents(probe, 1 << 20)
            if not extents:
                break
            with self._lock:
                for ext in extents:
                    if (ext.id is not None and ext.id not in have and ext.id not in self._inflight
                            and self._chunks.get(ext.id) is None):
                        have.add(ext.id)
                        out.append(ext.id)
            probe = extents[-1].offset + extents[-1].length
        return out[:READ_AHEAD]

    def is_zero_range(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, zero)`` runs for ``[offset, offset+length)``: what NBD block status reports."""
        runs: list[tuple[int, int, bool]] = []
        end = min(offset + length, self.size)
        for ext in self.extents(offset, end - offset):
            lo, hi = max(offset, ext.offset), min(end, ext.offset + ext.length)
            zero = ext.id is None
            if runs and runs[-1][2] == zero and runs[-1][0] + runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], runs[-1][1] + hi - lo, zero)
            else:
                runs.append((lo, hi - lo, zero))
        return runs
