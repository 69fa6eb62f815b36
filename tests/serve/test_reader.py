"""Random access to snapshots: any range, bit-exact, from several threads; zeros never touch packs."""

from __future__ import annotations

import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from dedupimg.core.errors import IntegrityError
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.serve.reader import SnapshotReader
from tests.helpers import det_bytes, text_bytes, write_sparse

MiB = 1 << 20


@pytest.fixture
def image(tmp_path, repo):
    pieces = [(0, text_bytes(1, 3 * MiB)), (5 * MiB, det_bytes(2, 2 * MiB)), (9 * MiB, text_bytes(3, 777_777))]
    path = tmp_path / "img"
    write_sparse(path, 12 * MiB + 123, pieces)
    rec = take_snapshot(repo, str(path)).record
    return SnapshotReader(repo, rec, cache_bytes=1 * MiB), path.read_bytes()


def test_random_ranges_are_bit_exact(image):
    reader, data = image
    rng = random.Random(5)
    for _ in range(300):
        off = rng.randrange(0, len(data) + 100)
        n = rng.choice([1, 512, 4096, 65536, 131072, rng.randrange(1, 3 * MiB)])
        assert reader.read(off, n) == data[off : off + n]


def test_sequential_scan_with_read_ahead(image):
    reader, data = image
    out = bytearray()
    for off in range(0, len(data), 131072):
        out += reader.read(off, 131072)
    assert out == data


def test_concurrent_readers(image):
    reader, data = image

    def check(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100):
            off = rng.randrange(0, len(data))
            n = rng.randrange(1, 300_000)
            assert reader.read(off, n) == data[off : off + n]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, range(8)))


def test_past_the_end_and_zero_length(image):
    reader, data = image
    assert reader.read(len(data), 10) == b""
    assert reader.read(len(data) - 3, 10) == data[-3:]
    assert reader.read(100, 0) == b""


def test_zero_extents_need_no_packs_and_damage_is_an_error(image, repo):
    reader, data = image
    shutil.rmtree(repo.path / "packs")
    (repo.path / "packs").mkdir()
    assert reader.read(3 * MiB + 10, MiB) == bytes(MiB)  # inside the hole between the data pieces
    runs = reader.is_zero_range(0, len(data))
    assert (3 * MiB, 2 * MiB, True) in runs or any(z and o <= 3 * MiB < o + n for o, n, z in runs)
    fresh = SnapshotReader(repo, reader.record)
    with pytest.raises(IntegrityError):
        fresh.read(5 * MiB, 4096)
