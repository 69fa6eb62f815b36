"""Issue 11 §1c: mount and serve make every check restore makes, so an altered index never serves wrong bytes.

The index keeps a copy of every manifest segment. Here one copy is altered with its total length kept (a
chunk extent 100 bytes shorter, the zero extent after it 100 bytes longer): restore and verify refused such
a copy before, while mount and serve returned wrong bytes with no error.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from dedupimg.core.manifest import decode_segment, encode_segment
from tests.helpers import ROOT, det_bytes, fails, run_cli
from tests.integration.support import mounted

MiB = 1 << 20


def _alter_a_segment_copy(repo: Path) -> None:
    env = lmdb.open(str(repo / "index"), max_dbs=12, subdir=True, create=False)
    try:
        segments = env.open_db(b"segments", create=False)
        with env.begin(write=True) as txn:
            for key, value in txn.cursor(db=segments).iternext():
                seg = decode_segment(bytes(value))
                for i in range(len(seg.ids) - 1):
                    if seg.ids[i] is not None and seg.ids[i + 1] is None:
                        lengths = list(seg.lengths)
                        lengths[i] -= 100
                        lengths[i + 1] += 100
                        txn.put(bytes(key), encode_segment(lengths, seg.ids), db=segments)
                        return
        raise AssertionError("no chunk extent followed by a zero extent")
    finally:
        env.close()


@pytest.fixture
def altered(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    # Unencrypted: chunk ids (so segment cuts, content-defined) are then the same in every run, and this image
    # has a chunk extent followed by the zero run inside one segment (keyed ids ended a segment right before
    # the zeros in about 1 run in 128).
    assert run_cli("-r", repo, "init", "--chunk-size", "4096", "--encryption", "none").returncode == 0
    img = tmp_path / "disk.img"
    img.write_bytes(det_bytes(1, MiB) + bytes(2 * MiB) + det_bytes(2, MiB))
    assert run_cli("-r", repo, "snapshot", img, "--name", "disk").returncode == 0
    _alter_a_segment_copy(repo)
    return repo


def test_restore_and_verify_refuse_the_altered_copy(altered, tmp_path):
    fails(run_cli("-r", altered, "restore", "latest", tmp_path / "out.img"), 17)
    assert not (tmp_path / "out.img").exists()
    fails(run_cli("-r", altered, "verify", "latest"), 17)


def test_mount_refuses_reads_of_the_altered_copy(altered, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(altered, mnt, tmp_path / "log"):
        with pytest.raises(OSError) as exc:
            (mnt / "disk" / "latest").read_bytes()
        assert exc.value.errno == errno.EIO


def test_serve_refuses_reads_of_the_altered_copy(altered, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dedupimg", "-r", str(altered), "serve", "disk@latest", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode().strip()
        assert line.startswith("serving"), line
        port = int(line.rsplit(":", 1)[1])
        out = tmp_path / "copy.img"
        copy = subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/disk@latest", str(out)],
                              capture_output=True, timeout=60)
        assert copy.returncode != 0, "nbdcopy read an image whose mapping does not match its segment id"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert os.path.exists(altered / "index" / "data.mdb")
