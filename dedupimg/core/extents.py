"""A snapshot's extent map: which chunk (or run of zeros) holds each byte of its image.

The one place where a snapshot record becomes extents, for restore and verify (a walk over the whole image,
segment by segment) and for the reader behind mount and serve (any range, found with two bisections: one over
the record's segment offsets, one over the extent offsets of the segment).

Segments come from a loading callback (the repository's, which checks each segment against its id); the map
checks that every segment is exactly as long as the record says, so a segment that does not fit the record
can never shift the image. Chunks are not read here: their readers check that each chunk fills its extent.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple

from dedupimg.core.errors import IntegrityError
from dedupimg.core.manifest import ExtentsDigest, Segment, SnapshotRecord, segment_starts

SEGMENT_CACHE = 64  # segments kept, with their extent offsets, for random access


class Extent(NamedTuple):
    """One extent of the image: ``[offset, offset+length)`` is zeros (id None) or the chunk ``id``.

    A named tuple, not a dataclass: reads make two per chunk, and a frozen dataclass costs several times more
    to build."""

    offset: int
    length: int
    id: bytes | None


class _Indexed(NamedTuple):
    segment: Segment
    starts: list[int]  # offset of each extent within the segment
    size: int


class ExtentMap:
    """The extents of ``record``'s image, with segments loaded by ``load(segment id)``; safe to share between
    threads. Random access keeps the last ``cache`` segments used."""

    def __init__(self, record: SnapshotRecord, load: Callable[[bytes], Segment], cache: int = SEGMENT_CACHE) -> None:
        self.record = record
        self.size = record.size
        self._load = load
        self._starts = segment_starts(record.segments)  # image offset of each segment
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, _Indexed] = OrderedDict()  # by segment id
        self._cache_size = cache

    def segment(self, index: int) -> Segment:
        """The record's segment ``index``; IntegrityError unless it is exactly as long as the record says."""
        seg_id, seg_len = self.record.segments[index]
        segment = self._load(seg_id)
        _check_length(seg_id, segment.size, seg_len)
        return segment

    def extents_digest(self) -> bytes:
        """The :class:`ExtentsDigest` of the whole image (a pass over every segment, no chunk read)."""
        digest = ExtentsDigest()
        for _, segment in self.walk():
            digest.add(segment)
        return digest.digest()

    def walk(self) -> Iterator[tuple[int, Segment]]:
        """``(image offset, segment)`` for every segment in image order, each loaded when reached (and not
        cached): a pass over the whole image."""
        for index, start in enumerate(self._starts):
            yield start, self.segment(index)

    def _indexed(self, index: int) -> _Indexed:
        """Segment ``index`` with its extent offsets, from the cache if it is there; its length is checked
        against the record at every use (a record may list one segment at several places)."""
        seg_id, seg_len = self.record.segments[index]
        with self._lock:
            entry = self._cache.get(seg_id)
            if entry is not None:
                self._cache.move_to_end(seg_id)
        if entry is None:
            segment = self._load(seg_id)
            entry = _Indexed(segment, segment.starts(), segment.size)
            with self._lock:
                self._cache[seg_id] = entry
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        _check_length(seg_id, entry.size, seg_len)
        return entry

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The extents that cover ``[offset, offset+length)`` (clipped to the image), in order."""
        end = min(offset + length, self.size)
        out: list[Extent] = []
        if offset >= end or offset < 0:
            return out
        seg_starts = self._starts
        s = bisect.bisect_right(seg_starts, offset) - 1
        while s < len(seg_starts) and seg_starts[s] < end:
            segment, starts, _ = self._indexed(s)
            base = seg_starts[s]
            e = max(0, bisect.bisect_right(starts, offset - base) - 1)
            lengths, ids = segment.lengths, segment.ids
            while e < len(lengths) and base + starts[e] < end:
                out.append(Extent(base + starts[e], lengths[e], ids[e]))
                e += 1
            s += 1
        return out

    def pieces(self, offset: int, end: int) -> Iterator[tuple[list[int], list[bytes | None]]]:
        """The extents from the one holding ``offset`` to the last that starts before ``end``, as slices of
        their segments' lengths and ids, a segment at a time: what a caller walking long runs of extents
        takes in bulk (``extents`` makes a tuple per extent)."""
        end = min(end, self.size)
        seg_starts = self._starts
        s = bisect.bisect_right(seg_starts, offset) - 1
        while 0 <= s < len(seg_starts) and seg_starts[s] < end and offset < end:
            segment, starts, size = self._indexed(s)
            base = seg_starts[s]
            first = max(0, bisect.bisect_right(starts, offset - base) - 1)
            stop = bisect.bisect_left(starts, end - base)
            yield segment.lengths[first:stop], segment.ids[first:stop]
            offset = base + size
            s += 1

    def allocated(self) -> int:
        """Bytes of the image held in chunks (not holes or zero runs): a pass over every segment."""
        return sum(n for _, segment in self.walk() for n, cid in segment.extents() if cid is not None)

    def seek(self, offset: int, data: bool) -> int | None:
        """lseek's SEEK_DATA (``data``) or SEEK_HOLE: the first offset from ``offset`` on that is in a chunk, or
        in a hole or zero run; the end of the image counts as a hole. None when ``offset`` is not in the image,
        or no data follows it (ENXIO)."""
        if not 0 <= offset < self.size:
            return None
        pos = self.extents(offset, 1)[0].offset
        for lengths, ids in self.pieces(offset, self.size):
            # Whole slices without what is sought are skipped at C speed (a 1 TiB image is millions of extents).
            if (ids.count(None) == len(ids)) if data else (None not in ids):
                pos += sum(lengths)
                continue
            for n, cid in zip(lengths, ids, strict=True):
                if (cid is not None) == data:
                    return max(pos, offset)
                pos += n
        return None if data else self.size

    def zero_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, zero)`` runs for ``[offset, offset+length)``, adjacent extents of the same kind
        merged: what NBD block status reports."""
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


def _check_length(seg_id: bytes, size: int, recorded: int) -> None:
    if size != recorded:
        raise IntegrityError(f"manifest segment {seg_id.hex()[:16]} has the wrong length")
