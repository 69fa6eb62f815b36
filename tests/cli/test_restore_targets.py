"""Restore targets that would destroy the wrong thing are refused (issue 11 §3), through the CLI.

Character devices, FIFOs, sockets and directories: exit 16, with or without --force. Symlinks are followed
and their destination gets every rule. A mounted or held block device: exit 16, naming what holds it.
`latest` without a name in a repository of several images: exit 14. --force keeps a file's owner and
mode. An interrupted --delta says the target is half done, and the same command finishes it.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from tests.helpers import ROOT, det_bytes, fails, ok, run_cli, sh, text_bytes

IMAGE = text_bytes(5, 300_000) + det_bytes(6, 200_000)

pytestmark = pytest.mark.slow  # a repository made through the CLI per test, devices, loop mounts


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    image = tmp_path / "disk.img"
    image.write_bytes(IMAGE)
    ok(run_cli("-r", repo, "snapshot", image))
    return repo


def restore(repo: Path, target: str | Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli("-r", repo, "restore", "latest", target, *args)


# -- never written: character devices, FIFOs, sockets, directories ---------------------------------------------


@pytest.mark.parametrize("args", [(), ("--force",), ("--delta",)])
def test_char_device_is_refused(repo, args):
    fails(restore(repo, "/dev/null", *args), 16, "/dev/null is a character device")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


@pytest.mark.parametrize("args", [(), ("--force",), ("--delta",)])
def test_fifo_is_refused(repo, tmp_path, args):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fails(restore(repo, fifo, *args), 16, f"{fifo} is a FIFO")  # and no hang in open()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("args", [(), ("--force",)])
def test_socket_is_refused(repo, tmp_path, args):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        fails(restore(repo, path, *args), 16, f"{path} is a socket")
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.parametrize("args", [(), ("--force",), ("--delta",)])
def test_directory_is_refused(repo, tmp_path, args):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "keep").write_text("x")
    fails(restore(repo, d, *args), 16, f"{d} is a directory")
    assert (d / "keep").read_text() == "x"


# -- symlinks: followed, named, and their destination gets every rule -------------------------------------------


def test_symlink_to_a_char_device_is_refused_naming_both(repo, tmp_path):
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    fails(restore(repo, link, "--force"), 16, f"{link} (a symlink to /dev/null) is a character device")
    assert link.is_symlink() and os.readlink(link) == "/dev/null"


def test_symlink_to_a_file_replaces_the_file_not_the_link(repo, tmp_path):
    real = tmp_path / "real.img"
    real.write_bytes(b"old content")
    link = tmp_path / "link.img"
    link.symlink_to("real.img")
    fails(restore(repo, link), 15, f"{link} (a symlink to {real}) exists", "--force")
    assert real.read_bytes() == b"old content"
    ok(restore(repo, link, "--force"))
    assert link.is_symlink() and os.readlink(link) == "real.img"
    assert real.read_bytes() == IMAGE


def test_dangling_symlink_needs_force(repo, tmp_path):
    link = tmp_path / "link.img"
    link.symlink_to("missing.img")
    fails(restore(repo, link), 15, f"{link} (a symlink to {tmp_path / 'missing.img'}) is dangling", "--force")
    assert link.is_symlink() and not (tmp_path / "missing.img").exists()
    fails(restore(repo, link, "--delta"), 15, "dangling")
    ok(restore(repo, link, "--force"))
    assert link.is_symlink() and os.readlink(link) == "missing.img"  # the link is kept; its destination made
    assert (tmp_path / "missing.img").read_bytes() == IMAGE


# -- --force over a file keeps owner, group and mode ------------------------------------------------------------


def test_force_keeps_owner_group_and_mode(repo, tmp_path):
    target = tmp_path / "theirs.img"
    target.write_bytes(b"someone else's file")
    os.chown(target, 1234, 1234)
    os.chmod(target, 0o640)
    ok(restore(repo, target, "--force"))
    st = os.stat(target)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 1234, 0o640)
    assert target.read_bytes() == IMAGE
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


# -- block devices: O_EXCL, like mkfs ---------------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    dev = Path(sh("losetup", "--find", "--show", backing).strip())
    try:
        yield dev
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True, timeout=60)
        subprocess.run(["losetup", "-d", str(dev)], capture_output=True, timeout=60)


def test_mounted_block_device_is_refused_naming_the_mount(repo, tmp_path, loop_device):
    sh("mkfs.ext4", "-q", loop_device)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", loop_device, mnt)
    (mnt / "precious").write_bytes(b"keep me")
    for args in (("--force",), ("--delta",)):
        fails(restore(repo, loop_device, *args), 16, f"block device {loop_device} is in use",
              f"mounted on {mnt}", "refusing")
    link = tmp_path / "by-id-link"
    link.symlink_to(loop_device)
    fails(restore(repo, link, "--force"), 16, f"{link} (a symlink to {loop_device}) is in use", f"mounted on {mnt}")
    sh("umount", mnt)
    sh("e2fsck", "-fn", loop_device)  # the filesystem is untouched
    sh("mount", loop_device, mnt)
    assert (mnt / "precious").read_bytes() == b"keep me"


def test_block_device_held_open_exclusively_is_refused(repo, loop_device):
    fd = os.open(loop_device, os.O_RDONLY | os.O_EXCL)
    try:
        fails(restore(repo, loop_device, "--force"), 16, "is in use", "opened exclusively by another program")
    finally:
        os.close(fd)


def test_unmounted_block_device_is_written(repo, tmp_path, loop_device):
    fails(restore(repo, loop_device), 15, "is a block device", "--force")
    link = tmp_path / "by-id-link"
    link.symlink_to(loop_device)
    ok(restore(repo, link, "--force"))  # through a symlink, as /dev/disk/by-id/... names a disk
    assert link.is_symlink()
    with open(loop_device, "rb") as f:
        assert f.read(len(IMAGE)) == IMAGE
    out = ok(restore(repo, loop_device, "--delta", "--json"))
    assert '"bytes_written": 0' in out


# -- latest without a name ------------------------------------------------------------------------------------


def test_latest_without_name_is_ambiguous_with_several_images(repo, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(det_bytes(7, 100_000))
    ok(run_cli("-r", repo, "snapshot", other))
    out = tmp_path / "out.img"
    for cmd in (("restore", "latest", out), ("restore", "latest", out, "--force"), ("verify", "latest"),
                ("serve", "latest", "--listen", "127.0.0.1:0")):
        fails(run_cli("-r", repo, *cmd), 14, "'latest' is ambiguous", "2 image names (disk.img, other.img)",
              "--name")
    assert not out.exists()
    ok(run_cli("-r", repo, "restore", "latest", out, "--name", "other.img"))
    assert out.read_bytes() == other.read_bytes()
    ok(run_cli("-r", repo, "restore", "disk.img@latest", out, "--force"))
    assert out.read_bytes() == IMAGE
    ok(run_cli("-r", repo, "verify", "other.img@latest"))


def test_serve_default_export_is_ambiguous_with_several_images(repo, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(det_bytes(7, 100_000))
    ok(run_cli("-r", repo, "snapshot", other))
    env = {k: v for k, v in os.environ.items() if k not in ("DEDUPIMG_REPO", "DEDUPIMG_DEBUG")}
    proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "serve", "--listen", "127.0.0.1:0"],
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)  # type: ignore[arg-type]
        assert sel.select(30), "the server printed nothing"
        line = proc.stderr.readline().decode()  # type: ignore[union-attr]
        uri = line.split(" on ", 1)[1].strip()
        for name in ("", "/latest"):  # the default export is the newest snapshot: `latest` too
            nbd = subprocess.run(["nbdinfo", "--size", uri + name], capture_output=True, text=True, timeout=60)
            assert nbd.returncode != 0 and "no export named" in nbd.stderr, nbd.stderr
        nbd = subprocess.run(["nbdinfo", "--size", uri + "/other.img@latest"], capture_output=True, text=True,
                             timeout=60)
        assert nbd.returncode == 0 and int(nbd.stdout) == 100_000, nbd.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            proc.kill()
            proc.wait()


def test_mount_has_no_latest_without_a_name(repo, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(det_bytes(7, 100_000))
    ok(run_cli("-r", repo, "snapshot", other))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(run_cli("-r", repo, "mount", mnt))
    try:
        assert sorted(os.listdir(mnt)) == ["by-id", "disk.img", "other.img"]  # only NAME/latest
        assert (mnt / "other.img" / "latest").read_bytes() == other.read_bytes()
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)


# -- an interrupted --delta -------------------------------------------------------------------------------------

DELTA_SIZE = 96 << 20


def test_interrupted_delta_says_so_and_the_same_command_finishes_it(tmp_path):
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init"))
    image = tmp_path / "vm.img"
    old = det_bytes(11, DELTA_SIZE)
    new = det_bytes(12, DELTA_SIZE)  # every chunk differs: the delta rewrites the whole target
    for data in (old, new):
        image.write_bytes(data)
        ok(run_cli("-r", repo, "snapshot", image))
    target = tmp_path / "stale.img"
    target.write_bytes(old)
    del old
    cmd = ["-r", str(repo), "restore", "latest", str(target), "--delta"]
    env = {k: v for k, v in os.environ.items() if k not in ("DEDUPIMG_REPO", "DEDUPIMG_DEBUG")}
    proc = subprocess.Popen([sys.executable, "-m", "dedupimg", *cmd], stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        fd = os.open(target, os.O_RDONLY)
        deadline = time.monotonic() + 60
        while os.pread(fd, 4096, 0) != new[:4096]:  # the first run is written: the restore is under way
            assert proc.poll() is None and time.monotonic() < deadline, "the restore did not start writing"
            time.sleep(0.001)
        os.close(fd)
        proc.send_signal(signal.SIGINT)
        _, err_b = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    err = err_b.decode()
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{target} was being written in place" in err and "neither its old content nor snapshot" in err, err
    assert "run the same command again to finish it" in err, err
    half = blake3.blake3(target.read_bytes()).digest()
    assert half not in (blake3.blake3(det_bytes(11, DELTA_SIZE)).digest(), blake3.blake3(new).digest())
    again = run_cli(*cmd)  # the same command
    assert again.returncode == 0, again.stderr.decode()
    assert "updated" in again.stdout.decode()
    assert target.read_bytes() == new
