"""Random access to a snapshot's image: any (offset, length), from any number of threads.

The snapshot's :class:`ExtentMap` (core/extents.py, shared with restore) finds the extents of a range. Zero
extents are served without touching a pack. Every chunk is verified against its id before
it is served (IntegrityError otherwise). A read that continues one of the recent sequential streams starts
the fetch of the chunks ahead of it, so that a sequential scan costs few round trips.

Where chunks come from: the reader's :class:`ChunkSource` (repo/chunksource.py) hands out the chunks of a
read, pinned for the copy. With the repository's read pool (mount, serve), worker processes fetch them into
the pool's shared cache while the reader goes on; without it, fetches happen in the calling thread and land
in the source's own LRU cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from dedupimg.core.errors import IntegrityError, UsageError
from dedupimg.core.extents import Extent, ExtentMap
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.zeros import ZERO_BLOCK
from dedupimg.repo.chunksource import CHUNK_CACHE_BYTES, ChunkSource
from dedupimg.repo.repository import Repository

READ_AHEAD = 1 << 20  # bytes of image fetched ahead, in line, when access is sequential
READ_AHEAD_POOL = 8 << 20  # ... and by the repository's read workers, in the background
STREAMS = 8  # sequential readers of one snapshot followed at once
_ZEROS = memoryview(ZERO_BLOCK)


class SnapshotReader:
    def __init__(self, repo: Repository, record: SnapshotRecord, cache_bytes: int = CHUNK_CACHE_BYTES) -> None:
        self.repo = repo
        self.record = record
        self.size = record.size
        self.map = ExtentMap(record, repo.segment)
        self.chunks = ChunkSource(repo, cache_bytes)
        self._lock = threading.Lock()
        # Sequential streams: the end of a stream's last read -> how far its read-ahead has been started. A
        # read that starts where a stream ended continues it. Several, because NBD clients such as nbdcopy
        # read different parts of the image over parallel connections, each part front to back.
        self._streams: OrderedDict[int, int] = OrderedDict()
        # With a read pool the window runs ahead while this thread serves; without, it is read in line.
        self._window = READ_AHEAD if not self.chunks.parallel else \
            READ_AHEAD_POOL * (4 if repo.remote else 1)  # an object store: more runs in flight, each a request

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
        ids = list(dict.fromkeys(ext.id for ext in extents if ext.id is not None))
        pinned = self.chunks.pin(ids, self._plan_ahead(end, sequential))
        chunks = pinned.chunks
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
                    chunk = chunks[ext.id]
                    if len(chunk) != ext.length:  # the check restore makes: a chunk fills its extent exactly
                        raise IntegrityError(f"chunk {ext.id.hex()[:16]} is {len(chunk)} bytes long, its extent at "
                                             f"{ext.offset} {ext.length}")
                    view[pos : pos + n] = chunk[lo:hi]
                pos += n
        finally:
            self.chunks.unpin(pinned)
        return end - offset

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
        return self.chunks.wanted(ext.id for ext in self.map.extents(start, limit - start))

    def is_zero_range(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, zero)`` runs for ``[offset, offset+length)``: what NBD block status reports."""
        return self.map.zero_runs(offset, length)
