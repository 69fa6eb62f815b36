"""mount and serve on an S3 repository (issue 13 §2): a later version whose chunks lie between its parent's in
the packs reads back bit-exact through FUSE and through NBD (nbdcopy), with the read workers' several requests
at once and runs that read over other blobs (Repository._runs on an object store)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli_env, det_bytes, first_line, ok, run_cli, wait_for
from tests.integration.support import mounted

pytestmark = pytest.mark.slow


def test_mount_and_serve_read_an_s3_snapshot_bit_exact(s3_server: Any, s3_credentials: None, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    location = f"s3:{s3_server.endpoint}/{s3_server.bucket}/serve-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("DEDUPIMG_CACHE_DIR", str(tmp_path / "cache"))
    ok(run_cli("-r", location, "init", "--chunk-size", "4096"))
    v1 = det_bytes(1, 24 << 20)
    v2 = bytearray(v1)
    for at in range(0, len(v2), 300_000):  # scattered edits: v2's new chunks sit between v1's
        v2[at : at + 3000] = det_bytes(at, 3000)
    for name, data in (("v1", v1), ("v2", bytes(v2))):
        (tmp_path / f"{name}.img").write_bytes(data)
        ok(run_cli("-r", location, "snapshot", tmp_path / f"{name}.img", "--name", "disk"))
    ids = [s["id"] for s in json.loads(ok(run_cli("-r", location, "snapshots", "--json")))]

    with mounted(location, tmp_path / "mnt", tmp_path / "mount.log"):  # type: ignore[arg-type]
        assert (tmp_path / "mnt" / "disk" / "latest").read_bytes() == bytes(v2)
        assert (tmp_path / "mnt" / "by-id" / f"{ids[0]}.img").read_bytes() == v1

    proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", location, "serve", ids[1], "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        assert proc.stderr is not None
        line = first_line(proc.stderr, timeout=60)
        assert line.startswith("serving 1 export on nbd://127.0.0.1:"), line
        url = f"{line.split()[-1]}/{ids[1]}"
        out = tmp_path / "nbdcopy.img"
        wait_for(lambda: subprocess.run(["nbdinfo", "--size", url], capture_output=True).returncode == 0,
                 "the NBD server", proc)
        subprocess.run(["nbdcopy", url, str(out)], check=True, timeout=120)
        assert out.read_bytes() == bytes(v2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
