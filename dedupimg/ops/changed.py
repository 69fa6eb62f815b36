"""Incremental snapshots: read only what changed since a parent snapshot, take the rest from its extents.

The changed ranges come from a dirty bitmap (``qemu:dirty-bitmap:NAME`` over NBD) or from a list of offsets
and lengths (``--changed-ranges FILE``: ``rbd diff --format json``, LVM thin ``thin_delta`` turned into JSON).

The new manifest is the one a full snapshot would make, where the image is as the change list says:

- a full snapshot chunks each data region (base:allocation or SEEK_DATA) on its own and records holes as
  zero extents. The plan walks the same regions: holes as zero runs, never read;
- inside a data region, from a cut that both a full snapshot and the parent have (a parent extent boundary
  reached by the plan, or the region's start where it is one), the parent's extents are taken while they
  end before the next changed byte: each of their cuts depends only on the bytes from its chunk's start, which
  did not change;
- around a change, cutting starts at the parent cut before it and goes on as a full snapshot's does, until a
  new cut is a parent cut again with no change within a maximum chunk after it. FastCDC decides each cut from
  the chunk's start, so from there on the parent's cuts are the full snapshot's again. The bytes cut there are
  read from the source only where they changed; the unchanged bytes around a change come from the parent's
  chunks in the repository (verified against their ids), so the source is read exactly at the changed ranges.

A write into a hole allocates more than it wrote (a filesystem block, a qcow2 cluster), and a chunk the
parent ended at a hole's start is continued when the hole fills: so cutting treats every change as reaching
SLACK bytes further on both sides (only the changed bytes themselves are read from the source). Where the
allocation changed farther from any listed change (a range punched into a hole that the list does not name)
the bytes are still right; only the cuts may differ from a full snapshot's there (less deduplication).

The whole image's blake3 cannot be derived from the parent's, and reading the parent's chunks back to hash
them costs what a full snapshot's hashing does (the incremental snapshot then ran at 0.74x of a full one's
time instead of a small fraction). So the record's hash is derived: the blake3 of its extents (chunk ids and
lengths, zero runs: ``manifest.ExtentsDigest``), marked ``hash_of`` "extents" in a version 2 record. Each
chunk id is the blake3 of its bytes, so the digest pins the image as firmly; restore and verify check it
against the manifest before writing and every chunk against its id (docs/vm-sources.md).

``verify`` re-reads that share of the reused extents from the source and compares them with the parent
(chunk ids; zeros): a change the tracker missed fails the snapshot with :class:`UnchangedMismatch`.
"""

from __future__ import annotations

import bisect
import json
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from pyfastcdc import FastCDC

from dedupimg.core.chunker import Batch
from dedupimg.core.config import ChunkerParams
from dedupimg.core.errors import UnchangedMismatch, UsageError
from dedupimg.core.extents import ExtentMap
from dedupimg.core.manifest import Segment, SnapshotRecord
from dedupimg.core.zeros import is_zero
from dedupimg.ops.source import ImageSource, ReadCancelled

REUSE_BATCH = 8 << 20  # bytes of parent chunks handed on as one item
WINDOW_FLUSH = 8 << 20  # a window read this far without meeting a parent cut hands on its chunks so far
SLACK = 64 << 10  # how far around a change allocation may have changed too (see above)
PARENT_CACHE = 64  # parent chunks kept for windows that grow over them again


@dataclass(frozen=True)
class Reused:
    """Consecutive chunk extents taken from the parent: they are in the repository already."""

    lengths: list[int]
    ids: list[bytes]

    @property
    def length(self) -> int:
        return sum(self.lengths)


