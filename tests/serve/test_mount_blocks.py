"""The mount's st_blocks and SEEK_DATA / SEEK_HOLE, through its FUSE operations in process (tests/integration/
test_mount.py checks them through a real mount): a large snapshot's st_blocks is counted on a thread."""

from __future__ import annotations

import errno
import os

import pytest

from dedupimg.ops.snapshot import take_snapshot
from dedupimg.serve import mount
from tests.helpers import det_bytes, wait_for, write_sparse

MiB = 1 << 20


@pytest.fixture
def sparse(tmp_path, repo):
    """A snapshot of 12 MiB with 2 MiB of data at 4 MiB; (fs, path of its file, record)."""
    path = tmp_path / "img"
    write_sparse(path, 12 * MiB, [(4 * MiB, det_bytes(3, 2 * MiB))])
    rec = take_snapshot(repo, str(path), name="img").record
    return mount.SnapshotFS(repo), f"/{mount.BY_ID}/{rec.hex_id}.img", rec


def test_st_blocks_counts_data_only(sparse):
    fs, path, rec = sparse
    assert fs.getattr(path)["st_blocks"] * 512 == 2 * MiB  # was 12 MiB
    assert fs.getattr(f"/img/{mount.LATEST}")["st_blocks"] <= 1  # a symlink: its own length


def test_large_snapshot_is_counted_on_a_thread_and_stat_does_not_wait(sparse, monkeypatch):
    fs, path, rec = sparse
    monkeypatch.setattr(mount, "SYNC_BYTES", 0)  # every snapshot counts as large
    first = fs.getattr(path)["st_blocks"]
    assert first * 512 in (2 * MiB, 12 * MiB)  # the whole size until counted (or counted already)
    wait_for(lambda: fs.getattr(path)["st_blocks"] * 512 == 2 * MiB, "st_blocks counted on the thread")


def test_seek_data_and_hole(sparse):
    fs, path, rec = sparse
    fh = fs.open(path, os.O_RDONLY)
    try:
        assert fs.lseek(path, 0, os.SEEK_DATA, fh) == 4 * MiB
        assert fs.lseek(path, 0, os.SEEK_HOLE, fh) == 0
        assert fs.lseek(path, 4 * MiB, os.SEEK_HOLE, fh) == 6 * MiB
        for offset, whence, code in ((6 * MiB, os.SEEK_DATA, errno.ENXIO), (12 * MiB, os.SEEK_HOLE, errno.ENXIO),
                                     (0, os.SEEK_SET, errno.EINVAL)):
            with pytest.raises(OSError) as err:
                fs.lseek(path, offset, whence, fh)
            assert err.value.errno == code
    finally:
        fs.release(path, fh)
    with pytest.raises(OSError) as err:
        fs.lseek(path, 0, os.SEEK_DATA, fh)
    assert err.value.errno == errno.EBADF
