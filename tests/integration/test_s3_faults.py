"""Faults while a snapshot writes to S3 (issue 13 §2), with real processes and a real SeaweedFS.

The client killed mid-upload, the server killed and restarted mid-snapshot, 5xx answers and a server gone for
longer than the retries last (injected by tests/faultproxy.py between client and server). Whatever happens:
a snapshot is listed only when it restores, check is clean afterwards, and prune removes what a failed run
left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from dedupimg.store import location_spec
from dedupimg.store.s3 import S3Store
from tests.faultproxy import FaultProxy
from tests.helpers import cli_env, det_bytes, fails, ok, run_cli
from tests.s3server import BUCKET

pytestmark = pytest.mark.slow
PACK = 1 << 20  # small packs: many uploads, so that a fault lands between two of them


def store_of(location: str) -> S3Store:
    spec = location_spec(location)
    return S3Store(spec["endpoint"], spec["bucket"], spec["prefix"])


def packs_in(location: str) -> int:
    store = store_of(location)
    return sum(len(store.list(f"packs/{d.rsplit('/', 1)[-1]}/").objects) for d in store.list("packs/").dirs)


def snapshot_ids(location: str, env: dict[str, str]) -> list[str]:
    return [s["id"] for s in json.loads(ok(run_cli("-r", location, "snapshots", "--json", env=env)))]


def start_snapshot(location: str, image: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", location, "snapshot", str(image), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(**env))


def wait_packs(location: str, more_than: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while packs_in(location) <= more_than:
        assert proc.poll() is None, "the snapshot ended before the fault: use a larger image"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def setup_repo(location: str, tmp_path: Path, env: dict[str, str]) -> tuple[str, bytes, Path]:
    """A repository with one small snapshot, and a large image for the snapshot the fault hits."""
    ok(run_cli("-r", location, "init", "--chunk-size", "16384", "--pack-size", str(PACK), env=env))
    first = det_bytes(1, 2 << 20)
    (tmp_path / "first.img").write_bytes(first)
    first_id = json.loads(ok(run_cli("-r", location, "snapshot", tmp_path / "first.img", "--json", env=env)))["id"]
    big = tmp_path / "big.img"
    big.write_bytes(det_bytes(2, 96 << 20))
    return first_id, first, big


def restores(location: str, snap: str, data: bytes, tmp_path: Path, env: dict[str, str]) -> None:
    target = tmp_path / f"r-{uuid.uuid4().hex[:8]}.img"
    ok(run_cli("-r", location, "restore", snap, target, env=env))
    assert target.read_bytes() == data
    target.unlink()


def test_client_killed_mid_upload(s3_server: Any, s3_credentials: None, tmp_path: Path) -> None:
    location = f"s3:{s3_server.endpoint}/{s3_server.bucket}/kill-{uuid.uuid4().hex[:12]}"
    env = {"DEDUPIMG_CACHE_DIR": str(tmp_path / "cache")}
    first_id, first, big = setup_repo(location, tmp_path, env)
    before = packs_in(location)
    proc = start_snapshot(location, big, env)
    wait_packs(location, before + 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert snapshot_ids(location, env) == [first_id]
    ok(run_cli("-r", location, "check", env=env))
    # the killed process's lock object is its host's and its pid is gone: not in prune's way
    out = ok(run_cli("-r", location, "prune", env=env))
    assert packs_in(location) == before, out  # what the killed run uploaded is gone again
    ok(run_cli("-r", location, "check", "--read-data", env=env))
    restores(location, first_id, first, tmp_path, env)
    again = json.loads(ok(run_cli("-r", location, "snapshot", big, "--json", env=env)))["id"]
    restores(location, again, big.read_bytes(), tmp_path, env)


def test_server_killed_and_restarted_mid_snapshot(private_s3: Any, tmp_path: Path) -> None:
    location = f"s3:{private_s3.endpoint}/{BUCKET}/restart"
    env = {"DEDUPIMG_CACHE_DIR": str(tmp_path / "cache"), "DEDUPIMG_S3_RETRY_TIMEOUT": "120"}
    first_id, first, big = setup_repo(location, tmp_path, env)
    before = packs_in(location)
    proc = start_snapshot(location, big, env)
    wait_packs(location, before + 2, proc)
    private_s3.stop()  # kill -9 of the server, mid-upload
    time.sleep(2)
    private_s3.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    snap = json.loads(out)["id"]
    assert snapshot_ids(location, env) == [first_id, snap]
    restores(location, snap, big.read_bytes(), tmp_path, env)
    ok(run_cli("-r", location, "check", "--read-data", env=env))


def test_server_gone_longer_than_retries(private_s3: Any, tmp_path: Path) -> None:
    proxy = FaultProxy.to(private_s3.endpoint)
    try:
        location = f"s3:{proxy.endpoint}/{BUCKET}/gone"
        env = {"DEDUPIMG_CACHE_DIR": str(tmp_path / "cache"), "DEDUPIMG_S3_MAX_RETRIES": "2",
               "DEDUPIMG_S3_RETRY_TIMEOUT": "3"}
        first_id, first, big = setup_repo(location, tmp_path, env)
        before = packs_in(location)
        proc = start_snapshot(location, big, env)
        wait_packs(location, before + 2, proc)
        proxy.down()
        started = time.monotonic()
        out, err = proc.communicate(timeout=120)
        assert time.monotonic() - started < 60
        assert proc.returncode == 17, (proc.returncode, err.decode())
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err.decode() and "S3" in lines[0], err.decode()
        proxy.passthrough()
        assert snapshot_ids(location, env) == [first_id]
        ok(run_cli("-r", location, "check", env=env))
        ok(run_cli("-r", location, "prune", env=env))
        assert packs_in(location) == before
        restores(location, first_id, first, tmp_path, env)
    finally:
        proxy.close()


def test_5xx_answers_are_retried(s3_server: Any, s3_credentials: None, tmp_path: Path) -> None:
    with FaultProxy.to(s3_server.endpoint) as proxy:
        location = f"s3:{proxy.endpoint}/{s3_server.bucket}/5xx-{uuid.uuid4().hex[:12]}"
        env = {"DEDUPIMG_CACHE_DIR": str(tmp_path / "cache")}
        ok(run_cli("-r", location, "init", "--pack-size", str(PACK), env=env))
        data = det_bytes(3, 8 << 20)
        (tmp_path / "d.img").write_bytes(data)
        proxy.http_5xx(503, count=6)
        snap = json.loads(ok(run_cli("-r", location, "snapshot", tmp_path / "d.img", "--json", env=env)))["id"]
        assert proxy.errors == 6
        proxy.http_5xx(500, count=4)
        restores(location, snap, data, tmp_path, env)
        assert proxy.errors == 10
        # a server that answers 503 to everything: a clear error once the retries are spent
        proxy.http_5xx(503, count=None)
        fails(run_cli("-r", location, "snapshots", env={**env, "DEDUPIMG_S3_MAX_RETRIES": "1",
                                                         "DEDUPIMG_S3_RETRY_TIMEOUT": "2"}), 17, "S3")
        proxy.passthrough()
        ok(run_cli("-r", location, "check", "--read-data", env=env))
    assert os.path.isdir(tmp_path / "cache")
