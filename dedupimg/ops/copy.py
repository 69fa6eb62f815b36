"""Copying snapshots from one repository into another (``restic copy``): only the chunks the destination lacks
travel.

A snapshot record is content-addressed, so a copied snapshot keeps its id, and one the destination already
lists is skipped. Each snapshot is copied with its own :class:`BlobWriter`: its segments are walked in order,
the destination is asked which of their chunks it lacks, those are read from the source (verified against
their ids) a few MiB at a time and stored, then the segments (whose ids must come out the same) and last the
very same record, committed with the pack that holds it. Chunks are blobs named by their content, so the two
repositories may use different chunker parameters: the copy is whole either way, it only shares fewer chunks
with the destination's own snapshots (``init --copy-chunker-params-from`` avoids that). They must name chunks
alike, though: an encrypted repository names them with a keyed hash (docs/security.md), so a copy between two
repositories whose keys differ is refused, and ``init --copy-chunker-params-from`` gives the new repository
the source's id key and chunker seed (its encryption key stays its own).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dedupimg.core import interrupts
from dedupimg.core.config import Config
from dedupimg.core.crypto import MasterKeys
from dedupimg.core.errors import IntegrityError, UsageError
from dedupimg.core.manifest import Segment, SnapshotRecord
from dedupimg.core.password import SOURCE_REPOSITORY
from dedupimg.core.progress import NoProgress, Progress
from dedupimg.ops.bases import BaseFinder, base_finder, encode_chunks, latest
from dedupimg.repo.repository import BlobWriter, Repository
from dedupimg.store.lock import LockMode

BATCH_BYTES = 8 << 20  # raw bytes of chunks read from the source before they are stored in the destination
BATCH_SEGMENTS = 64  # segments waiting for their chunks' batch, at most

ALREADY_THERE = "already in the destination"
FORGOTTEN_THERE = "forgotten in the destination"


@dataclass(frozen=True)
class SnapshotCopy:
    """What became of one snapshot: copied, or skipped (``skipped`` says why)."""

    record: SnapshotRecord
    skipped: str = ""
    chunks: int = 0  # chunks the destination lacked and now has
    bytes_copied: int = 0  # their raw bytes
    bytes_uploaded: int = 0  # bytes of the packs written to the destination

    @property
    def copied(self) -> bool:
        return not self.skipped


@dataclass(frozen=True)
class CopyResult:
    snapshots: list[SnapshotCopy]  # in the order they were handled

    @property
    def copied(self) -> list[bytes]:
        return [s.record.id for s in self.snapshots if s.copied]

    @property
    def skipped(self) -> list[bytes]:
        return [s.record.id for s in self.snapshots if not s.copied]

    @property
    def chunks(self) -> int:
        return sum(s.chunks for s in self.snapshots)

    @property
    def bytes_copied(self) -> int:
        return sum(s.bytes_copied for s in self.snapshots)

    @property
    def bytes_uploaded(self) -> int:
        return sum(s.bytes_uploaded for s in self.snapshots)


def copy_snapshots(src: Repository, dst: Repository, refs: list[str] | None,
                   progress: Progress | None = None) -> CopyResult:
    """Copy the snapshots ``refs`` names in ``src`` (ids, prefixes, ``latest``, ``NAME@latest``; None or empty:
    every snapshot of ``src``) into ``dst``. The caller holds a SHARED lock on both.

    Every reference is resolved before anything is copied. Snapshots copied before an error or interrupt stay
    copied (each is committed whole); a re-run skips them.
    """
    _refuse_same(src.location, src.config.repo_id, dst)
    probe = b"dedupimg: do both repositories name chunks alike?"
    if src.chunk_id(probe) != dst.chunk_id(probe):
        raise UsageError(f"{src.location} and {dst.location} name chunks differently (different id keys, or one "
                         "is encrypted and the other not): copy needs a destination made with 'dedupimg init "
                         "--copy-chunker-params-from SOURCE'")
    progress = progress or NoProgress()
    records = src.snapshots() if not refs else list({r.id: r for r in map(src.resolve, refs)}.values())
    _refuse_merged_series(src, dst, records)
    present = {r.id for r in dst.snapshots()}
    out: list[SnapshotCopy] = []
    for record in records:
        if record.id in present:
            out.append(SnapshotCopy(record, ALREADY_THERE))
            continue
        # A snapshot committed before marked the process past its commit (a signal would be ignored): the next
        # one is new work that an interrupt may still stop.
        interrupts.reset()
        out.append(_copy_one(src, dst, record, progress))
    return CopyResult(out)


def _refuse_merged_series(src: Repository, dst: Repository, records: list[SnapshotRecord]) -> None:
    """UsageError, before anything is copied, when a snapshot's name already belongs to another host's
    snapshots in the destination (and did not in the source): forget keeps each name's versions as one series,
    so two machines' disks under one name would lose one machine's snapshots to the other's newer ones (what
    ``snapshot`` refuses for a default name; found by review for copy). Names that two hosts share in the
    source already are copied as they are."""
    in_source = {(r.name, r.host) for r in src.snapshots()}
    for rec in records:
        for other in dst.snapshots(rec.name):
            if other.host != rec.host and (rec.name, other.host) not in in_source:
                raise UsageError(
                    f"snapshot {rec.name}@{rec.short_id} is of {rec.source} on host {rec.host}, but in "
                    f"{dst.location} the name {rec.name!r} already belongs to snapshots of {other.source} on host "
                    f"{other.host}: copied there, forget would treat two machines as one series; copy into "
                    "another repository, or snapshot each machine under a name of its own (--name)")


def open_source(location: str, dst: Repository, lock_wait: float = 0.0, purpose: str = "copy") -> Repository:
    """The repository to copy into ``dst`` from, opened with a SHARED lock. ``dst`` itself is refused before it
    is opened (its config read first): one process cannot open a repository's index twice."""
    _refuse_same(location, _repository_id(location), dst)
    return Repository.open(location, LockMode.SHARED, lock_wait, purpose, password=SOURCE_REPOSITORY)


