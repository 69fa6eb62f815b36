"""repo.chunksource: the chunks of a read, pinned; what a read-ahead still needs; a refilled slot is fetched again."""

from __future__ import annotations

import pytest

from dedupimg.core.errors import IntegrityError
from dedupimg.core.extents import ExtentMap
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.chunksource import ChunkSource
from tests.helpers import det_bytes

MiB = 1 << 20


@pytest.fixture
def chunks(tmp_path, repo):
    """Every chunk of a 2 MiB image: id -> bytes, in image order."""
    return image_chunks(tmp_path, repo, 2 * MiB)


def image_chunks(tmp_path, repo, size):
    path = tmp_path / "img"
    data = det_bytes(7, size)
    path.write_bytes(data)
    rec = take_snapshot(repo, str(path)).record
    out: dict[bytes, bytes] = {}
    for ext in ExtentMap(rec, repo.segment).extents(0, rec.size):
        assert ext.id is not None
        out.setdefault(ext.id, data[ext.offset : ext.offset + ext.length])
    return repo, out


def test_without_a_pool_chunks_are_read_here_and_cached(chunks):
    repo, want = chunks
    ids = list(want)
    source = ChunkSource(repo, cache_bytes=64 * MiB)
    assert not source.parallel
    assert source.wanted(ids[:10] + [None] + ids[:3]) == ids[:10]  # once each, zeros skipped
    pinned = source.pin(ids[:10], ids[10:20])  # the read-ahead is fetched too
    assert {i: bytes(c) for i, c in pinned.chunks.items()} == {i: want[i] for i in ids[:10]}
    source.unpin(pinned)
    assert source.wanted(ids[:30]) == ids[20:30]


def test_with_a_pool_a_slot_refilled_by_another_source_is_fetched_again(tmp_path, repo):
    repo, want = image_chunks(tmp_path, repo, 10 * MiB)
    repo.start_read_pool(2, cache_bytes=4 * MiB)  # 16 slots (the least) of 1 MiB: each source needs 11, so they
    # take turns
    ids = list(want)
    first, second = ChunkSource(repo), ChunkSource(repo)
    assert first.parallel
    fetched: list[int] = []
    fetch = repo.fetch_blobs
    repo.fetch_blobs = lambda ids: fetched.append(len(ids)) or fetch(ids)
    for _ in range(3):
        for source in (first, second):
            assert source.wanted(ids) in ([], ids)  # it believes it holds all of them, or none
            pinned = source.pin(ids, [])
            assert {i: bytes(c) for i, c in pinned.chunks.items()} == want
            source.unpin(pinned)
    assert len(fetched) >= 6  # each pin found slots refilled by the other source, and fetched again


def test_a_chunk_the_index_does_not_have_is_an_integrity_error(chunks):
    repo, _ = chunks
    with pytest.raises(IntegrityError, match="not in the index"):
        ChunkSource(repo).pin([bytes(32)], [])
