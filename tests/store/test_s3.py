"""What only the S3 store has (the rest is the contract suite, tests/store/test_contract.py): its spec and
locations, errors from an unreachable server, and the lock objects under ``locks/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dedupimg.core.errors import RepositoryLocked, UsageError
from dedupimg.store import open_store
from dedupimg.store.base import StoreError
from dedupimg.store.lock import LockMode
from dedupimg.store.s3 import LOCK_PREFIX, LOCK_STALE_SECONDS, S3Store
from tests.helpers import ROOT


@pytest.fixture
def s3(s3_server: Any, s3_credentials: None) -> Iterator[S3Store]:
    store = S3Store(s3_server.endpoint, s3_server.bucket, f"s3-only/{os.getpid()}-{uuid.uuid4().hex[:12]}")
    yield store
    store.delete(_everything(store, ""))  # leave nothing in a shared bucket (DEDUPIMG_TEST_S3 may be a real one)
    store.close()


def _everything(store: S3Store, prefix: str) -> list[str]:
    listing = store.list(prefix)
    return [o.name for o in listing.objects] + [n for d in listing.dirs for n in _everything(store, d + "/")]


def test_spec_and_location(s3: S3Store, s3_server: Any):
    spec = s3.spec()
    assert spec == {"kind": "s3", "endpoint": s3_server.endpoint, "bucket": s3_server.bucket,
                    "prefix": s3.prefix, "region": s3.region}
    assert not any(os.environ.get(k, "\0") in spec.values() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    assert s3.location("packs/ab/x.pack") == f"s3:{s3_server.endpoint}/{s3_server.bucket}/{s3.prefix}/packs/ab/x.pack"
    assert isinstance(open_store(spec), S3Store)


def test_bad_endpoints_and_buckets_are_usage_errors():
    with pytest.raises(UsageError):
        S3Store("ftp://host", "bucket")
    with pytest.raises(UsageError):
        S3Store("http://host:1", "ab")


@pytest.mark.slow  # obstore retries with backoff first: about 2 s
def test_an_unreachable_server_is_one_line_store_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = S3Store("http://127.0.0.1:9", "bucket")  # port 9 (discard): nothing listens on loopback
    with pytest.raises(StoreError) as info:
        store.size("packs/x")
    assert info.value.exit_code == 17 and "\n" not in str(info.value)
    assert str(info.value).startswith("s3:http://127.0.0.1:9/bucket/packs/x: S3 request failed: ")


def test_a_lock_is_an_object_with_its_holder_and_release_deletes_it(s3: S3Store):
    with s3.lock(LockMode.EXCLUSIVE, what="prune"):
        [info] = s3.list(LOCK_PREFIX).objects
        assert info.name.startswith(f"{LOCK_PREFIX}exclusive-")
        record = json.loads(s3.read(info.name))
        assert record["pid"] == os.getpid() and record["mode"] == "exclusive" and record["what"] == "prune"
        assert abs(record["time"] - time.time()) < 60 and record["host"]
        with pytest.raises(RepositoryLocked, match=rf"locked by prune \(exclusive, pid {os.getpid()} on "):
            s3.lock(LockMode.SHARED, what="snapshot").acquire()
    assert s3.list(LOCK_PREFIX).objects == []  # released, and the refused attempt left nothing


def test_a_stale_lock_is_ignored_and_a_foreign_object_too(s3: S3Store):
    old = {"host": "gone", "pid": 1, "time": time.time() - LOCK_STALE_SECONDS - 60, "mode": "exclusive", "what": "x"}
    for name, data in ((f"{LOCK_PREFIX}exclusive-gone-1-0", json.dumps(old).encode()),
                       (f"{LOCK_PREFIX}not-a-lock", b"junk")):
        writer = s3.create()
        writer.write(data)
        writer.commit(name)
    with s3.lock(LockMode.EXCLUSIVE, what="prune") as held:
        assert held.locked


def test_two_exclusive_lockers_never_hold_at_once(s3: S3Store):
    """Write-then-list: of two lockers racing, at most one holds at any time, and with waiting both get it."""
    holding: list[int] = []
    overlaps: list[int] = []

    def work(i: int) -> None:
        for _ in range(3):
            with s3.lock(LockMode.EXCLUSIVE, wait=30.0, what=f"worker {i}"):
                holding.append(i)
                if len(holding) > 1:
                    overlaps.append(i)
                time.sleep(0.02)
                holding.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and s3.list(LOCK_PREFIX).objects == []


def test_a_pack_sized_object_round_trips(s3: S3Store):
    """Packs are up to 32 MiB: one commit (obstore may use a multipart upload), ranged reads across it."""
    data = os.urandom(1 << 20) * 33  # 33 MiB, cheap to make
    writer = s3.create()
    for i in range(0, len(data), 4 << 20):
        writer.write(data[i : i + (4 << 20)])
    writer.commit("packs/ab/big.pack")
    assert s3.size("packs/ab/big.pack") == len(data)
    with s3.open("packs/ab/big.pack") as reader:
        for offset in (0, (16 << 20) - 5, len(data) - 100):
            assert reader.pread(1000, offset) == data[offset : offset + 1000]
    assert s3.read("packs/ab/big.pack") == data
    assert s3.delete(["packs/ab/big.pack"]) == len(data)


def test_a_lock_held_by_another_process(s3: S3Store):
    """The lock objects work across processes (as the local flock does): a child holds EXCLUSIVE through the
    spec; the parent is refused until the child lets go."""
    code = ("import json, sys; from dedupimg.store import open_store; from dedupimg.store.lock import LockMode\n"
            "store = open_store(json.loads(sys.argv[1]))\n"
            "with store.lock(LockMode.EXCLUSIVE, what='child prune'):\n"
            "    print('held', flush=True); sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps(s3.spec())], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with pytest.raises(RepositoryLocked, match=rf"locked by child prune \(exclusive, pid {child.pid} on "):
            s3.lock(LockMode.SHARED, what="snapshot").acquire()
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        with s3.lock(LockMode.SHARED, wait=30.0, what="snapshot") as held:
            assert held.locked
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
