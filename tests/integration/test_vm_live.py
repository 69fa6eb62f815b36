"""The example script's live mode against a running QEMU (examples/vm-guest-backup.sh live-qmp): a guest-less
qemu-system-x86_64 (-machine none) holds a qcow2 disk, QMP on a unix socket; "guest writes" are HMP qemu-io
commands on the disk's BlockBackend (drive0), so they pass through the fleecing filter as a guest device's
would. Three runs (full, then two incremental), one killed with its export up and the run that recovers it,
and one whose bitmap missed a write (exit 23, then a full snapshot): each snapshot restores bit-exact to the
disk at its transaction, an incremental run reads only the dirty 64 KiB granules, writes made while the
fleecing export is up stay out of that snapshot and land in the next, the bitmaps rotate (dedupimg-A,
dedupimg-B), the persistent one is in the qcow2 after QEMU quits, and no overlay, export, job or node is left
behind. QEMU is killed in a finally block."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, cli_env, det_bytes, ok, run_cli, text_bytes, wait_for

pytestmark = pytest.mark.slow

MiB = 1 << 20
K64 = 64 * 1024
SIZE = 64 * MiB
SCRIPT = ROOT / "examples" / "vm-guest-backup.sh"
Write = tuple[int, bytes]  # offset, data


def qmp(sock: Path, execute: str, **arguments: Any) -> Any:
    """One QMP command on its own connection (the socket serves one client at a time, and the script under test
    connects between our commands); returns its "return", fails the test on an error reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock))
        stream = s.makefile("rw")
        stream.readline()  # greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": execute, "arguments": arguments}):
            stream.write(json.dumps(cmd) + "\n")
            stream.flush()
            while "return" not in (reply := json.loads(stream.readline())):  # events come in between
                assert "error" not in reply, (cmd, reply)
    return reply["return"]


def hmp_io(command: str) -> dict[str, Any]:
    """The QMP command that runs `qemu-io drive0 COMMAND` (HMP): a write through the disk's BlockBackend."""
    return {"execute": "human-monitor-command", "arguments": {"command-line": f'qemu-io drive0 "{command}"'}}


class Disk:
    """The guest disk: a qcow2 file held by a running QEMU, and a model of its bytes kept in step."""

    def __init__(self, tmp_path: Path, qmp_sock: Path) -> None:
        self.dir, self.sock = tmp_path, qmp_sock
        self.path = tmp_path / "guest.qcow2"
        self.model = bytearray(SIZE)
        self.model[0 : 3 * MiB] = text_bytes(1, 3 * MiB)
        self.model[3 * MiB : 6 * MiB] = det_bytes(2, 3 * MiB)
        self.model[40 * MiB : 42 * MiB] = det_bytes(3, 2 * MiB)
        raw = tmp_path / "initial.raw"
        raw.write_bytes(self.model)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(self.path)], check=True)
        raw.unlink()
        self.sources = 0

    def write_command(self, offset: int, seed: int, length: int = K64) -> tuple[dict[str, Any], Write]:
        """The QMP command of a guest write of ``length`` pseudo-random bytes at ``offset``, and the write for
        ``applied`` (the model is not changed yet)."""
        data = det_bytes(seed, length)
        self.sources += 1
        src = self.dir / f"write{self.sources}.bin"
        src.write_bytes(data)
        return hmp_io(f"write -s {src} {offset} {length}"), (offset, data)

    def applied(self, write: Write) -> None:
        offset, data = write
        self.model[offset : offset + len(data)] = data

    def write(self, offset: int, seed: int, length: int = K64) -> None:
        cmd, write = self.write_command(offset, seed, length)
        assert qmp(self.sock, cmd["execute"], **cmd["arguments"]) == "", "qemu-io through HMP failed"
        self.applied(write)

    def read_now(self) -> bytes:
        """The disk as QEMU sees it, read by qemu-img beside the running QEMU (-U) after a flush of its caches."""
        assert qmp(self.sock, "human-monitor-command", **{"command-line": 'qemu-io drive0 "flush"'}) == ""
        raw = self.dir / "now.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(self.path), str(raw)], check=True)
        data = raw.read_bytes()
        raw.unlink()
        return data

    def bitmaps(self) -> list[tuple[str, bool, int]]:
        """The disk node's named dirty bitmaps: (name, recording, dirty bytes)."""
        node = next(n for n in qmp(self.sock, "query-named-block-nodes", flat=True) if n["node-name"] == "disk0")
        return sorted((b["name"], b["recording"], b["count"]) for b in node.get("dirty-bitmaps", []) if "name" in b)


