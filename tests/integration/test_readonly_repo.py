"""Issue 11 §4b: a read-only repository (read-only bind mount, a user with read access only) can be read:
snapshots, info, check, verify, restore, serve and mount work; the commands that write say why they cannot,
with exit 16, not a lock error or a traceback."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, det_bytes, ok, run_cli, text_bytes
from tests.integration.support import mounted

MiB = 1 << 20
OTHER_UID = 1234


@pytest.fixture
def source_repo(tmp_path: Path) -> tuple[Path, bytes]:
    repo = tmp_path / "src" / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    data = text_bytes(1, MiB) + bytes(MiB) + det_bytes(2, MiB)
    img = tmp_path / "disk.img"
    img.write_bytes(data)
    ok(run_cli("-r", repo, "snapshot", img, "--name", "disk"))
    return repo, data


@pytest.fixture
def ro_bind(tmp_path: Path, source_repo: tuple[Path, bytes]) -> Iterator[tuple[Path, bytes]]:
    repo, data = source_repo
    (repo / "lock").unlink(missing_ok=True)  # read-only media made elsewhere may have no lock file
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(repo.parent), str(mnt)], check=True, timeout=30)
    try:
        yield mnt / "repo", data
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)


def _serve_and_copy(repo: Path, out: Path, prefix: list[str] | None = None) -> None:
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "dedupimg", "-r", str(repo), "serve", "disk@latest",
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode().strip()
        assert line.startswith("serving"), line + proc.stderr.read().decode()
        port = int(line.rsplit(":", 1)[1])
        name = ok(run_cli("-r", repo, "snapshots", "--json")).split('"id": "')[1][:64] if prefix is None else None
        export = name or "disk@latest"
        copy = subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/{export}", str(out)], capture_output=True,
                              timeout=60)
        assert copy.returncode == 0, copy.stderr.decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_read_only_bind_mount(ro_bind, tmp_path):
    repo, data = ro_bind
    assert "disk" in ok(run_cli("-r", repo, "snapshots"))
    ok(run_cli("-r", repo, "info"))
    ok(run_cli("-r", repo, "check", "--read-data"))
    ok(run_cli("-r", repo, "verify", "latest"))
    out = tmp_path / "out.img"
    ok(run_cli("-r", repo, "restore", "latest", out))
    assert out.read_bytes() == data
    served = tmp_path / "served.img"
    _serve_and_copy(repo, served)
    assert served.read_bytes() == data
    with mounted(repo, tmp_path / "fuse", tmp_path / "log"):
        assert hashlib.sha256((tmp_path / "fuse" / "disk" / "latest").read_bytes()).digest() == \
            hashlib.sha256(data).digest()
    for args in (["snapshot", str(out), "--name", "x"], ["forget", "--keep-last", "1"], ["prune"]):
        proc = run_cli("-r", repo, *args)
        err = proc.stderr.decode()
        assert proc.returncode == 16, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Read-only file system" in err, err


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path lies under a root-only 0700 directory)."""
    base = Path(tempfile.mkdtemp(prefix="dedupimg-ro-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_user_with_read_access_only(open_base):
    repo = open_base / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    data = text_bytes(3, MiB) + det_bytes(4, MiB)
    img = open_base / "disk.img"
    img.write_bytes(data)
    ok(run_cli("-r", repo, "snapshot", img, "--name", "disk"))
    for p in [repo, *repo.rglob("*")]:
        os.chown(p, 0, OTHER_UID)
        p.chmod((p.stat().st_mode & 0o700) | (0o050 if p.is_dir() else 0o040))
    out_dir = open_base / "out"
    out_dir.mkdir()
    shutil.chown(out_dir, OTHER_UID, OTHER_UID)

    def as_other(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return run_cli("-r", repo, *args, user=OTHER_UID, cwd=ROOT, env={"HOME": str(out_dir)}, timeout=300)

    assert "disk" in ok(as_other("snapshots"))
    ok(as_other("check", "--read-data"))
    ok(as_other("verify", "latest"))
    ok(as_other("restore", "latest", out_dir / "out.img"))
    assert (out_dir / "out.img").read_bytes() == data
    proc = as_other("snapshot", out_dir / "out.img", "--name", "other")
    err = proc.stderr.decode()
    assert proc.returncode == 16 and len(err.strip().splitlines()) == 1, err
