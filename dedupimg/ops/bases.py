"""Bases for delta chunks (docs/format.md §11): which stored chunk a new chunk is compressed against.

A scattered 4 KiB write makes a whole ~20 KiB chunk new; stored as a delta on the chunk that held the same image
bytes in the parent version, it costs about the changed bytes. Snapshots and copies both find bases here: the
parent is the newest snapshot of the same name from the same host (or an incremental's ``--parent``), and a
new chunk's base is the parent's chunk that overlaps most of its image range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dedupimg.core.errors import IntegrityError
from dedupimg.core.extents import ExtentMap
from dedupimg.core.manifest import SnapshotRecord, chunker_dict
from dedupimg.repo.repository import EncodedBlob, Repository


def latest(repo: Repository, name: str, host: str) -> SnapshotRecord | None:
    """The newest snapshot of ``name`` from ``host``: the parent of the next version, for deltas."""
    records = [r for r in repo.snapshots(name) if r.host == host]
    return max(records, key=lambda r: r.datetime) if records else None


class BaseFinder:
    """For a new chunk, the chunk that held the most of its bytes at the same offsets in the parent version
    (or, when that one is stored as a delta, its base: deltas stay one deep)."""

    def __init__(self, repo: Repository, parent: SnapshotRecord) -> None:
        self._map = ExtentMap(parent, repo.segment)
        self._size = parent.size
        self._index_bases = repo.delta_bases

    def __call__(self, spans: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """The base for each ``(image offset, length)``, or None."""
        found: list[bytes | None] = []
        for offset, length in spans:
            best, most = None, 0
            if offset < self._size:
                for ext in self._map.extents(offset, min(length, self._size - offset)):
                    overlap = min(ext.offset + ext.length, offset + length) - max(ext.offset, offset)
                    if ext.id is not None and overlap > most:
                        best, most = ext.id, overlap
            found.append(best)
        known = [b for b in found if b is not None]
        deeper = dict(zip(known, self._index_bases(known), strict=True))
        return [None if b is None else deeper[b] or b for b in found]


def base_finder(repo: Repository, parent: SnapshotRecord | None) -> BaseFinder | None:
    """A finder against ``parent``, or None where ``repo`` writes no deltas or cuts chunks otherwise."""
    if parent is None or not repo.writes_deltas or parent.chunker != chunker_dict(repo.config.chunker):
        return None
    return BaseFinder(repo, parent)


Encode = Callable[[bytes, "bytes | bytearray | memoryview", "tuple[bytes, bytes] | None"], EncodedBlob]


def encode_chunks(encode: Encode, read_blobs: Callable[[list[bytes]], list[bytes]],
                  chunks: Sequence[tuple[bytes, bytes | bytearray | memoryview]],
                  bases: Sequence[bytes | None]) -> list[EncodedBlob]:
    """Each chunk encoded (``BlobWriter.encode_chunk``) against its base where it has one; the bases are read
    with ``read_blobs`` first. A base that cannot be read leaves its chunks whole (check reports the damage)."""
    wanted = list(dict.fromkeys(b for b in bases if b is not None))
    try:
        raws = dict(zip(wanted, read_blobs(wanted), strict=True)) if wanted else {}
    except IntegrityError:
        raws = {}
    return [encode(id_, raw, None if b is None or b not in raws else (b, raws[b]))
            for (id_, raw), b in zip(chunks, bases, strict=True)]
