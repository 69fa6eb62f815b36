"""Taking a snapshot: source regions -> chunks -> ids -> new chunks stored -> segments -> record."""

from __future__ import annotations

import socket
import time as _time
from dataclasses import dataclass
from datetime import datetime

import blake3

from dedupimg.chunker import Batch, Chunker
from dedupimg.manifest import SegmentBuilder, SnapshotRecord, chunker_dict
from dedupimg.progress import NoProgress, Progress
from dedupimg.repository import BlobWriter, Repository
from dedupimg.source import Source
from dedupimg.zeros import hash_zeros, is_zero


@dataclass(frozen=True)
class SnapshotResult:
    record: SnapshotRecord
    bytes_read: int
    bytes_new: int  # raw bytes of chunks not in the repository before
    bytes_stored: int  # bytes of new pack files
    chunks_new: int
    seconds: float


def take_snapshot(
    repo: Repository,
    source: str,
    name: str | None = None,
    tags: list[str] | None = None,
    when: datetime | None = None,
    progress: Progress | None = None,
) -> SnapshotResult:
    progress = progress or NoProgress()
    started = _time.monotonic()
    when = when or datetime.now()
    if when.tzinfo is None:  # a naive time is local time, as restic's --time reads it
        when = when.astimezone()
    src = Source.open(source, name)
    writer = repo.writer()
    try:
        progress.start(f"snapshot {src.name}", src.size)
        hasher = blake3.blake3()
        segments: list[tuple[bytes, int]] = []
        builder = SegmentBuilder(repo.config.segments, lambda s: segments.append((writer.add_segment(s), s.size)))
        chunker = Chunker(repo.config.chunker)
        bytes_read = 0
        for region in src.regions():
            if not region.is_data:
                assert region.length is not None
                builder.add_zero(region.length)
                hash_zeros(hasher, region.length)
                progress.advance(region.length)
                continue
            reader = src.reader(region)
            for batch in chunker.batches(reader):
                _store_batch(batch, writer, builder, hasher)
                progress.advance(batch.cuts[-1][1] if batch.cuts else 0)
            bytes_read += reader.bytes_read
        builder.flush()
        size = sum(n for _, n in segments)
        record = SnapshotRecord(
            name=src.name,
            time=when.isoformat(),
            size=size,
            image_hash=hasher.digest(),
            segments=segments,
            source=src.description,
            host=socket.gethostname(),
            tags=sorted(set(tags or [])),
            chunker=chunker_dict(repo.config.chunker),
            stats={"bytes_read": bytes_read, "bytes_new": writer.new_chunk_bytes, "chunks_new": writer.new_chunks},
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
    )


def _store_batch(batch: Batch, writer: BlobWriter, builder: SegmentBuilder, hasher: blake3.blake3) -> None:
    buf = batch.buf
    view = memoryview(buf)
    if not batch.cuts:
        return
    hasher.update(view[: batch.cuts[-1][1]])
    ids: list[bytes | None] = [
        None if is_zero(buf, s, e) else blake3.blake3(view[s:e]).digest() for s, e in batch.cuts
    ]
    data_ids = [i for i in ids if i is not None]
    missing = dict(zip(data_ids, writer.missing(data_ids), strict=True))
    for (s, e), id_ in zip(batch.cuts, ids, strict=True):
        if id_ is None:
            builder.add_zero(e - s)
            continue
        if missing[id_]:
            writer.add_chunk(id_, view[s:e])
            missing[id_] = False
        builder.add_chunk(e - s, id_)
