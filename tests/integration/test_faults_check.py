"""Damage on disk, through the installed command: check names it, restore refuses it, repair rebuilds the index.

Every test ends with the repository's state proven: ``check`` clean (or naming exactly the damage left), and
every snapshot that should restore restores bit-exact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dedupimg.core.errors import IntegrityError
from dedupimg.ops.check import check
from dedupimg.ops.restore import restore
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo import pack
from dedupimg.repo.repository import Repository
from dedupimg.store.lock import LockMode, RepositoryLock
from tests.helpers import check_clean, det_bytes, restore_all_bit_exact, run_cli, small_repo, text_bytes
from tests.packfiles import pack_file as pack_file_of


def check_fails(repo: Path, *args: str) -> tuple[str, str]:
    proc = run_cli("-r", repo, "check", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 17, (proc.stdout.decode(), err)
    assert err.count("\n") == 1 and "check found" in err and "Traceback" not in err
    return proc.stdout.decode(), err


@pytest.fixture
def two(tmp_path: Path):
    """Two snapshots that share nothing: {id: bytes}, and the pack holding a chunk only the first uses."""
    repo = tmp_path / "repo"
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(det_bytes(1, 200_000) + text_bytes(2, 100_000))
    second.write_bytes(det_bytes(3, 200_000))
    with small_repo(repo) as r:  # set up in process: the commands under test run as subprocesses
        ids = [take_snapshot(r, str(first)).record.hex_id, take_snapshot(r, str(second)).record.hex_id]
        rec = r.resolve(ids[0])
        chunk = r.segment(rec.segments[0][0]).chunk_ids()[3]
        loc = r.index.lookup_blobs([chunk])[0]
        assert loc is not None
        pack_file = pack_file_of(r, r.index.pack_id(loc.pack_no))
    return repo, {ids[0]: first.read_bytes(), ids[1]: second.read_bytes()}, pack_file, loc.offset


def _restore(repo: Path, sid: str, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    return run_cli("-r", repo, "restore", sid, tmp_path / f"{sid[:8]}.img", "--force")


def test_clean_repository_after_many_snapshots(tmp_path):
    repo = tmp_path / "repo"
    with small_repo(repo) as r:
        image = tmp_path / "disk.img"
        data = bytearray(det_bytes(7, 400_000))
        rng = random.Random(3)
        for i in range(12):
            pos = rng.randrange(len(data) - 5000)
            data[pos : pos + 5000] = det_bytes(100 + i, 5000)
            image.write_bytes(bytes(data))
            take_snapshot(r, str(image))
    half = check_clean(repo, "--read-data-subset", "50%")["counts"]
    assert isinstance(half, dict) and half["snapshots"] == 12 and half["packs_read"] == -(-half["packs"] // 2)
    text = run_cli("-r", repo, "check", "--read-data")
    out = text.stdout.decode()
    assert text.returncode == 0 and out.startswith("checked 12 snapshots") and "no problems found" in out
    assert f"read {half['packs']} of {half['packs']} packs" in out


def test_check_usage_errors(tmp_path):
    repo = tmp_path / "repo"
    small_repo(repo).close()
    for bad in ("0", "abc"):
        proc = run_cli("-r", repo, "check", "--read-data-subset", bad)
        assert proc.returncode == 2 and "percentage" in proc.stderr.decode(), proc.stderr
    proc = run_cli("-r", repo, "check", "--read-data", "--read-data-subset", "5")
    assert proc.returncode == 2 and "not both" in proc.stderr.decode()


def test_flipped_byte(two, tmp_path):
    repo, expected, pack_file, offset = two
    damaged, intact = expected
    data = bytearray(pack_file.read_bytes())
    data[offset + pack.BLOB_HEADER.size + 7] ^= 0x40
    pack_file.write_bytes(bytes(data))
    check_clean(repo)  # structure: the trailer and index still agree
    out, _ = check_fails(repo, "--read-data")
    line = next(line for line in out.splitlines() if line.startswith("error"))
    assert "blob-damaged" in line and pack_file.name in line and damaged[:8] in line and intact[:8] not in line
    proc = _restore(repo, damaged, tmp_path)
    assert proc.returncode == 17 and "damaged data" in proc.stderr.decode()
    assert not (tmp_path / f"{damaged[:8]}.img").exists()
    restore_all_bit_exact(repo, expected, tmp_path, only=[intact])


def test_truncated_pack(two, tmp_path):
    repo, expected, pack_file, _ = two
    damaged, intact = expected
    os.truncate(pack_file, pack_file.stat().st_size // 2)
    out, _ = check_fails(repo)
    assert "pack-size" in out and "pack-damaged" in out and pack_file.name in out
    assert damaged[:8] in out and intact[:8] not in out
    assert _restore(repo, damaged, tmp_path).returncode == 17
    restore_all_bit_exact(repo, expected, tmp_path, only=[intact])


def test_deleted_pack(two, tmp_path):
    repo, expected, pack_file, _ = two
    damaged, intact = expected
    pack_file.unlink()
    out, _ = check_fails(repo)  # found without reading any data
    assert "pack-missing" in out and pack_file.name in out and damaged[:8] in out and intact[:8] not in out
    proc = _restore(repo, damaged, tmp_path)
    assert proc.returncode == 17 and "missing" in proc.stderr.decode()
    restore_all_bit_exact(repo, expected, tmp_path, only=[intact])


def test_deleted_lmdb_files_then_repair(two, tmp_path):
    repo, expected, _, _ = two
    for f in (repo / "index").iterdir():
        f.unlink()
    for args in (("restore", "latest", tmp_path / "x.img"), ("check",)):
        proc = run_cli("-r", repo, *args)
        err = proc.stderr.decode()
        assert proc.returncode == 17 and err.count("\n") == 1 and "dedupimg repair index" in err, err
    proc = run_cli("-r", repo, "repair", "index", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["snapshots"] == 2 and doc["damaged_packs"] == [] and doc["left_out"] == []
    restore_all_bit_exact(repo, expected, tmp_path)
    check_clean(repo, "--read-data")
    # (Repairing an intact index gives the same index: tests/ops/test_check.py.)


def test_garbage_config(two):
    repo, _, _, _ = two
    (repo / "config").write_bytes(b"\x00garbage")
    for args in (("check",), ("repair", "index")):
        proc = run_cli("-r", repo, *args)
        err = proc.stderr.decode()
        assert proc.returncode == 12 and err.count("\n") == 1 and "damaged or unknown repository config" in err


def test_locks(two):
    repo, _, _, _ = two
    with RepositoryLock(repo, LockMode.EXCLUSIVE, what="prune"):
        proc = run_cli("-r", repo, "check")
        assert proc.returncode == 11 and "prune" in proc.stderr.decode()
    with RepositoryLock(repo, LockMode.SHARED, what="restore"):
        check_clean(repo)  # check shares the repository
        proc = run_cli("-r", repo, "repair", "index")
        assert proc.returncode == 11 and "locked" in proc.stderr.decode()


def test_check_while_snapshots_commit(tmp_path):
    """check holds only a shared lock: commits running meanwhile must never make it report a problem."""
    repo = tmp_path / "repo"
    assert run_cli("-r", repo, "init", "--chunk-size", "1024", "--pack-size", str(1 << 16)).returncode == 0
    image = tmp_path / "big.img"
    image.write_bytes(det_bytes(8, 8 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "snapshot", str(image)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = 0
    try:
        while proc.poll() is None or runs == 0:
            with Repository.open(repo, LockMode.SHARED) as r:
                report = check(r)
            assert report.ok, report.findings  # orphan-pack hints are expected: packs not yet committed
            runs += 1
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0 and runs >= 2
    check_clean(repo, "--read-data")


def test_kill_9_during_repair(tmp_path):
    """A repair killed at any point leaves a repository that the next repair rebuilds."""
    repo = tmp_path / "repo"
    images = {}
    with small_repo(repo) as r:  # many small packs: one index transaction each makes the rebuild last
        for i in range(4):
            image = tmp_path / f"{i}.img"
            image.write_bytes(det_bytes(50 + i, 2 << 20))
            images[take_snapshot(r, str(image)).record.hex_id] = image.read_bytes()
    rng = random.Random(99)
    started = time.monotonic()
    assert run_cli("-r", repo, "repair", "index").returncode == 0
    duration = time.monotonic() - started
    startup = 0.4  # interpreter and imports: nothing to kill yet
    outcomes = set()
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "repair", "index"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(min(startup, duration / 2), duration))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        try:
            with Repository.open(repo) as r:
                # An index, old or new (the same snapshots) ...
                assert sorted(s.hex_id for s in r.snapshots()) == sorted(images)
                outcomes.add("index")
        except IntegrityError as exc:
            # ... or none, with the message that says what to do (never an empty repository).
            assert "repair index" in str(exc)
            outcomes.add("none")
    assert run_cli("-r", repo, "repair", "index").returncode == 0
    assert os.listdir(repo / "tmp") == []
    with Repository.open(repo) as r:
        report = check(r, 1.0)
        assert report.ok and report.hints == [], (report.findings, report.hints)
        for sid, data in images.items():
            out = tmp_path / "out.img"
            restore(r, sid, str(out), force=True)
            assert out.read_bytes() == data