def _refuse_same(location: str, repo_id: str, dst: Repository) -> None:
    if repo_id == dst.config.repo_id:
        raise UsageError(f"{location} and {dst.location} are the same repository (id {repo_id[:8]}); "
                         "nothing to copy")


def repository_config(location: str) -> tuple[Config, MasterKeys | None]:
    """The config of the repository at ``location`` (a directory or ``s3:...``), and its master keys if it is
    encrypted (its password from $DEDUPIMG_FROM_PASSWORD...), read without a lock and without opening its index
    or cache: ``init --copy-chunker-params-from`` needs its chunker parameters and chunk id key."""
    config, unlocked, store = Repository.read_config_and_keys(location, SOURCE_REPOSITORY)
    store.close()
    return config, None if unlocked is None else unlocked.master


def _repository_id(location: str) -> str:
    """The id of the repository at ``location``, from its config file alone (no password asked)."""
    config, store, _where = Repository.config_file(location)
    store.close()
    return config.repo_id


def _copy_one(src: Repository, dst: Repository, record: SnapshotRecord, progress: Progress) -> SnapshotCopy:
    _check_record(record)
    writer = dst.writer()
    if dst.forgotten(record.id) or not writer.missing([record.id])[0]:
        # A forget in the destination removed this very record (its tombstone keeps it removed, also once a
        # prune there dropped its row), or the destination stores it unlisted: copying it again would list a
        # record that a repair or another host's sync takes out again, and a prune then frees its data.
        writer.abort()
        return SnapshotCopy(record, FORGOTTEN_THERE)
    try:
        progress.start(f"copy {record.name}@{record.short_id}", record.size)
        # The destination's newest snapshot of the same series is the parent: the chunks this version changed
        # are stored there as deltas on its chunks, as the snapshot made them in the source (docs/format.md §11).
        bases = base_finder(dst, latest(dst, record.name, record.host))
        _Transfer(src, dst, writer, progress, bases).run(record)
        writer.commit_snapshot(record)
        progress.finish()
    except BaseException:
        writer.abort()
        raise
    return SnapshotCopy(record, "", writer.new_chunks, writer.new_chunk_bytes, writer.stored_bytes)


def _check_record(record: SnapshotRecord) -> None:
    """The record must encode to the bytes of its id, or the copy would be another snapshot."""
    again = dataclasses.replace(record)
    again.encode()
    if again.id != record.id:
        raise IntegrityError(f"snapshot record {record.short_id} does not encode back to its id; not copied")


class _Transfer:
    """Chunks the destination lacks, in batches of about BATCH_BYTES, then the segments that need them."""

    def __init__(self, src: Repository, dst: Repository, writer: BlobWriter, progress: Progress,
                 bases: BaseFinder | None = None) -> None:
        self._src = src
        self._dst = dst
        self._writer = writer
        self._progress = progress
        self._bases = bases
        self._chunks: dict[bytes, tuple[int, int]] = {}  # id -> (raw length, image offset): to read from the source
        self._chunk_bytes = 0
        self._segments: list[tuple[bytes, Segment]] = []  # waiting for the chunks above to be stored

    def run(self, record: SnapshotRecord) -> None:
        seen: set[bytes] = set()
        offset = 0
        for seg_id, length in record.segments:
            if seg_id not in seen:
                seen.add(seg_id)
                self._segment(seg_id, offset)
            offset += length
            self._progress.advance(length)
        self._flush()

    def _segment(self, seg_id: bytes, offset: int) -> None:
        segment = self._src.segment(seg_id)
        extents: dict[bytes, tuple[int, int]] = {}
        for n, i in segment.extents():
            if i is not None and i not in self._chunks and i not in extents:
                extents[i] = (n, offset)
            offset += n
        ids = list(extents)
        for id_, lacking in zip(ids, self._writer.missing(ids), strict=True):
            if lacking:
                self._chunks[id_] = extents[id_]
                self._chunk_bytes += extents[id_][0]
                if self._chunk_bytes >= BATCH_BYTES:
                    self._store_chunks()
        self._segments.append((seg_id, segment))
        if len(self._segments) >= BATCH_SEGMENTS or not self._chunks:
            self._flush()

    def _store_chunks(self) -> None:
        ids = list(self._chunks)
        raws = self._src.read_blobs(ids)
        if self._bases is None:
            for id_, raw in zip(ids, raws, strict=True):
                self._writer.add_chunk(id_, raw)
        else:
            bases = self._bases([(at, n) for n, at in self._chunks.values()])
            chunks = list(zip(ids, raws, strict=True))
            for blob in encode_chunks(self._writer.encode_chunk, self._dst.read_blobs, chunks, bases):
                self._writer.add_encoded_chunk(blob)
        self._chunks.clear()
        self._chunk_bytes = 0

    def _flush(self) -> None:
        """Store the waiting chunks, then the segments that name them: a segment never goes into the destination
        before its chunks."""
        self._store_chunks()
        for seg_id, segment in self._segments:
            if self._writer.add_segment(segment) != seg_id:
                raise IntegrityError(f"manifest segment {seg_id.hex()[:16]} does not encode back to its id; "
                                     "not copied")
        self._segments.clear()
