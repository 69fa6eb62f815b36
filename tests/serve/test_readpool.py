"""Reads through the pool of worker processes (what mount and serve use): bit-exact, damage is an error,
a dead worker costs no read, and a cache too small for the readers still works."""

from __future__ import annotations

import os
import random
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from dedupimg.core.errors import IntegrityError
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.serve.reader import SnapshotReader
from tests.helpers import det_bytes, text_bytes, write_sparse

pytestmark = pytest.mark.slow  # each test starts worker processes on two 12 MiB images

MiB = 1 << 20


@pytest.fixture
def pooled(tmp_path, repo):
    images = []
    for seed in (1, 2):
        path = tmp_path / f"img{seed}"
        pieces = [(0, text_bytes(seed, 3 * MiB)), (5 * MiB, det_bytes(seed + 10, 3 * MiB)),
                  (9 * MiB, text_bytes(seed + 20, 777_777))]
        write_sparse(path, 12 * MiB + 123, pieces)
        images.append((take_snapshot(repo, str(path)).record, path.read_bytes()))
    repo.start_read_pool(2, cache_bytes=4 * MiB)  # 4 slots: readers keep refilling each other's
    assert repo.parallel_reads
    return repo, images


def sequential(reader: SnapshotReader, size: int, step: int) -> bytes:
    out = bytearray()
    buf = bytearray(step)
    offset = 0
    while n := reader.read_into(offset, buf):
        out += buf[:n]
        offset += n
    assert offset == size
    return bytes(out)


def test_sequential_and_random_reads_are_bit_exact(pooled):
    repo, images = pooled
    rec, data = images[0]
    assert sequential(SnapshotReader(repo, rec), len(data), MiB) == data
    assert sequential(SnapshotReader(repo, rec), len(data), 256 << 10) == data
    reader = SnapshotReader(repo, rec)
    rng = random.Random(3)
    for _ in range(200):
        off = rng.randrange(0, len(data) + 100)
        n = rng.choice([1, 4096, 65536, rng.randrange(1, 3 * MiB)])
        assert reader.read(off, n) == data[off : off + n]


def test_many_readers_share_a_small_cache(pooled):
    repo, images = pooled
    readers = [SnapshotReader(repo, rec) for rec, _ in images]

    def scan(i: int) -> None:
        which = i % 2
        data = images[which][1]
        if i < 4:  # sequential streams: each keeps an 8 MiB read-ahead window in a 4 MiB cache
            assert sequential(readers[which], len(data), 300_000) == data
        rng = random.Random(i)
        for _ in range(40):
            off = rng.randrange(0, len(data))
            n = rng.randrange(1, 2 * MiB)
            assert readers[which].read(off, n) == data[off : off + n]

    with ThreadPoolExecutor(6) as threads:
        list(threads.map(scan, range(12)))


def test_damage_is_an_integrity_error_and_other_data_still_reads(pooled):
    repo, images = pooled
    rec, data = images[0]
    for pack_file in (repo.path / "packs").rglob("*.pack"):
        raw = bytearray(pack_file.read_bytes())
        for at in range(200, len(raw) - 200, 4096):
            raw[at] ^= 0xFF
        pack_file.write_bytes(bytes(raw))
    reader = SnapshotReader(repo, rec)
    with pytest.raises(IntegrityError):
        reader.read(0, MiB)
    assert reader.read(3 * MiB + 5, MiB) == bytes(MiB)  # a hole: no pack needed
    with pytest.raises(IntegrityError):
        reader.read(0, MiB)  # still an error, never wrong bytes


def test_dead_workers_fail_no_read(pooled):
    """A worker killed with reads in flight: those reads are done again in this process (the data is fine)."""
    repo, images = pooled
    rec, data = images[0]
    reader = SnapshotReader(repo, rec)
    assert reader.read(0, MiB) == data[:MiB]
    workers = repo._pool._workers  # type: ignore[union-attr]
    os.kill(workers[0].proc.pid, signal.SIGKILL)
    workers[0].proc.wait()
    for off in range(0, len(data), MiB):  # the other worker takes over
        assert reader.read(off, MiB) == data[off : off + MiB]
    os.kill(workers[1].proc.pid, signal.SIGKILL)
    workers[1].proc.wait()
    assert sequential(SnapshotReader(repo, rec), len(data), MiB) == data  # no worker left: read here
    fresh = SnapshotReader(repo, images[1][0])
    assert sequential(fresh, len(images[1][1]), MiB) == images[1][1]


def test_workers_end_with_the_repository(pooled):
    repo, _ = pooled
    procs = [w.proc for w in repo._pool._workers]  # type: ignore[union-attr]
    assert all(p.poll() is None for p in procs)
    repo.close()
    assert all(p.poll() is not None for p in procs)