def start_qemu(disk: Path, qmp_sock: Path, log: Path) -> subprocess.Popen[bytes]:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is missing: scripts/setup.sh installs it (Debian package qemu-system-x86)"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [qemu, "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{qmp_sock},server=on,wait=off",
             # -drive, not -blockdev: drive0 is a BlockBackend above the node, as a guest device's is, so the
             # fleecing job's copy-before-write filter is inserted under it (HMP qemu-io on the bare node is
             # refused while the job runs: a permission conflict with the filter).
             "-drive", f"if=none,id=drive0,node-name=disk0,format=qcow2,file={disk}"],
            stdout=out, stderr=subprocess.STDOUT)
    wait_for(qmp_sock.exists, "QEMU's QMP socket", proc)
    return proc


class Live:
    """A guest-less QEMU on a fresh qcow2 disk with a QMP socket, and an initialised repository."""

    def __init__(self, tmp_path: Path) -> None:
        self.qmp_sock = tmp_path / "qmp.sock"
        self.disk = Disk(tmp_path, self.qmp_sock)
        ok(run_cli("init", "-r", tmp_path / "repo"))
        self.qemu = start_qemu(self.disk.path, self.qmp_sock, tmp_path / "qemu.log")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    setup = Live(tmp_path)
    try:
        yield setup
    finally:  # killed whatever the test did; a test that quits QEMU itself checks its exit code
        if setup.qemu.poll() is None:
            setup.qemu.kill()
            setup.qemu.wait(30)