def load_changed_ranges(path: str, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` pairs from a JSON file: a list of ``{"offset": O, "length": N}`` objects (other keys,
    such as rbd diff's ``exists``, are ignored) or of ``[O, N]`` pairs; UsageError if it is anything else or
    reaches past the image's end."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"--changed-ranges {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"--changed-ranges {path} is not JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("ranges"), list):
        doc = doc["ranges"]
    if not isinstance(doc, list):
        raise UsageError(f"--changed-ranges {path}: expected a JSON list of {{\"offset\": O, \"length\": N}}")
    out = []
    for item in doc:
        pair = (item.get("offset"), item.get("length")) if isinstance(item, dict) else item
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(type(v) is int and v >= 0 for v in pair)):
            raise UsageError(f"--changed-ranges {path}: {json.dumps(item)[:80]} is not an offset and a length")
        offset, length = pair
        if offset + length > size:
            raise UsageError(f"--changed-ranges {path}: range {offset}+{length} reaches past the image's end "
                             f"({size} bytes): is the list of another disk?")
        out.append((offset, length))
    return out


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-empty, touching or overlapping ranges joined: ``[(start, end)]``."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(r for r in ranges if r[1] > 0):
        end = start + length
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def check_parent(parent: SnapshotRecord, src: ImageSource, chunker: dict[str, object]) -> None:
    """Refuse a parent whose extents cannot stand for the source's unchanged ranges."""
    if parent.name != src.name:
        raise UsageError(f"the parent snapshot {parent.short_id} is of image {parent.name!r}, not {src.name!r}: "
                         f"give a parent of the same image (or --name), or take a full snapshot")
    if parent.size != src.size:
        raise UsageError(f"the parent snapshot {parent.short_id} is of a {parent.size}-byte image and the source "
                         f"has {src.size} bytes: the disk was resized, take a full snapshot (without --parent)")
    if parent.chunker != chunker:
        raise UsageError(f"the parent snapshot {parent.short_id} was cut with other chunker parameters: "
                         f"take a full snapshot")
    if parent.changed_during_read:
        raise UsageError(f"the parent snapshot {parent.short_id} changed while it was read, so it may match no "
                         f"moment of the disk: take a full snapshot")


class Plan:
    """The items of an incremental snapshot in image order: ``Batch`` (read and cut now), ``int`` (zeros) and
    :class:`Reused` (the parent's chunks)."""

    def __init__(self, parent: SnapshotRecord, load: Callable[[bytes], Segment], changed: list[tuple[int, int]],
                 params: ChunkerParams, chunk_id: Callable[[memoryview], bytes],
                 read_blobs: Callable[[list[bytes]], list[bytes]], verify: float = 0.0) -> None:
        self.parent = parent
        self._read_blobs = read_blobs
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self.changed = merge_ranges(changed)  # what is read from the source
        self._read_starts = [s for s, _ in self.changed]
        # what is cut again: the changes and SLACK around them
        self._cut = merge_ranges([(max(0, s - SLACK), e - s + 2 * SLACK) for s, e in self.changed])
        self._starts = [s for s, _ in self._cut]
        self._cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size,
                            normalized_chunking=params.normalized_chunking,  # type: ignore[arg-type]
                            seed=params.seed)
        self._max = params.max_size
        self._avg = params.avg_size
        self._chunk_id = chunk_id
        self._verify = verify / 100.0
        self._rng = random.Random()
        # The parent's extents by offset (two bisections, recent segments cached): nothing is held per extent,
        # so a 1 TiB parent costs what a few segments do.
        self._parent = ExtentMap(parent, load)
        self.bytes_read = 0
        self.bytes_verified = 0

    # -- change list ----------------------------------------------------------------------------------------

    def _next_change(self, pos: int, read: bool = False) -> tuple[int, int] | None:
        """The first range to cut again (``read``: changed range) that ends after ``pos``."""
        ranges, starts = (self.changed, self._read_starts) if read else (self._cut, self._starts)
        i = bisect.bisect_right(starts, pos) - 1
        if i >= 0 and ranges[i][1] > pos:
            return ranges[i]
        return ranges[i + 1] if i + 1 < len(ranges) else None

    def _changes_end(self, start: int, end: int) -> int:
        """The end of the last range to cut again meeting ``[start, end)``, or ``start`` if none does."""
        i = bisect.bisect_left(self._starts, end) - 1
        if i >= 0 and self._cut[i][1] > start:
            return self._cut[i][1]
        return start

    # -- the walk -------------------------------------------------------------------------------------------

    def items(self, src: ImageSource, stop: threading.Event) -> Iterator[Batch | int | Reused]:
        for region in src.regions():
            assert region.length is not None
            if not region.is_data:
                yield region.length
                continue
            pos, end = region.offset, region.offset + region.length
            while pos < end:
                if stop.is_set():
                    raise ReadCancelled
                if self._is_cut(pos):
                    took = yield from self._reuse(src, pos, end)
                    if took > pos:
                        pos = took
                        continue
                pos = yield from self._read_window(src, pos, end, stop)

    def _is_cut(self, pos: int) -> bool:
        """Whether ``pos`` is an extent boundary of the parent (its end included)."""
        if pos >= self.parent.size:
            return pos == self.parent.size
        found = self._parent.extents(pos, 1)
        return bool(found) and found[0].offset == pos

    def _reuse(self, src: ImageSource, pos: int, end: int) -> Generator[int | Reused, None, int]:
        """The parent's extents from ``pos`` (one of its cuts) that end by the next change and by ``end``;
        returns where they end (``pos`` if none fits).

        Most of an incremental snapshot's image is taken here, an extent per ~20 KiB, so a segment's
        extents are taken as list slices where they are all chunks and none is to be verified; zero extents
        and ``verify`` go one extent at a time."""
        nxt = self._next_change(pos)
        limit = min(end, nxt[0] if nxt is not None else end)
        lengths: list[int] = []
        ids: list[bytes] = []
        batch_start = pos
        for seg_lengths, seg_ids in self._parent.pieces(pos, limit):
            if not self._verify and None not in seg_ids:
                ends = list(accumulate(seg_lengths, initial=pos))
                fit = bisect.bisect_right(ends, limit) - 1  # extents [0, fit) end by the limit
                lengths += seg_lengths[:fit]
                ids += seg_ids[:fit]  # type: ignore[arg-type]
                pos = ends[fit]
                if pos - batch_start >= REUSE_BATCH:
                    yield Reused(lengths, ids)
                    lengths, ids, batch_start = [], [], pos
                if fit < len(seg_lengths):
                    break  # the next extent reaches past the limit
                continue
            done = False
            for length, id_ in zip(seg_lengths, seg_ids, strict=True):
                full = length
                if id_ is None:
                    # Zeros may be cut at the region's end: a full snapshot's chunks of them are zeros up to it.
                    length = min(length, end - pos)
                if pos + length > limit:
                    done = True
                    break
                self._check(src, pos, length, id_)
                if id_ is None:
                    if lengths:
                        yield Reused(lengths, ids)
                        lengths, ids = [], []
                    yield length
                    batch_start = pos + length
                else:
                    lengths.append(length)
                    ids.append(id_)
                    if pos + length - batch_start >= REUSE_BATCH:
                        yield Reused(lengths, ids)
                        lengths, ids, batch_start = [], [], pos + length
                pos += length
                if length != full:  # a zero extent cut at the region's end
                    done = True
                    break
            if done:
                break
        if lengths:
            yield Reused(lengths, ids)
        return pos

    def _check(self, src: ImageSource, pos: int, length: int, id_: bytes | None) -> None:
        """With ``verify``: re-read that share of the reused extents and compare them with the parent's. A chunk
        is read whole with that probability; a zero run (of any length) in slices of a maximum chunk, that
        share of them, chosen at random."""
        if not self._verify:
            return
        if id_ is not None:
            if self._rng.random() < self._verify:
                self._compare(src, pos, length, id_)
            return
        slices = -(-length // self._max)
        share = slices * self._verify
        count = int(share) + (self._rng.random() < share - int(share))
        for k in sorted(self._rng.sample(range(slices), min(count, slices))):
            start = pos + k * self._max
            self._compare(src, start, min(self._max, pos + length - start), None)

    def _compare(self, src: ImageSource, pos: int, length: int, id_: bytes | None) -> None:
        buf = bytearray(length)
        src.read_at(pos, memoryview(buf))
        self.bytes_verified += length
        same = is_zero(buf, 0, length) if id_ is None else self._chunk_id(memoryview(buf)) == id_
        if not same:
            self._mismatch(pos, length)

    def _mismatch(self, pos: int, length: int) -> None:
        raise UnchangedMismatch(
                f"bytes {pos}-{pos + length} of the source differ from the parent snapshot "
                f"{self.parent.short_id} although the change list says they did not change: the dirty bitmap "
                f"or change list is incomplete; take a full snapshot (without --parent) and start a new bitmap")

    def _read_window(self, src: ImageSource, pos: int, end: int, stop: threading.Event
                     ) -> Generator[Batch, None, int]:
        """Cut from ``pos`` (a cut of a full snapshot) until a new cut is a parent cut again past the changes
        near it, or ``end``; returns where it stopped. A cut before the buffer's end is final (only the last
        chunk of a buffer may have been cut by its end), so the buffer grows a little at a time."""
        buf = bytearray()
        base = pos  # image offset of buf[0]
        t = self._changes_end(pos, pos + self._max)
        step = self._avg
        while True:
            if stop.is_set():
                raise ReadCancelled
            have = base + len(buf)
            want = min(end, max(have + step, t + self._avg))
            old = len(buf)
            buf.extend(bytes(want - have))
            self._fill(src, have, memoryview(buf)[old:])
            eof = want == end
            cuts = [(c.offset, c.offset + c.length) for c in self._cdc.cut_buf(memoryview(buf))]
            if not eof:
                cuts.pop()  # may end at the buffer's end rather than at a content-defined cut
            for k, (_, e) in enumerate(cuts):
                c = base + e
                if c < t:
                    continue
                t = self._changes_end(c, c + self._max)
                if c >= t and self._is_cut(c):
                    yield Batch(buf, cuts[: k + 1])
                    return c
            if eof:
                yield Batch(buf, cuts)
                return end
            if cuts and len(buf) >= WINDOW_FLUSH:
                done = cuts[-1][1]
                yield Batch(buf, cuts)
                buf = bytearray(memoryview(buf)[done:])
                base += done
            step = min(2 * step, WINDOW_FLUSH)

    def _fill(self, src: ImageSource, offset: int, out: memoryview) -> None:
        """The image's bytes at ``offset``: changed ranges from the source, the rest from the parent."""
        pos, end = offset, offset + len(out)
        while pos < end:
            nxt = self._next_change(pos, read=True)
            if nxt is not None and nxt[0] <= pos:
                n = min(nxt[1], end) - pos
                src.read_at(pos, out[pos - offset : pos - offset + n])
                self.bytes_read += n
            else:
                n = min(nxt[0] if nxt is not None else end, end) - pos
                self._parent_into(pos, out[pos - offset : pos - offset + n])
                self._check_filled(src, pos, out[pos - offset : pos - offset + n])
            pos += n

    def _check_filled(self, src: ImageSource, pos: int, parent_bytes: memoryview) -> None:
        """With ``verify``: that share of the parent's bytes a window was filled with, in slices of a maximum
        chunk, re-read from the source and compared. These are unchanged bytes as much as reused extents are:
        a window also covers data the source's allocation added where the parent had a hole (a write the
        change list missed lands there), and its bytes come from the parent."""
        if not self._verify:
            return
        length = len(parent_bytes)
        for start in range(0, length, self._max):
            if self._rng.random() >= self._verify:
                continue
            piece = parent_bytes[start : start + self._max]
            buf = bytearray(len(piece))
            src.read_at(pos + start, memoryview(buf))
            self.bytes_verified += len(buf)
            if buf != piece:
                self._mismatch(pos + start, len(buf))

    def _parent_into(self, offset: int, out: memoryview) -> None:
        """The parent image's bytes at ``offset``, from its chunks (zeros for its zero extents)."""
        end = offset + len(out)
        found = self._parent.extents(offset, len(out))
        wanted = [e.id for e in found if e.id is not None and e.id not in self._cache]
        if wanted:
            for id_, data in zip(wanted, self._read_blobs(wanted), strict=True):
                self._cache[id_] = data
        for ext in found:
            lo, hi = max(offset, ext.offset), min(end, ext.offset + ext.length)
            if ext.id is None:
                out[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                data = self._cache[ext.id]
                self._cache.move_to_end(ext.id)
                out[lo - offset : hi - offset] = data[lo - ext.offset : hi - ext.offset]
        while len(self._cache) > PARENT_CACHE:
            self._cache.popitem(last=False)
