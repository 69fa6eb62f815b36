"""Taking a snapshot: source regions -> chunks -> ids -> new chunks stored -> segments -> record.

The work runs as a pipeline so that both cores stay busy: a reader thread reads and cuts buffers (both
release the GIL), a small pool hashes the chunks of the next batches and compresses new chunks (blake3 and
zstd release the GIL), and the calling thread does what must happen in image order: the whole-image hash,
index lookups, segment building and pack writes. Queues are bounded, so memory does not grow with the image.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time as _time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dedupimg.core.buffers import PoolClosed
from dedupimg.core.chunker import Batch, Chunker
from dedupimg.core.errors import UsageError
from dedupimg.core.fsutil import printable_utf8
from dedupimg.core.imagehash import ImageHasher
from dedupimg.core.manifest import (
    HASH_OF_EXTENTS,
    HASH_OF_IMAGE,
    ExtentsDigest,
    Segment,
    SegmentBuilder,
    SnapshotRecord,
    chunker_dict,
)
from dedupimg.core.nbdclient import is_nbd_uri, parse_uri
from dedupimg.core.parallel import started_ahead, worker_count
from dedupimg.core.progress import NoProgress, Progress
from dedupimg.core.zeros import is_zero
from dedupimg.ops.bases import BaseFinder, base_finder, encode_chunks, latest
from dedupimg.ops.changed import Plan, Reused, check_parent, load_changed_ranges
from dedupimg.ops.nbdsource import NbdSource
from dedupimg.ops.qemu import check_format, detect_format, open_image
from dedupimg.ops.source import ImageSource, ReadCancelled, Source
from dedupimg.repo.repository import BlobWriter, EncodedBlob, Repository

WORKERS = worker_count()
AHEAD = 3  # batches hashed ahead of the one being stored
QUEUE = 2  # batches read and cut ahead of hashing
PLANNED = 2  # batches being compressed ahead of the one being written
# Buffers a snapshot may hold at once: queued, hashing, planned, one being filled and its tail. The reader
# waits for a free one, which bounds memory (12 x 8 MiB) whatever the image size.
BUFFERS = QUEUE + AHEAD + PLANNED + 5
# A snapshot name is at most this many UTF-8 bytes: what a file name may be, so that a name shows whole in
# tables, messages and (unless it holds '/' or '%', escaped there) as a directory of the mount. A 5000
# character name broke `ls` of the mount (found by review); the mount shortens what older records still hold.
MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class SnapshotResult:
    record: SnapshotRecord
    bytes_read: int
    bytes_new: int  # raw bytes of chunks not in the repository before
    bytes_stored: int  # bytes of new pack files
    chunks_new: int
    seconds: float
    # What changed while a regular-file source was read ("mtime, ctime"), or None; the record is marked.
    changed_during_read: str | None = None
    parent: str = ""  # an incremental snapshot's parent (hex id)
    bytes_verified: int = 0  # of bytes_read: unchanged ranges re-read by --verify-unchanged


@dataclass(frozen=True)
class Changes:
    """An incremental snapshot: the parent (any reference ``resolve`` takes) and where the changes come from,
    a dirty bitmap of the NBD export or a JSON file of ranges; ``verify``: percent of unchanged ranges to
    re-read and compare with the parent."""

    parent: str
    dirty_bitmap: str | None = None
    ranges_file: str | None = None
    verify: float = 0.0


def take_snapshot(
    repo: Repository,
    source: str,
    name: str | None = None,
    tags: list[str] | None = None,
    when: datetime | None = None,
    progress: Progress | None = None,
    source_format: str = "auto",
    changes: Changes | None = None,
) -> SnapshotResult:
    """Snapshot ``source``: a file, a block device, ``-`` (stdin), an image qemu reads (qcow2, vmdk, ...:
    ``source_format`` auto-detects) or an NBD URI; with ``changes``, read only what changed since a parent."""
    progress = progress or NoProgress()
    started = _time.monotonic()
    when = _checked_time(when or datetime.now())
    host = socket.gethostname()
    _check_changes(changes)
    _check_text("source", source)
    if name is not None:
        _check_name(name)
    src = open_source(source, name, source_format, changes.dirty_bitmap if changes else None)
    plan = None
    try:
        if name is None:
            _check_name(src.name)
            _check_default_name(repo, src, host)
        if changes is not None:
            plan = _plan(repo, src, changes)
    except BaseException:
        src.close()
        raise
    writer = repo.writer()
    try:
        progress.start(f"snapshot {src.name}", src.size)
        base_of = base_finder(repo, plan.parent if plan is not None else latest(repo, src.name, host))
        store = _Store(repo, writer, progress, hash_image=plan is None, base_of=base_of)
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="dedupimg-snap") as pool:
            reader = _Reader(src, Chunker(repo.config.chunker), plan)
            try:
                store.run(reader, pool)
                image_hash = store.digest()
            finally:
                reader.stop()
                store.close()
        bytes_read = reader.bytes_read
        changed = src.changes()  # raises SourceError if the file shrank: its end was never read
        stats: dict[str, object] = {"bytes_read": bytes_read, "bytes_new": writer.new_chunk_bytes,
                                    "chunks_new": writer.new_chunks}
        if plan is not None:
            stats.update(parent=plan.parent.hex_id, bytes_verified=plan.bytes_verified)
        record = SnapshotRecord(
            name=src.name,
            time=when.isoformat(),
            size=store.size,
            image_hash=image_hash,
            segments=store.segments,
            source=src.description,
            host=host,
            tags=sorted(set(tags or [])),
            chunker=chunker_dict(repo.config.chunker),
            stats=stats,
            changed_during_read=changed is not None,
            hash_of=HASH_OF_IMAGE if plan is None else HASH_OF_EXTENTS,
        )
        writer.commit_snapshot(record)
        progress.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        src.close()
    return SnapshotResult(
        record=record,
        bytes_read=bytes_read,
        bytes_new=writer.new_chunk_bytes,
        bytes_stored=writer.stored_bytes,
        chunks_new=writer.new_chunks,
        seconds=_time.monotonic() - started,
        changed_during_read=changed,
        parent=plan.parent.hex_id if plan else "",
        bytes_verified=plan.bytes_verified if plan else 0,
    )


def open_source(spec: str, name: str | None, source_format: str = "auto", bitmap: str | None = None
                ) -> ImageSource:
    """The source ``spec`` names: an NBD URI, an image qemu reads (through a private qemu-nbd), or a file,
    device or stdin."""
    source_format = check_format(source_format)
    if source_format not in ("auto", "raw") and (spec == "-" or is_nbd_uri(spec)):
        raise UsageError(f"--source-format {source_format} is for image files: standard input and NBD exports "
                         f"are read as raw disks")
    if is_nbd_uri(spec):
        address = parse_uri(spec)
        if not (name or address.export):
            raise UsageError(f"{spec} names no export: give --name for its snapshots")
        return NbdSource(address, name or address.export, spec, bitmap)
    fmt = detect_format(spec) if source_format == "auto" and spec != "-" else source_format
    if fmt not in (None, "auto", "raw"):
        return open_image(spec, fmt, name, bitmap)
    if bitmap:
        raise UsageError(f"--dirty-bitmap needs an NBD source or an image qemu reads (qcow2); {spec} is raw: "
                         f"give its changes with --changed-ranges FILE")
    return Source.open(spec, name)


def _check_changes(changes: Changes | None) -> None:
    if changes is None:
        return
    if (changes.dirty_bitmap is None) == (changes.ranges_file is None):
        raise UsageError("--parent needs exactly one of --dirty-bitmap NAME and --changed-ranges FILE")
    if not 0.0 <= changes.verify <= 100.0:
        raise UsageError(f"--verify-unchanged {changes.verify:g}: give a percent from 0 to 100")


def _plan(repo: Repository, src: ImageSource, changes: Changes) -> Plan:
    if src.size is None:
        raise UsageError("an incremental snapshot (--parent) needs a source it can read at any offset, not stdin")
    parent = repo.resolve(changes.parent, src.name if changes.parent == "latest" else None)
    check_parent(parent, src, chunker_dict(repo.config.chunker))
    if changes.ranges_file is not None:
        ranges = load_changed_ranges(changes.ranges_file, src.size)
    else:
        assert isinstance(src, NbdSource)
        ranges = src.dirty_ranges()
    return Plan(parent, repo.segment, ranges, repo.config.chunker, repo.chunk_id, repo.read_blobs, changes.verify)


# Times a record may carry: from the Unix epoch to the end of year 9999 (UTC). mount turns each record's time
# into UTC for a timestamp and a file name; a time that overflows there (0001-01-01T00:00+01:00 is year 0 in
# UTC) would break the view of the whole repository.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def _checked_time(when: datetime) -> datetime:
    """``when`` with a UTC offset (a naive time is local time, as restic's --time reads it), or UsageError."""
    try:
        if when.tzinfo is None:
            when = when.astimezone()
        utc = when.astimezone(UTC)
    except (OverflowError, ValueError, OSError):
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise UsageError(f"time {when.isoformat()} is out of range: give a time from "
                         f"{EARLIEST.date()} to {LATEST.date()} (UTC)")
    return when


def _check_text(what: str, text: str) -> None:
    """A name or source path goes into the snapshot record as UTF-8 text and into one-line messages: refused
    before anything is read when it cannot (found by review: a non-UTF-8 source path failed only after the
    whole image was stored; a newline in a name split later messages in two)."""
    if not printable_utf8(text):
        raise UsageError(f"the {what} {text!r} is not valid UTF-8 or holds control characters: rename it, or "
                         "reach it through a symlink (and give --name NAME)")


def _check_name(name: str) -> None:
    """A snapshot name: printable UTF-8 of at most MAX_NAME_BYTES (the message quotes only its start)."""
    _check_text("name", name)
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        raise UsageError(f"the name {name[:40]!r}... is {size} bytes long: give a name of at most "
                         f"{MAX_NAME_BYTES} bytes (--name NAME)")


def _check_default_name(repo: Repository, src: ImageSource, host: str) -> None:
    """Refuse a default name (the file's base name) that already names snapshots of another source or host.

    ``vms/a/disk.img`` and ``vms/b/disk.img`` would both be ``disk.img``, and forget would then treat two
    machines as one series. The same file under another path (a symlink to it, or the resolved path that
    records of earlier versions hold) is the same source.
    """
    paths = {src.description, src.resolved}
    for rec in repo.snapshots(src.name):
        if rec.host != host or (rec.source not in paths and os.path.realpath(rec.source) != src.resolved):
            raise UsageError(f"the name {src.name!r} already belongs to snapshots of {rec.source} on host "
                             f"{rec.host}, not of {src.description} on {host}: give --name NAME for this image "
                             f"(or --name {src.name!r} to add it to that series anyway)")


_END = object()


class _Reader:
    """Reads and cuts the source on its own thread; yields batches, and ints for holes, in image order (and,
    following an incremental ``plan``, the parent's extents that are reused)."""

    def __init__(self, src: ImageSource, chunker: Chunker, plan: Plan | None = None) -> None:
        self._src = src
        self._chunker = chunker
        self._plan = plan
        self._queue: queue.Queue[object] = queue.Queue(QUEUE)
        self._stopped = threading.Event()
        self._pool = chunker.pool(BUFFERS)
        self.bytes_read = 0
        self._thread = threading.Thread(target=self._run, name="dedupimg-read", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> None:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            if self._plan is not None:
                try:
                    for item in self._plan.items(self._src, self._stopped):
                        self._put(item)
                finally:
                    self.bytes_read = self._plan.bytes_read + self._plan.bytes_verified
                self._put(_END)
                return
            for region in self._src.regions():
                if not region.is_data:
                    self._put(region.length)
                    continue
                readinto = self._src.reader(region, self._stopped)
                # Two holders per batch: the image hasher and the stage that writes its new chunks.
                for batch in self._chunker.batches(readinto, self._pool, holders=2):
                    if self._stopped.is_set():
                        return
                    self._put(batch)
                self.bytes_read += readinto.bytes_read
            self._put(_END)
        except (PoolClosed, ReadCancelled):
            return
        except BaseException as exc:  # handed to the consuming thread, which raises it
            self._put(exc)

    def __iter__(self) -> Iterator[Batch | int | Reused]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def stop(self) -> None:
        self._stopped.set()
        self._pool.close()
        if self._thread.is_alive():
            self._src.interrupt()  # a read waiting on a stalled server gives up now
        self._thread.join()


def _chunk_ids(chunk_id: Callable[[memoryview], bytes], batch: Batch) -> list[bytes | None]:
    """The id of each chunk (blake3, keyed in an encrypted repository), None for all-zero chunks (never
    hashed). Runs on a pool thread."""
    buf = batch.buf
    view = memoryview(buf)
    return [None if is_zero(buf, s, e) else chunk_id(view[s:e]) for s, e in batch.cuts]


@dataclass
class _Planned:
    """A batch whose new chunks are being compressed on the pool, waiting for its turn to be written."""

    batch: Batch | int | Reused  # int: a hole of that length
    ids: list[bytes | None]
    new: list[tuple[bytes, int, int]]  # (id, start, end) of chunks to store
    encoded: list[Future[list[EncodedBlob]]]


class _Store:
    """The in-order stages: image hash and index lookups (plan), then pack writes and segments (commit).

    Planning runs a couple of batches ahead of committing, so compression of one batch overlaps the lookups
    of the next; ids planned but not yet written are kept in ``_in_flight`` so they are stored once.

    Without ``hash_image`` (an incremental snapshot, which does not read its unchanged ranges) the record's
    hash is the :class:`ExtentsDigest` of the segments written.
    """

    def __init__(self, repo: Repository, writer: BlobWriter, progress: Progress, hash_image: bool = True,
                 base_of: BaseFinder | None = None) -> None:
        self._writer = writer
        self._read_blobs = repo.read_blobs
        self._base_of = base_of
        self._planned_to = 0  # image offset of the next item to plan
        self._progress = progress
        self._chunk_id = repo.chunk_id
        self._in_flight: set[bytes] = set()
        self._hasher = ImageHasher(AHEAD + QUEUE + 2) if hash_image else None
        self._extents = ExtentsDigest()
        self.segments: list[tuple[bytes, int]] = []
        self.size = 0
        self._builder = SegmentBuilder(repo.config.segments, self._emit_segment)

    def _emit_segment(self, segment: Segment) -> None:
        self.segments.append((self._writer.add_segment(segment), segment.size))
        if self._hasher is None:
            self._extents.add(segment)

    def digest(self) -> bytes:
        return self._extents.digest() if self._hasher is None else self._hasher.digest()

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.close()

    def run(self, reader: _Reader, pool: ThreadPoolExecutor) -> None:
        def hash_ids(item: Batch | int | Reused) -> Future[list[Any]] | None:
            return pool.submit(_chunk_ids, self._chunk_id, item) if isinstance(item, Batch) else None

        planned: deque[_Planned] = deque()
        for item, ids in started_ahead(reader, hash_ids, AHEAD):
            planned.append(self._plan(item, ids, pool))
            if len(planned) >= PLANNED:
                self._commit(planned.popleft())
        while planned:
            self._commit(planned.popleft())
        self._builder.flush()

    def _plan(self, item: Batch | int | Reused, ids_future: Future[list[Any]] | None,
              pool: ThreadPoolExecutor) -> _Planned:
        hasher = self._hasher
        at = self._planned_to
        if isinstance(item, int):
            self._planned_to += item
            if hasher is not None:
                hasher.add_zeros(item)
            return _Planned(item, [], [], [])
        if isinstance(item, Reused):
            self._planned_to += item.length
            assert hasher is None, "an incremental snapshot's hash is its extents'"
            return _Planned(item, [], [], [])
        self._planned_to += item.length
        if hasher is not None:
            hasher.add([memoryview(item.buf)[: item.length]], item.release)
        else:
            assert item.lease is None  # incremental batches are not pooled: no second holder to release
        assert ids_future is not None
        ids = ids_future.result()
        view = memoryview(item.buf)
        new = self._new_chunks(item, ids)
        bases = self._base_of([(at + s, e - s) for _i, s, e in new]) if self._base_of and new else None
        return _Planned(item, ids, new, self._compress(new, view, pool, bases))

    def _commit(self, p: _Planned) -> None:
        builder = self._builder
        if isinstance(p.batch, int):
            builder.add_zero(p.batch)
            self._advance(p.batch)
            return
        if isinstance(p.batch, Reused):
            builder.add_chunks(p.batch.lengths, p.batch.ids)
            self._advance(p.batch.length)
            return
        for blob in (blob for f in p.encoded for blob in f.result()):
            self._writer.add_encoded_chunk(blob)
            self._in_flight.discard(blob.id)
        builder.add_extents([e - s for s, e in p.batch.cuts], p.ids)
        p.batch.release()
        self._advance(p.batch.length)

    def _new_chunks(self, batch: Batch, ids: list[bytes | None]) -> list[tuple[bytes, int, int]]:
        """Chunks of this batch that neither the repository nor an earlier batch or chunk has."""
        data = [(i, c) for i, c in zip(ids, batch.cuts, strict=True) if i is not None]
        missing = self._writer.missing([i for i, _ in data])
        in_flight = self._in_flight
        new = []
        for (id_, (s, e)), m in zip(data, missing, strict=True):
            if m and id_ not in in_flight:
                in_flight.add(id_)
                new.append((id_, s, e))
        return new

    def _compress(self, new: list[tuple[bytes, int, int]], view: memoryview, pool: ThreadPoolExecutor,
                  bases: list[bytes | None] | None = None) -> list[Future[list[EncodedBlob]]]:
        """Compress (and seal) on the pool in a few large tasks (one task per chunk would cost more than zstd);
        a chunk with a base in ``bases`` is stored as a delta on it where that pays (BlobWriter.encode_chunk)."""
        encode = self._writer.encode_chunk
        read_blobs = self._read_blobs

        def work(part: list[tuple[bytes, int, int]], part_bases: list[bytes | None]) -> list[EncodedBlob]:
            return encode_chunks(encode, read_blobs, [(id_, view[s:e]) for id_, s, e in part], part_bases)

        if not new:
            return []
        all_bases: list[bytes | None] = bases if bases is not None else [None] * len(new)
        step = -(-len(new) // WORKERS)
        return [pool.submit(work, new[i : i + step], all_bases[i : i + step]) for i in range(0, len(new), step)]

    def _advance(self, n: int) -> None:
        self.size += n
        self._progress.advance(n)
