"""A snapshot that fails midway (disk full, Ctrl-C, kill -9) leaves no partial snapshot, loses nothing.

Each test ends with ``check`` clean (orphan packs and tmp leftovers are hints, not problems) and every earlier
snapshot restoring bit-exact; damage and index loss are in test_faults_check.py.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dedupimg.ops.check import check
from dedupimg.ops.restore import verify
from dedupimg.repo.repository import Repository
from tests.helpers import check_clean, det_bytes, restore_all_bit_exact, run_cli, text_bytes

MiB = 1 << 20


def snapshot_id(repo: Path, image: Path) -> str:
    proc = run_cli("-r", repo, "snapshot", image)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode().strip()


def test_disk_full_during_snapshot(tmp_path, small_fs):
    repo = small_fs / "repo"
    assert run_cli("-r", repo, "init", "--chunk-size", "4096", "--pack-size", str(1 << 20)).returncode == 0
    small = tmp_path / "small.img"
    small.write_bytes(text_bytes(1, 2 * MiB) + det_bytes(2, 2 * MiB))
    first = snapshot_id(repo, small)

    big = tmp_path / "big.img"
    big.write_bytes(det_bytes(3, 64 * MiB))  # incompressible: cannot fit in what is left
    proc = run_cli("-r", repo, "snapshot", big)
    assert proc.returncode == 18, proc.stderr
    err = proc.stderr.decode().strip()
    assert err.count("\n") == 0 and "no space left" in err
    assert list((repo / "tmp").iterdir()) == []  # the open pack was removed
    restore_all_bit_exact(repo, {first: small.read_bytes()}, tmp_path)
    check_clean(repo, "--read-data")  # on a full disk: check writes nothing
    # Still usable once there is room again: a small snapshot goes through.
    second = snapshot_id(repo, small)
    restore_all_bit_exact(repo, {first: small.read_bytes(), second: small.read_bytes()}, tmp_path)
    check_clean(repo, "--read-data")


def _image(seed: int) -> bytes:
    return b"".join(text_bytes(seed * 100 + i, MiB) if i % 2 else det_bytes(seed * 100 + i, MiB) for i in range(48))


@pytest.fixture
def busy_repo(tmp_path: Path):
    repo = tmp_path / "repo"
    assert run_cli("-r", repo, "init", "--chunk-size", "4096", "--pack-size", str(1 << 18)).returncode == 0
    base = tmp_path / "base.img"
    base.write_bytes(_image(1))
    expected = {snapshot_id(repo, base): base.read_bytes()}
    return repo, expected


def test_ctrl_c_leaves_no_partial_snapshot(tmp_path, busy_repo):
    repo, expected = busy_repo
    image = tmp_path / "v2.img"
    image.write_bytes(_image(2) + _image(3))  # 96 MiB of new data: about a second to store, here
    proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "snapshot", str(image)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Interrupt once it is writing (a fixed delay could land during start-up, before the handler exists).
    deadline = time.monotonic() + 30
    while not any((repo / "tmp").iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.fail("snapshot finished before the interrupt; make the image larger")
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    assert list((repo / "tmp").iterdir()) == []
    restore_all_bit_exact(repo, expected, tmp_path)
    check_clean(repo, "--read-data")


def test_kill_9_at_random_points(tmp_path, busy_repo):
    repo, expected = busy_repo
    rng = random.Random(1234)
    image = tmp_path / "v.img"
    for round_ in range(6):
        image.write_bytes(_image(10 + round_))
        proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "snapshot", str(image)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.4, 2.5))
        proc.kill()
        out, _ = proc.communicate(timeout=60)
        with Repository.open(repo) as r:  # opens cleanly
            present = {s.hex_id for s in r.snapshots()}
        assert present >= set(expected)
        # Killed after its commit (or finished): the snapshot is complete and must restore bit-exact too.
        assert len(present - set(expected)) <= 1
        for sid in present - set(expected):
            expected[sid] = image.read_bytes()
        restore_all_bit_exact(repo, expected, tmp_path)
        with Repository.open(repo) as r:  # structure after every kill: orphan packs, tmp files are only hints
            report = check(r)
        assert report.ok, report.findings
    # And the repository keeps working: a full snapshot of the last image succeeds and restores.
    expected[snapshot_id(repo, image)] = image.read_bytes()
    restore_all_bit_exact(repo, expected, tmp_path)
    doc = check_clean(repo, "--read-data")
    assert {h["kind"] for h in doc["hints"]} <= {"orphan-pack", "tmp-leftover", "garbage"}  # type: ignore[union-attr]
    # A rebuild from the packs keeps every snapshot. It may also list a killed snapshot whose last pack was
    # durable but not yet committed: complete, and proven by its image hash like any other.
    assert run_cli("-r", repo, "repair", "index").returncode == 0
    with Repository.open(repo) as r:
        listed = {s.hex_id for s in r.snapshots()}
        assert listed >= set(expected)
        for sid in listed:
            verify(r, sid)  # the whole image against its recorded blake3: bit-exact
        report = check(r)
    assert report.ok, report.findings


def test_kill_9_of_incremental_snapshots_at_random_points(tmp_path, busy_repo):
    """kill -9 of `snapshot --parent P --changed-ranges FILE` (a third of a 48 MiB image rewritten) at random
    moments: the repository opens and checks clean after every kill, every snapshot it lists
    restores bit-exact (an incremental's derived hash is checked against its extents, then each chunk), and a last
    incremental from the same parent finishes."""
    repo, expected = busy_repo
    [(parent, base)] = expected.items()
    rng = random.Random(77)
    image = tmp_path / "v.img"
    listed = tmp_path / "changes.json"
    killed = 0
    for round_ in range(8):
        data = bytearray(base)
        changes = []
        for k in range(16):  # 16 rewritten MiB in 48
            off = (3 * k + rng.randrange(3)) * MiB
            data[off : off + MiB] = det_bytes(round_ * 1000 + k, MiB)
            changes.append({"offset": off, "length": MiB})
        image.write_bytes(data)
        listed.write_text(json.dumps(changes))
        proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "snapshot", str(image), "--name",
                                 "base.img", "--parent", parent, "--changed-ranges", str(listed)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.15, 0.45))  # a whole run takes about 0.4 s here: start-up, then the work
        proc.kill()
        proc.communicate(timeout=60)
        killed += proc.returncode != 0
        with Repository.open(repo) as r:
            present = {s.hex_id for s in r.snapshots()}
            report = check(r)
        assert report.ok, report.findings
        assert present >= set(expected) and len(present - set(expected)) <= 1
        for sid in present - set(expected):
            expected[sid] = bytes(data)
        restore_all_bit_exact(repo, expected, tmp_path)
    assert killed >= 2, "no kill landed before the end: make the change list longer"
    done = run_cli("-r", repo, "snapshot", image, "--name", "base.img", "--parent", parent, "--changed-ranges", listed)
    assert done.returncode == 0, done.stderr
    expected[done.stdout.decode().strip()] = image.read_bytes()
    restore_all_bit_exact(repo, expected, tmp_path)
    check_clean(repo, "--read-data")
