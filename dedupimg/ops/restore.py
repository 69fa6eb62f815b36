"""Restoring a snapshot to a file, a block device or standard output, verified against the image hash.

A full restore reads through the repository's read pool (repo/readpool.py): worker processes read, decrypt,
decompress and verify runs of chunks into a shared arena ahead of the writer, and this process writes the
arena's bytes with large positional vectored writes (files and devices, on writer threads; standard output
in order) and hashes the whole image on its own thread. Where there is no pool (a remote repository: see
_restore_into; an in-memory store; DEDUPIMG_READ_WORKERS=0) threads of this process read instead. Written
ranges are handed to the kernel's writeback at once, so the final fdatasync has little left to do.

``delta`` updates an existing target in place: each chunk's range is read from the target and hashed, and
only chunks whose hash differs are fetched, and only their 4 KiB blocks that differ written.
"""

from __future__ import annotations

import functools
import time as _time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from dedupimg.core.errors import DedupimgError, IntegrityError, Interrupted
from dedupimg.core.extents import ExtentMap
from dedupimg.core.imagehash import Buffer, ImageHasher, NoImageHash
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.parallel import Countdown, started_ahead, worker_count
from dedupimg.core.progress import NoProgress, Progress
from dedupimg.core.zeros import ZERO_BLOCK, is_zero
from dedupimg.ops.target import NullTarget, Target
from dedupimg.repo.chunksource import ChunkSource
from dedupimg.repo.repository import Repository

READ_BATCH = 8 << 20  # bytes of image per run read, verified and written as one piece
WORKERS = worker_count()
AHEAD = 2 * WORKERS  # runs being read ahead of the writer
POOL_SPARE_RUNS = 4  # runs' worth of read pool slots beyond those in flight: being written and hashed
WRITERS = 2  # threads writing a pooled restore's runs to the target
DELTA_BLOCK = 4096  # granularity of delta writes
_ZEROS = memoryview(ZERO_BLOCK)


@dataclass(frozen=True)
class RestoreResult:
    record: SnapshotRecord
    target: str
    bytes_written: int
    bytes_read: int  # of the target, by a delta restore
    seconds: float


@dataclass(frozen=True)
class Run:
    """A piece of the image: zeros (``ids`` is None) or consecutive chunks."""

    offset: int
    length: int
    ids: list[bytes] | None = None
    lengths: list[int] = field(default_factory=list)


@dataclass
class RunResult:
    data: list[Buffer] | None  # the run's bytes in order (None for zeros), for the image hash
    writes: list[tuple[int, list[Buffer]]]  # what is still to be written where (standard output only)
    written: int = 0  # bytes the pool thread already wrote
    read: int = 0


