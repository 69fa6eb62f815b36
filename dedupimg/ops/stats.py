"""Stats: what each snapshot costs and what the repository holds, from manifests and reference counts alone
(no chunk is read).

For a snapshot: its logical size; the bytes of it that are data (allocated) and those that are holes or zero
runs (never stored); of the data, the image bytes whose chunks other snapshots also need (shared) and those
only it needs (unique); and what forgetting it alone would free in the packs once a prune has collected it
(its unique chunks, the segments only it lists and its record, as stored). For the selection as a whole, the
same totals and the ratios, with zeros counted apart from deduplication: a sparse image's holes are not
"deduplicated" data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from dedupimg.core.errors import IntegrityError
from dedupimg.core.manifest import Segment, SnapshotRecord
from dedupimg.core.retention import SnapshotFilter
from dedupimg.ops.selection import select_snapshots
from dedupimg.repo.repository import BlobUsage, Repository


@dataclass(frozen=True)
class SnapshotCost:
    record: SnapshotRecord
    size: int  # logical bytes
    allocated: int  # bytes held in chunks (not holes or zero runs)
    zeros: int  # bytes of holes and zero runs: stored as lengths only
    shared: int  # image bytes whose chunks other snapshots need too
    unique: int  # image bytes whose chunks only this snapshot needs
    unique_chunks: int  # distinct chunks only this snapshot needs
    unique_data: int  # their raw bytes
    freed: int  # pack bytes forgetting it alone frees after a prune: its unique chunks, segments and record


@dataclass(frozen=True)
class Totals:
    snapshots: int
    size: int
    allocated: int
    zeros: int
    chunks: int  # distinct chunks the selection needs
    data: int  # their raw bytes
    stored: int  # the bytes they take in packs (compressed, with headers)
    freed: int  # pack bytes forgetting the whole selection frees after a prune

    @property
    def dedup_ratio(self) -> float:
        """Allocated bytes per distinct raw byte: deduplication only (zeros are not counted)."""
        return self.allocated / self.data if self.data else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.data / self.stored if self.stored else 0.0


@dataclass(frozen=True)
class RepositorySize:
    snapshots: int  # every snapshot, selected or not
    pack_bytes: int
    packs: int


@dataclass(frozen=True)
class StatsReport:
    snapshots: list[SnapshotCost]  # oldest first
    totals: Totals
    repository: RepositorySize


class _Manifests:
    """Decoded segments and index usage of blobs, each looked up once."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.segments: dict[bytes, Segment] = {}
        self.usage: dict[bytes, BlobUsage] = {}
        self._dead_links: Counter[bytes] | None = None

    @property
    def dead_links(self) -> Counter[bytes]:
        """References that dead delta chunks hold on their bases: the next prune takes them whatever is
        forgotten, so a base they alone keep besides the forgotten snapshots dies with those."""
        if self._dead_links is None:
            self._dead_links = self.repo.dead_delta_links()
        return self._dead_links

    def segment(self, seg_id: bytes) -> Segment:
        seg = self.segments.get(seg_id)
        if seg is None:
            seg = self.segments[seg_id] = self.repo.segment(seg_id)
        return seg

    def load_usage(self, ids: Iterable[bytes]) -> None:
        todo = list({i for i in ids if i not in self.usage})
        for i, u in zip(todo, self.repo.blob_usage(todo), strict=True):
            if u is None:
                raise IntegrityError(f"blob {i.hex()[:16]} is not in the index; run 'dedupimg check'")
            self.usage[i] = u


def _dying(m: _Manifests, records: list[SnapshotRecord]) -> tuple[set[bytes], set[bytes]]:
    """The segments and chunks whose reference counts reach 0 when ``records`` are forgotten (as
    Repository.forget, then prune's cascade, count them: a dying delta chunk also takes its reference from its
    base, docs/format.md §11, and so does a delta that is dead already)."""
    listings = Counter(sid for r in records for sid, _ in r.segments)
    m.load_usage(listings)
    segments = {sid for sid, n in listings.items() if m.usage[sid].refcount <= n}
    lost: Counter[bytes] = Counter()
    for sid in segments:
        lost.update(m.segment(sid).chunk_ids())
    m.load_usage(lost)
    pending = m.dead_links
    chunks = {c for c, n in lost.items() if m.usage[c].refcount <= n + pending[c]}
    dying = list(chunks)
    by_base = Counter(b for b in m.repo.delta_bases(dying) if b is not None and b not in chunks)
    m.load_usage(by_base)
    chunks |= {b for b, n in by_base.items() if m.usage[b].refcount <= n + lost[b] + pending[b]}
    return segments, chunks


def _freed(m: _Manifests, records: list[SnapshotRecord], segments: set[bytes], chunks: set[bytes]) -> int:
    m.load_usage(r.id for r in records)
    return sum(m.usage[i].stored_len for group in (segments, chunks, {r.id for r in records}) for i in group)


def _cost(m: _Manifests, rec: SnapshotRecord) -> SnapshotCost:
    segments, chunks = _dying(m, [rec])
    allocated = unique = 0
    for sid, _ in rec.segments:
        for length, cid in m.segment(sid).extents():
            if cid is not None:
                allocated += length
                if cid in chunks:
                    unique += length
    return SnapshotCost(
        record=rec, size=rec.size, allocated=allocated, zeros=rec.size - allocated, shared=allocated - unique,
        unique=unique, unique_chunks=len(chunks), unique_data=sum(m.usage[c].raw_len for c in chunks),
        freed=_freed(m, [rec], segments, chunks),
    )


def snapshot_stats(repo: Repository, records: list[SnapshotRecord], each: bool = True) -> StatsReport:
    """The cost of each of ``records`` (none with ``each`` False: ``info``) and their totals (the caller
    selects them: ops/selection.py)."""
    m = _Manifests(repo)
    costs = [_cost(m, r) for r in records] if each else []
    allocated = 0
    distinct: set[bytes] = set()
    for r in records:
        for sid, _ in r.segments:
            seg = m.segment(sid)
            distinct.update(seg.chunk_ids())
            allocated += sum(n for n, cid in seg.extents() if cid is not None)
    m.load_usage(distinct)
    segments, chunks = _dying(m, records)
    size = sum(r.size for r in records)
    totals = Totals(
        snapshots=len(records), size=size, allocated=allocated, zeros=size - allocated, chunks=len(distinct),
        data=sum(m.usage[c].raw_len for c in distinct), stored=sum(m.usage[c].stored_len for c in distinct),
        freed=_freed(m, records, segments, chunks),
    )
    whole = repo.stats()
    return StatsReport(costs, totals, RepositorySize(whole.snapshots, whole.pack_bytes, whole.packs))


def stats(repo: Repository, refs: list[str] | None = None, where: SnapshotFilter | None = None) -> StatsReport:
    """``dedupimg stats``: the snapshots ``refs`` name (default: all) that ``where`` selects."""
    return snapshot_stats(repo, select_snapshots(repo, refs, where))


def repository_totals(repo: Repository) -> StatsReport:
    """``dedupimg info``: the totals of every snapshot (no per-snapshot costs)."""
    return snapshot_stats(repo, repo.snapshots(), each=False)
