"""Sparse input: holes are never read and come back as holes."""

from __future__ import annotations

import pytest

from dedupimg.ops.restore import restore
from dedupimg.ops.snapshot import take_snapshot
from tests.helpers import blocks_allocated, det_bytes, write_sparse

GiB = 1 << 30
MiB = 1 << 20


@pytest.mark.slow
def test_4gib_sparse_file_with_8mib_of_data(tmp_path, repo):
    src = tmp_path / "sparse.img"
    pieces = [(i * 512 * MiB + 12345 * 4096, det_bytes(i, MiB)) for i in range(8)]
    write_sparse(src, 4 * GiB, pieces)
    assert blocks_allocated(src) < 16 * MiB, "the test filesystem does not keep holes"
    result = take_snapshot(repo, str(src))
    assert result.record.size == 4 * GiB
    assert result.bytes_read <= 8 * MiB + 8 * 4096  # holes never read (block rounding only)
    out = tmp_path / "out.img"
    restore(repo, result.record.hex_id, str(out))
    assert out.stat().st_size == 4 * GiB
    assert blocks_allocated(out) < 16 * MiB  # restored sparse
    with open(out, "rb") as f:
        for off, data in pieces:
            f.seek(off)
            assert f.read(len(data)) == data
        f.seek(3 * GiB)
        assert f.read(MiB) == bytes(MiB)


def test_zero_runs_inside_data_are_not_stored(tmp_path, repo):
    src = tmp_path / "zeros.img"
    src.write_bytes(det_bytes(1, MiB) + bytes(16 * MiB) + det_bytes(2, MiB))  # zeros written, not holes
    result = take_snapshot(repo, str(src))
    assert result.bytes_new < 3 * MiB
    out = tmp_path / "out.img"
    restore(repo, "latest", str(out))
    assert out.read_bytes() == src.read_bytes()