def restore(
    repo: Repository,
    ref: str,
    target: str,
    force: bool = False,
    name: str | None = None,
    delta: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    started = _time.monotonic()
    record = repo.resolve(ref, name)
    out = Target(target, record.size, force, in_place=delta)
    written, read = _restore_into(repo, record, out, progress or NoProgress(), f"restore {record.short_id}")
    return RestoreResult(record, target, written, read, _time.monotonic() - started)


def verify(repo: Repository, ref: str, name: str | None = None, progress: Progress | None = None) -> RestoreResult:
    """Read a snapshot's whole image, checking every chunk and the image's blake3; write nothing."""
    started = _time.monotonic()
    record = repo.resolve(ref, name)
    _restore_into(repo, record, NullTarget(), progress or NoProgress(), f"verify {record.short_id}")
    return RestoreResult(record, "", 0, 0, _time.monotonic() - started)


def _restore_into(repo: Repository, record: SnapshotRecord, out: Target | NullTarget, progress: Progress,
                  task_name: str) -> tuple[int, int]:
    """Write the image into ``out`` and prove it against the recorded hash; returns (written, read)."""
    delta = out.readable
    reads = repo.concurrent_reads  # an object store: more, each waiting on its request
    # An object store answers each read after a round trip, and a late answer holds up the runs behind it in
    # image order: two runs in flight per reader (measured: 8 -> 12 in flight, +4-6%).
    ahead = max(AHEAD, 2 * reads)
    hasher = NoImageHash() if record.hash_derived else ImageHasher(ahead + 2)
    try:
        if record.hash_derived:
            # Proven before a byte is written: the manifest is the one recorded; each chunk is then checked
            # against its id as it is read, so the image is the one snapshotted.
            check_extents(repo, record)
        progress.start(task_name, record.size)
        # A delta restore fetches only what differs: it reads in its threads. So does a restore from an object
        # store: there the pool's worker processes cost more CPU in all (1 MiB requests, a copy into the arena,
        # client 4.1 + SeaweedFS 2.4 CPU-s for 1 GiB against 3.25 + 1.7) and ran at 250-274 MB/s against
        # the threads' 387 (1 GiB vm v2 on loopback SeaweedFS, 2026-11-26 15:04 UTC).
        if not delta and not repo.remote:
            repo.start_read_pool(cache_bytes=(ahead + POOL_SPARE_RUNS) * READ_BATCH)
        if repo.read_pool is not None and not delta:
            written, read = _pooled_restore(repo, record, out, hasher, progress, ahead), 0
        else:
            written, read = _threaded_restore(repo, record, out, hasher, progress, reads, ahead)
        if not record.hash_derived and hasher.digest() != record.image_hash:
            raise IntegrityError(
                f"the image of snapshot {record.short_id} does not match its recorded blake3"
                + ("; the target was not replaced" if out.tmp is not None else "")
            )
        out.commit()
        progress.finish()
    except BaseException as exc:
        try:
            out.abort()  # first: a second Ctrl-C while the hasher's thread is joined must not keep the temp file
        finally:
            hasher.close()
        if out.in_place and isinstance(exc, DedupimgError):
            raise _left_partial(exc, out, record) from None
        raise
    out.close()
    return written, read


def _pooled_restore(repo: Repository, record: SnapshotRecord, out: Target | NullTarget, hasher: ImageHasher,
                    progress: Progress, ahead: int) -> int:
    """The image through the repository's read pool; returns the bytes written.

    Worker processes read, decrypt, decompress and verify runs of chunks into the pool's shared arena
    (readpool.py: two processes decompress at 1.9x one, two threads at 1.0-1.3x); this process only plans,
    writes the arena's bytes to the target with vectored positional writes (on WRITERS threads: the
    syscalls release the GIL) and hashes them in order, and a run's slots stay pinned until both are done.
    """
    source = ChunkSource(repo)
    written = 0
    writes: deque[Future[int]] = deque()
    with ThreadPoolExecutor(WRITERS, thread_name_prefix="dedupimg-restore-write") as writers:
        for run, _ in started_ahead(plan_runs(repo, record), lambda run: source.prefetch(run.ids or ()), ahead):
            while writes and writes[0].done():
                written += writes.popleft().result()  # (a failed write raises here)
            if run.ids is None:
                hasher.add_zeros(run.length)
                if not out.sparse:
                    if out.seekable:
                        writes.append(writers.submit(out.write_zeros, run.offset, run.length))
                    else:
                        out.write(run.offset, [_ZEROS[: run.length]])
                        written += run.length
                progress.advance(run.length)
                continue
            try:
                pinned = source.pin(list(dict.fromkeys(run.ids)), [])
            except IntegrityError as exc:
                raise IntegrityError(f"damaged data in {_range(run)}: {exc}") from None
            data: list[Buffer] = [pinned.chunks[id_] for id_ in run.ids]
            try:
                _check_lengths(run, data, run.lengths)
            except IntegrityError:
                source.unpin(pinned)
                raise
            release = Countdown(2 if out.seekable else 1, functools.partial(source.unpin, pinned))
            if out.seekable:
                writes.append(writers.submit(_write_then, out, run.offset, data, release))
            else:
                out.write(run.offset, data)
                written += run.length
            hasher.add(data, release.done)
            progress.advance(run.length)
        while writes:
            written += writes.popleft().result()
    return written


def _write_then(out: Target | NullTarget, offset: int, data: list[Buffer], release: Countdown) -> int:
    try:
        out.write(offset, data)
    finally:
        release.done()
    length = sum(len(d) for d in data)
    out.start_writeback(offset, length)
    return length


def _threaded_restore(repo: Repository, record: SnapshotRecord, out: Target | NullTarget, hasher: ImageHasher,
                      progress: Progress, reads: int, ahead: int) -> tuple[int, int]:
    """The image read by ``reads`` threads of this process (a delta restore, or no read pool); (written, read)."""
    written = read = 0
    with ThreadPoolExecutor(reads, thread_name_prefix="dedupimg-restore") as pool:
        task = functools.partial(_delta_run if out.readable else _full_run, repo, out)
        for run, result in _pipelined(pool, plan_runs(repo, record), task, ahead):
            if result.data is None:
                hasher.add_zeros(run.length)
            else:
                hasher.add(result.data)
            for offset, buffers in result.writes:
                out.write(offset, buffers)
                written += sum(len(b) for b in buffers)
            written += result.written
            read += result.read
            progress.advance(run.length)
    return written, read


def _left_partial(exc: DedupimgError, out: Target | NullTarget, record: SnapshotRecord) -> DedupimgError:
    """The same error, saying that a target written in place (a device, ``--delta``) may now be half done.

    Nothing is lost by re-running: a delta restore compares every chunk again and writes only what still
    differs, and a full restore to a device rewrites it whole.
    """
    again = "run the same command again to finish it" if isinstance(exc, Interrupted) else \
        "run the same command again once the cause is fixed"
    name = out.shown if isinstance(out, Target) else ""
    return type(exc)(f"{exc}; {name} was being written in place and may now hold neither its old content nor "
                     f"snapshot {record.short_id}: {again}")


def _pipelined(pool: ThreadPoolExecutor, runs: Iterator[Run], task: Callable[[Run], RunResult],
               ahead: int = AHEAD) -> Iterator[tuple[Run, RunResult]]:
    """Results in image order, with up to ``ahead`` runs in flight."""
    for run, future in started_ahead(runs, lambda run: pool.submit(task, run), ahead):
        yield run, future.result()


def check_extents(repo: Repository, record: SnapshotRecord) -> None:
    """IntegrityError unless the record's segments give the extents digest it recorded (``hash_of`` "extents")."""
    if ExtentMap(record, repo.segment).extents_digest() != record.image_hash:
        raise IntegrityError(f"the extents of snapshot {record.short_id} do not match its recorded extents hash")


def plan_runs(repo: Repository, record: SnapshotRecord) -> Iterator[Run]:
    """The image as runs of at most READ_BATCH bytes: zeros, or chunks to read together."""
    for offset, segment in ExtentMap(record, repo.segment).walk():
        start = run_bytes = 0
        ids: list[bytes] = []
        lengths: list[int] = []
        for length, id_ in segment.extents():
            if id_ is None:
                if ids:
                    yield Run(start, run_bytes, ids, lengths)
                    ids, lengths = [], []
                for piece in range(0, length, READ_BATCH):
                    yield Run(offset + piece, min(READ_BATCH, length - piece))
            else:
                if not ids:
                    start, run_bytes = offset, 0
                ids.append(id_)
                lengths.append(length)
                run_bytes += length
                if run_bytes >= READ_BATCH:
                    yield Run(start, run_bytes, ids, lengths)
                    ids, lengths = [], []
            offset += length
        if ids:
            yield Run(start, run_bytes, ids, lengths)


def _fetch(repo: Repository, run: Run, ids: list[bytes], lengths: list[int]) -> list[bytes]:
    try:
        data = repo.read_blobs(ids)
    except IntegrityError as exc:
        raise IntegrityError(f"damaged data in {_range(run)}: {exc}") from None
    _check_lengths(run, data, lengths)
    return data


def _range(run: Run) -> str:
    return f"image range {run.offset}-{run.offset + run.length}"


def _check_lengths(run: Run, data: Sequence[Buffer], lengths: list[int]) -> None:
    if any(len(d) != n for d, n in zip(data, lengths, strict=True)):
        raise IntegrityError(f"chunk length does not match its extent in {_range(run)}")


def _write_now(target: Target | NullTarget, writes: list[tuple[int, list[Buffer]]], result: RunResult) -> RunResult:
    """Positional targets are written by the pool thread; standard output is left to the ordered writer."""
    if target.seekable:
        for offset, buffers in writes:
            target.write(offset, buffers)
            result.written += sum(len(b) for b in buffers)
    else:
        result.writes = writes
    return result


def _full_run(repo: Repository, target: Target | NullTarget, run: Run) -> RunResult:
    if run.ids is None:
        if target.sparse:
            return RunResult(None, [])
        return RunResult(None, [], written=target.write_zeros(run.offset, run.length)) if target.seekable else \
            RunResult(None, [(run.offset, [_ZEROS[: run.length]])])
    data: list[Buffer] = list(_fetch(repo, run, run.ids, run.lengths))
    result = _write_now(target, [(run.offset, data)], RunResult(data, []))
    target.start_writeback(run.offset, run.length)
    return result


def _delta_run(repo: Repository, target: Target | NullTarget, run: Run) -> RunResult:
    current = target.read(run.offset, run.length)
    if run.ids is None:
        result = RunResult(None, [], read=len(current))
        if len(current) != run.length:
            result.written = target.write_zeros(run.offset, run.length)
        elif not is_zero(current, 0, run.length):
            # Only the blocks that are not zero: a stray byte in an 8 MiB run of a sparse or thin target must
            # not write (and allocate) the whole run.
            for start, end in _nonzero_blocks(current, run.offset):
                result.written += target.write_zeros(run.offset + start, end - start)
        return result
    view = memoryview(current)
    pieces: list[Buffer] = []
    stale: list[int] = []
    pos = 0
    for i, (id_, n) in enumerate(zip(run.ids, run.lengths, strict=True)):
        piece = view[pos : pos + n]
        if len(piece) == n and repo.chunk_id(piece) == id_:
            pieces.append(piece)
        else:
            pieces.append(b"")
            stale.append(i)
        pos += n
    writes: list[tuple[int, list[Buffer]]] = []
    if stale:
        fetched = _fetch(repo, run, [run.ids[i] for i in stale], [run.lengths[i] for i in stale])
        starts = [0]
        for n in run.lengths[:-1]:
            starts.append(starts[-1] + n)
        for i, data in zip(stale, fetched, strict=True):
            pieces[i] = data
            _add_block_writes(writes, run.offset + starts[i], data, view[starts[i] : starts[i] + len(data)])
    return _write_now(target, writes, RunResult(pieces, [], read=len(current)))


def _blocks(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """``[pos, end)`` of each DELTA_BLOCK-aligned (in the image) block of ``length`` bytes at image ``offset``."""
    pos = 0
    while pos < length:
        end = min(length, (offset + pos) // DELTA_BLOCK * DELTA_BLOCK + DELTA_BLOCK - offset)
        yield pos, end
        pos = end


def _nonzero_blocks(data: bytes, offset: int) -> Iterator[tuple[int, int]]:
    """The ranges of ``data`` (at image ``offset``) covering its blocks that are not all zero, adjacent blocks
    merged."""
    start = -1
    for pos, end in _blocks(offset, len(data)):
        if not is_zero(data, pos, end):
            start = pos if start < 0 else start
        elif start >= 0:
            yield start, pos
            start = -1
    if start >= 0:
        yield start, len(data)


def _add_block_writes(writes: list[tuple[int, list[Buffer]]], offset: int, new: bytes, old: memoryview) -> None:
    """Append writes for the DELTA_BLOCK-aligned blocks of ``new`` that differ from ``old``.

    A chunk is ~20 KiB but a guest rewrites 4 KiB blocks: writing only the blocks that differ keeps a
    delta restore's writes close to what really changed.
    """
    view = memoryview(new)
    write_end = -1
    if writes:
        write_end = writes[-1][0] + sum(len(b) for b in writes[-1][1])
    for pos, end in _blocks(offset, len(new)):
        current = old[pos:end]
        if len(current) != end - pos or not new.startswith(current, pos):  # memcmp, no copy
            if write_end == offset + pos:
                writes[-1][1].append(view[pos:end])  # adjacent to the previous write: one pwritev
            else:
                writes.append((offset + pos, [view[pos:end]]))
            write_end = offset + end