def run_script(tmp_path: Path, qmp_sock: Path, hook: str = "", **env: str) -> tuple[int, list[dict[str, Any]], str]:
    """One live-qmp run; returns its exit code, the --json documents it printed, its stderr."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "live-qmp", str(qmp_sock), "disk0", "guest"],
        env=cli_env(DEDUPIMG_REPO=str(tmp_path / "repo"), FLEECE_DIR=str(tmp_path), DEDUPIMG_SNAPSHOT_OPTS="--json",
                    DEDUPIMG_FLEECE_HOOK=hook, **env),
        capture_output=True, text=True, timeout=300)
    docs, text, decoder = [], proc.stdout.strip(), json.JSONDecoder()
    while text:
        doc, end = decoder.raw_decode(text)
        docs.append(doc)
        text = text[end:].strip()
    return proc.returncode, docs, proc.stderr


def assert_torn_down(tmp_path: Path, disk: Disk) -> None:
    assert not list(tmp_path.glob("dedupimg-fleece.*")), "the overlay's directory is left"
    assert qmp(disk.sock, "query-block-jobs") == []
    assert qmp(disk.sock, "query-block-exports") == []
    names = {n["node-name"] for n in qmp(disk.sock, "query-named-block-nodes", flat=True)}
    assert "dedupimg-fleece" not in names


def restored(tmp_path: Path, snapshot_id: str) -> bytes:
    out = tmp_path / "restored.raw"
    ok(run_cli("restore", "-r", tmp_path / "repo", snapshot_id, out, "--force"))
    data = out.read_bytes()
    out.unlink()
    return data


def test_live_qmp_fleecing_bitmap_rotation_and_a_missed_change(tmp_path: Path, live: Live) -> None:
    qmp_sock, disk, qemu = live.qmp_sock, live.disk, live.qemu
    # Run 1: no bitmap yet: a full snapshot, and dedupimg-A starts (persistent: the disk is qcow2).
    rc, docs, err = run_script(tmp_path, qmp_sock)
    assert rc == 0, err
    [first] = docs
    assert "parent" not in first and first["name"] == "guest" and first["size"] == SIZE
    assert disk.bitmaps() == [("dedupimg-A", True, 0)]
    assert_torn_down(tmp_path, disk)
    assert disk.read_now() == disk.model
    assert restored(tmp_path, first["id"]) == disk.model

    # Guest writes: two 64 KiB blocks, one of them into a hole, and 4 KiB inside a third granule.
    disk.write(1 * MiB, seed=10)
    disk.write(50 * MiB, seed=11)
    disk.write(3 * MiB + 8192, seed=12, length=4096)
    assert disk.bitmaps() == [("dedupimg-A", True, 3 * K64)]
    at_run2 = bytes(disk.model)
    # Run 2, incremental; while its export is up (after the transaction, before the read) the guest
    # overwrites a block the snapshot reads (1 MiB) and one it takes from the parent (8 MiB).
    hook_out = tmp_path / "hook.out"
    hook_writes = [disk.write_command(1 * MiB, seed=20), disk.write_command(8 * MiB, seed=21)]
    hook = "; ".join(f"qmp {shlex.quote(json.dumps(c))} >> {shlex.quote(str(hook_out))}" for c, _ in hook_writes)
    rc, docs, err = run_script(tmp_path, qmp_sock, hook=hook)
    assert rc == 0, err
    [second] = docs
    assert hook_out.read_text().split() == ['""', '""'], "the hook's writes failed"
    for _, write in hook_writes:
        disk.applied(write)
    assert second["parent"] == first["id"]
    assert second["bytes_read"] - second["bytes_verified"] == 3 * K64  # the dirty granules only
    assert restored(tmp_path, second["id"]) == at_run2  # not the hook's writes: the fleecing view
    assert disk.read_now() == disk.model != at_run2  # (they did reach the disk)
    # Rotated: dedupimg-B started at the transaction and holds exactly the hook's writes; A is gone.
    assert disk.bitmaps() == [("dedupimg-B", True, 2 * K64)]
    assert_torn_down(tmp_path, disk)

    # Run 3, incremental: the hook's writes and one more.
    disk.write(20 * MiB, seed=30)
    rc, docs, err = run_script(tmp_path, qmp_sock)
    assert rc == 0, err
    [third] = docs
    assert third["parent"] == second["id"]
    assert third["bytes_read"] - third["bytes_verified"] == 3 * K64
    assert restored(tmp_path, third["id"]) == disk.model
    assert disk.bitmaps() == [("dedupimg-A", True, 0)]
    assert_torn_down(tmp_path, disk)

    # A run killed (SIGKILL: no clean-up) while its export is up leaves the export, the NBD server, the
    # fleecing job, the overlay and two bitmaps (the old one disabled). The next run removes them, folds the
    # old bitmap into the recording one, and reads the writes of both.
    disk.write(24 * MiB, seed=35)
    rc, docs, err = run_script(tmp_path, qmp_sock, hook="kill -KILL $$")
    assert rc == -9 and docs == [], err
    assert [e["id"] for e in qmp(qmp_sock, "query-block-exports")] == ["dedupimg"]
    assert len(list(tmp_path.glob("dedupimg-fleece.*"))) == 1
    assert disk.bitmaps() == [("dedupimg-A", False, K64), ("dedupimg-B", True, 0)]
    disk.write(26 * MiB, seed=36)
    rc, docs, err = run_script(tmp_path, qmp_sock)
    assert rc == 0, err
    assert "interrupted run" in err and "merging dedupimg-A into dedupimg-B" in err
    [fourth] = docs
    assert fourth["parent"] == third["id"]
    assert fourth["bytes_read"] - fourth["bytes_verified"] == 2 * K64
    assert restored(tmp_path, fourth["id"]) == disk.model
    assert disk.bitmaps() == [("dedupimg-A", True, 0)]
    assert_torn_down(tmp_path, disk)

    # A write the bitmap misses (recording stopped behind the script's back), over data the parent
    # holds: --verify-unchanged 100 re-reads it and finds it (exit 23); the script then takes a full snapshot
    # of the same export, and rotates. (A missed write into the parent's zeros is caught too:
    # tests/ops/test_nbd_source.py::test_verify_unchanged_catches_a_missed_write_into_the_parents_hole.)
    qmp(qmp_sock, "block-dirty-bitmap-disable", node="disk0", name="dedupimg-A")
    disk.write(41 * MiB, seed=40)
    rc, docs, err = run_script(tmp_path, qmp_sock, VERIFY_UNCHANGED="100")
    assert rc == 23, err
    assert "take a full snapshot" in err and "taking a full snapshot" in err
    [full] = docs
    assert "parent" not in full
    assert restored(tmp_path, full["id"]) == disk.model
    assert disk.bitmaps() == [("dedupimg-B", True, 0)]
    assert_torn_down(tmp_path, disk)
    listed = json.loads(ok(run_cli("snapshots", "-r", tmp_path / "repo", "--json")))
    assert [s["id"] for s in listed] == [first["id"], second["id"], third["id"], fourth["id"], full["id"]]

    # QEMU quits: the persistent bitmap is stored in the qcow2.
    qmp(qmp_sock, "quit")
    assert qemu.wait(30) == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk.path)], check=True,
                                     capture_output=True, text=True).stdout)
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["dedupimg-B"]


def test_live_qmp_refuses_an_unknown_node(tmp_path: Path, live: Live) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "live-qmp", str(live.qmp_sock), "disk9"], capture_output=True,
                          text=True, timeout=60,
                          env=cli_env(DEDUPIMG_REPO=str(tmp_path / "repo"), FLEECE_DIR=str(tmp_path)))
    assert proc.returncode == 1 and "no block node 'disk9'" in proc.stderr, proc.stderr
    assert live.disk.bitmaps() == [] and qmp(live.qmp_sock, "query-block-jobs") == []
