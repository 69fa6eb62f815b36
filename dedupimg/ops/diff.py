"""Diff: which byte ranges differ between two snapshots, from their manifests alone (no chunk is read).

Two places hold the same bytes when both snapshots have a zero run there, or the same chunk starting at the
same offset (a segment both list at the same offset is skipped whole, undecoded). Anything else counts as
changed: a chunk that moved counts at both places, which is what a block-level copy would rewrite. Ranges are
merged and given in offsets of the image; a size change counts the bytes past the shorter image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dedupimg.core.manifest import Segment, SnapshotRecord
from dedupimg.repo.repository import Repository

# What covers a piece of an image: a chunk id, None (zeros), or ("segment", id) for a segment both share.
_Key = bytes | None | tuple[str, bytes]


@dataclass(frozen=True)
class DiffReport:
    a: SnapshotRecord
    b: SnapshotRecord
    ranges: list[tuple[int, int]]  # (offset, length), merged, ascending
    bytes_changed: int
    new_chunks: int  # distinct chunks b needs that a does not
    new_data: int  # their raw bytes
    new_stored: int  # the bytes they take in packs


def diff_snapshots(repo: Repository, a: SnapshotRecord, b: SnapshotRecord) -> DiffReport:
    """What changed from ``a`` to ``b``."""
    segments: dict[bytes, Segment] = {}

    def segment(sid: bytes) -> Segment:
        seg = segments.get(sid)
        if seg is None:
            seg = segments[sid] = repo.segment(sid)
        return seg

    shared = _placed(a) & _placed(b)
    ranges: list[tuple[int, int]] = []

    def changed(start: int, end: int) -> None:
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
        else:
            ranges.append((start, end - start))

    ia, ib = _pieces(a, shared, segment), _pieces(b, shared, segment)
    pa, pb = next(ia, None), next(ib, None)
    pos = 0
    while pa is not None and pb is not None:
        end = min(pa[1], pb[1])
        same = pa[2] == pb[2] and (pa[2] is None or pa[0] == pb[0])
        if not same:
            changed(pos, end)
        pos = end
        if pa[1] == end:
            pa = next(ia, None)
        if pb[1] == end:
            pb = next(ib, None)
    longer = max(a.size, b.size)
    if pos < longer:
        changed(pos, longer)

    chunks_a = {c for sid, _ in a.segments for c in segment(sid).chunk_ids()}
    new = list({c for sid, _ in b.segments for c in segment(sid).chunk_ids() if c not in chunks_a})
    usage = [u for u in repo.blob_usage(new) if u is not None]
    return DiffReport(a, b, ranges, sum(n for _, n in ranges), len(new), sum(u.raw_len for u in usage),
                      sum(u.stored_len for u in usage))


def diff_refs(repo: Repository, a: str, b: str) -> DiffReport:
    """``dedupimg diff A B``: the snapshots the references name (ids, prefixes, NAME@latest), compared."""
    return diff_snapshots(repo, repo.resolve(a), repo.resolve(b))


def _placed(rec: SnapshotRecord) -> set[tuple[bytes, int]]:
    out, pos = set(), 0
    for sid, n in rec.segments:
        out.add((sid, pos))
        pos += n
    return out


def _pieces(rec: SnapshotRecord, shared: set[tuple[bytes, int]],
            segment: Callable[[bytes], Segment]) -> Iterator[tuple[int, int, _Key]]:
    """(start, end, key) of each extent of ``rec`` in order, a shared segment as one piece."""
    pos = 0
    for sid, n in rec.segments:
        if (sid, pos) in shared:
            yield pos, pos + n, ("segment", sid)
            pos += n
            continue
        for length, cid in segment(sid).extents():
            yield pos, pos + length, cid
            pos += length
