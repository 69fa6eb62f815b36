"""Random access to a snapshot's image: any (offset, length), from any number of threads.

Two bisections find the bytes: one over the snapshot's segment offsets, one over the extent offsets of the
segment. Decoded segments and decompressed chunks live in LRU caches; zero extents are served without
touching a pack; a reader that sees sequential access fetches the next chunks ahead, in one batch, so that
a sequential scan costs few round trips. Every chunk is verified against its id (IntegrityError otherwise).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from dedupimg.errors import IntegrityError
from dedupimg.manifest import Segment, SnapshotRecord
from dedupimg.repository import Repository
from dedupimg.zeros import ZERO_BLOCK

CHUNK_CACHE_BYTES = 64 << 20
SEGMENT_CACHE = 64
READ_AHEAD = 32  # chunks fetched in one batch when access is sequential


@dataclass(frozen=True)
class _SegmentIndex:
    segment: Segment
    starts: list[int]  # offset of each extent within the segment


class Extent(NamedTuple):
    """One extent of the image: ``[offset, offset+length)`` is zeros (id None) or the chunk ``id``.

    A named tuple, not a dataclass: reads make two per chunk, and a frozen dataclass costs several times more
    to build."""

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
        with self._lock:
            for ext in extents:
                if ext.id is not None and ext.id not in found:
                    data = self._chunks.get(ext.id)
                    if data is None:
                        missing.append(ext.id)
                    else:
                        found[ext.id] = data  # type: ignore[assignment]
        if not missing:
            return found
        fetch = list(dict.fromkeys(missing))
        if sequential and extents:
            fetch += self._ahead(extents[-1].offset + extents[-1].length, set(fetch))
        data = self.repo.read_blobs(fetch)
        with self._lock:
            for id_, raw in zip(fetch, data, strict=True):
                self._chunks.put(id_, raw)
        found.update(zip(fetch, data, strict=True))
        return found

    def _ahead(self, offset: int, have: set[bytes]) -> list[bytes]:
        """Ids of the next READ_AHEAD chunks after ``offset`` that are not cached yet."""
        out: list[bytes] = []
        probe = offset
        while len(out) < READ_AHEAD and probe < self.size:
            extents = self.extents(probe, 1 << 20)
            if not extents:
                break
            with self._lock:
                for ext in extents:
                    if ext.id is not None and ext.id not in have and self._chunks.get(ext.id) is None:
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
