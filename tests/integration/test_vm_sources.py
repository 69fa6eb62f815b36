"""VM-native sources through the CLI (issue 16): `snapshot disk.qcow2`, `snapshot nbd+unix://...` with a dirty
bitmap, --changed-ranges, --verify-unchanged's exit code, --json fields, refusals; and the example script's
offline rotation (examples/vm-guest-backup.sh demo). Real qemu-img, qemu-io and qemu-nbd; every qemu-nbd the
test starts is killed by a finalizer, and none is left by dedupimg."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from dedupimg.ops.snapshot import take_snapshot
from tests.helpers import ROOT, cli_env, det_bytes, fails, ok, run_cli, small_repo, text_bytes, write_sparse
from tests.integration.support import start, stop

pytestmark = pytest.mark.slow

MiB = 1 << 20


def qemu_nbd_count() -> int:
    return sum(1 for pid in os.listdir("/proc") if pid.isdigit() and _comm(pid) == "qemu-nbd")


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    disk = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x22 40M 2M", str(disk)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(disk), "b0"], check=True)
    return disk


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    ok(run_cli("init", "-r", path))
    return path


@pytest.fixture
def exported(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen[bytes]] = []

    def start(disk: Path, bitmap: str) -> str:
        sock = tmp_path / f"nbd{len(procs)}.sock"
        procs.append(subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "-f", "qcow2", "-B", bitmap,
                                       f"--socket={sock}", "--export-name=guest", str(disk)]))
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                break
            except OSError:
                assert time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.02)
        return f"nbd+unix:///guest?socket={sock}"

    def stop_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(10)

    start.stop_all = stop_all  # type: ignore[attr-defined]
    yield start
    stop_all()


def test_qcow2_then_incremental_over_nbd_then_verify_unchanged(repo, image, tmp_path, exported):
    before = qemu_nbd_count()
    first = json.loads(ok(run_cli("snapshot", "-r", repo, image, "--json")))
    assert first["name"] == "guest.qcow2" and first["bytes_read"] == 6 * MiB and "parent" not in first
    assert qemu_nbd_count() == before  # the private qemu-nbd is gone
    subprocess.run(["qemu-io", "-c", "write -P 0x33 1M 64k", "-c", "write -P 0x44 50M 64k", str(image)],
                   check=True, capture_output=True)
    uri = exported(image, "b0")
    inc = json.loads(ok(run_cli("snapshot", "-r", repo, uri, "--name", "guest.qcow2", "--parent", first["id"][:8],
                                "--dirty-bitmap", "b0", "--verify-unchanged", "50", "--json")))
    assert inc["parent"] == first["id"]
    assert inc["bytes_read"] - inc["bytes_verified"] == 2 * 64 * 1024
    raw = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    # Its hash is derived from its extents (its unchanged ranges were never read): marked, and checked by
    # restore and verify, which still prove every chunk.
    assert inc["blake3"] is None and inc["hash_of"] == "extents" and len(inc["extents_blake3"]) == 64
    assert "verified: extents blake3" in ok(run_cli("verify", "-r", repo, inc["id"]))
    ok(run_cli("restore", "-r", repo, inc["id"], tmp_path / "restored.raw"))
    assert (tmp_path / "restored.raw").read_bytes() == raw.read_bytes()
    assert blake3.blake3(raw.read_bytes()).hexdigest() != inc["extents_blake3"]
    # A write the bitmap does not see: --verify-unchanged 100 finds it, exit 23, nothing stored.
    exported.stop_all()  # (qemu-img needs the image's write lock)
    subprocess.run(["qemu-img", "bitmap", "--disable", str(image), "b0"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x55 41M 4k", str(image)], check=True, capture_output=True)
    uri = exported(image, "b0")
    fails(run_cli("snapshot", "-r", repo, uri, "--name", "guest.qcow2", "--parent", inc["id"],
                  "--dirty-bitmap", "b0", "--verify-unchanged", "100"), 23, "take a full snapshot")
    listed = json.loads(ok(run_cli("snapshots", "-r", repo, "--json")))
    assert [s["id"] for s in listed] == [first["id"], inc["id"]]


def test_changed_ranges_file_and_refusals(repo, tmp_path):
    raw = tmp_path / "disk.img"
    data = bytearray(os.urandom(3 * MiB))
    raw.write_bytes(data)
    first = json.loads(ok(run_cli("snapshot", "-r", repo, raw, "--json")))
    data[MiB : MiB + 100] = b"x" * 100
    raw.write_bytes(data)
    ranges = tmp_path / "changes.json"
    ranges.write_text(json.dumps([{"offset": MiB, "length": 100}]))
    inc = json.loads(ok(run_cli("snapshot", "-r", repo, raw, "--parent", first["id"], "--changed-ranges", ranges,
                                "--json")))
    assert inc["bytes_read"] == 100 and inc["hash_of"] == "extents"
    ok(run_cli("restore", "-r", repo, inc["id"], tmp_path / "restored.img"))
    assert blake3.blake3((tmp_path / "restored.img").read_bytes()).digest() == blake3.blake3(bytes(data)).digest()
    fails(run_cli("snapshot", "-r", repo, raw, "--dirty-bitmap", "b0"), 2, "need --parent")
    fails(run_cli("snapshot", "-r", repo, raw, "--parent", first["id"], "--dirty-bitmap", "b0"), 2,
          "--dirty-bitmap needs an NBD source")
    fails(run_cli("snapshot", "-r", repo, "nbd+unix:///x?socket=/nonexistent.sock"), 16, "cannot connect")
    help_text = ok(run_cli("snapshot", "--help"))
    assert "23 snapshot --verify-unchanged" in " ".join(help_text.split())


def test_example_script_rotates_bitmaps_offline(tmp_path):
    env = cli_env(DEDUPIMG_REPO=str(tmp_path / "repo"))
    ok(run_cli("init", env=env))
    proc = subprocess.run(["bash", str(ROOT / "examples" / "vm-guest-backup.sh"), "demo"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "restored bit-exact" in proc.stdout and "3 snapshots" in proc.stdout


def test_a_snapshot_served_by_dedupimg_serve_snapshots_to_the_same_manifest(tmp_path):
    """The NBD client against the project's own server (structured replies, block status from extents): a
    snapshot of a served snapshot, into the same repository, is the same image with the same segments."""
    image = tmp_path / "disk.img"
    write_sparse(image, 12 * MiB, [(0, text_bytes(1, 3 * MiB)), (5 * MiB, det_bytes(2, 2 * MiB)),
                                   (11 * MiB, det_bytes(3, 4096))])
    repo = small_repo(tmp_path / "repo", avg=4096)
    try:
        first = take_snapshot(repo, str(image), name="disk")
        running = start(repo, [first.record.hex_id])
        try:
            again = take_snapshot(repo, f"nbd://127.0.0.1:{running.port}/{first.record.hex_id}", name="disk")
        finally:
            stop(running)
        assert again.record.image_hash == first.record.image_hash
        assert again.record.segments == first.record.segments
        assert again.chunks_new == 0 and again.bytes_read == first.bytes_read
    finally:
        repo.close()
