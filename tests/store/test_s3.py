"""What only the S3 store has (the rest is the contract suite, tests/store/test_contract.py): its spec and
locations, errors from an unreachable or stalled server, retry and timeout settings, the lock objects under
``locks/`` (refresh, lost locks, removing stale ones), and making the bucket."""

from __future__ import annotations

import calendar
import json
import os
import socket
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
from dedupimg.store import s3 as s3_module
from dedupimg.store.base import StoreError
from dedupimg.store.lock import LockMode
from dedupimg.store.s3 import LOCK_PREFIX, LOCK_STALE_SECONDS, S3Settings, S3Store
from dedupimg.store.sigv4 import sign
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
    monkeypatch.setenv("DEDUPIMG_S3_MAX_RETRIES", "1")  # the default retries a refused connection for minutes
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
                       (f"{LOCK_PREFIX}not-a-lock", b"junk"),
                       (f"{LOCK_PREFIX}exclusive-deep-1-0", b"[" * 3000 + b"]" * 3000),  # found by review
                       (f"{LOCK_PREFIX}exclusive-huge-1-0", b" " * (8 << 20) + json.dumps(old).encode())):
        writer = s3.create()
        writer.write(data)
        writer.commit(name)
    with s3.lock(LockMode.EXCLUSIVE, what="prune") as held:
        assert held.locked
    assert len(s3.list_locks()) == 1  # the stale one; the others are not lock records


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


# -- lock refresh, lost locks, unlock ---------------------------------------------------------------------


@pytest.fixture
def fast_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_module, "LOCK_REFRESH_SECONDS", 0.2)


def _write_lock(store: S3Store, name: str, stamp: float, mode: str, what: str, host: str, pid: int) -> None:
    writer = store.create()
    writer.write(json.dumps({"host": host, "pid": pid, "time": stamp, "mode": mode, "what": what}).encode())
    writer.commit(name)


def _since(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp)) + " UTC"


def _one_lock_other_than(store: S3Store, name: str, seconds: float = 10.0) -> dict[str, Any]:
    """The single lock record once a refresh has replaced ``name`` (two may show while one is replaced)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        records = store.list_locks()
        if len(records) == 1 and records[0]["name"] != name:
            return records[0]
        time.sleep(0.05)
    raise AssertionError(f"no refresh of {name} within {seconds} s: {store.list_locks()}")


def test_a_held_lock_is_refreshed(s3: S3Store, fast_refresh: None):
    with s3.lock(LockMode.EXCLUSIVE, what="prune") as held:
        [first] = s3.list_locks()
        later = _one_lock_other_than(s3, first["name"])
        assert later["time"] > first["time"] and not later["stale"]
        assert (later["what"], later["mode"], later["pid"]) == ("prune", "exclusive", os.getpid())
        assert later["name"].startswith(f"{LOCK_PREFIX}exclusive-")
        held.check()
        assert held.locked
    assert s3.list(LOCK_PREFIX).objects == []  # release stopped the refreshing and deleted the object


def test_a_failed_refresh_is_tried_again(s3: S3Store, fast_refresh: None, monkeypatch: pytest.MonkeyPatch):
    real = s3._put
    calls: list[str] = []

    def flaky(name: str, data: bytes) -> None:
        calls.append(name)
        if len(calls) <= 2:
            raise StoreError(s3.location(name), "S3 request failed: connection reset")
        real(name, data)

    with s3.lock(LockMode.EXCLUSIVE, what="prune") as held:
        [first] = s3.list_locks()
        monkeypatch.setattr(s3, "_put", flaky)
        later = _one_lock_other_than(s3, first["name"])
        assert len(calls) >= 3 and later["name"] in calls[2:]  # written by the first attempt that worked on
        held.check()
    assert s3.list(LOCK_PREFIX).objects == []  # nothing left by the failed attempts either


def test_a_lock_not_refreshed_in_time_is_lost(s3: S3Store, fast_refresh: None, monkeypatch: pytest.MonkeyPatch):
    """Others treat a lock older than LOCK_STALE_SECONDS as stale, so its holder must not count on it then."""
    monkeypatch.setattr(s3_module, "LOCK_STALE_SECONDS", 0.6)
    with s3.lock(LockMode.EXCLUSIVE, what="prune") as held:

        def down(name: str, data: bytes) -> None:
            raise StoreError(s3.location(name), "S3 request failed: connection refused")

        monkeypatch.setattr(s3, "_put", down)
        time.sleep(0.8)
        with pytest.raises(RepositoryLocked, match=r"lock of prune on .* was lost \(not refreshed for 0.4 s"):
            held.check()
        assert not held.locked
    assert s3.list(LOCK_PREFIX).objects == []


@pytest.mark.parametrize("clock", [0, 1], ids=["suspended", "wall-clock-ahead"])
def test_a_refresh_does_not_revive_a_lock_others_may_have_ignored(s3: S3Store, monkeypatch: pytest.MonkeyPatch,
                                                                   clock: int):
    """Found by review: a holder asleep (suspend: CLOCK_MONOTONIC stands still) or paused past the 30 minutes
    after which other hosts ignore its lock object found that object still there and refreshed it, while a
    prune elsewhere may have taken the EXCLUSIVE lock meanwhile. Its lock is lost instead, by either clock."""
    real = s3_module._clocks
    with s3.lock(LockMode.SHARED, what="snapshot") as held:
        held.check()
        later = LOCK_STALE_SECONDS + 1

        def asleep() -> tuple[float, float]:
            now = list(real())
            now[clock] += later
            return now[0], now[1]

        monkeypatch.setattr(s3_module, "_clocks", asleep)
        with pytest.raises(RepositoryLocked, match=r"lock of snapshot on .* was lost \(not refreshed for 20 min"):
            held.refresh()
        assert not held.locked
        with pytest.raises(RepositoryLocked, match="was lost"):
            held.check()
    assert s3.list(LOCK_PREFIX).objects == []


def test_a_lock_removed_by_unlock_is_lost(s3: S3Store):
    """`unlock --remove-all` from another host: the holder's check() (prune, before deleting) refuses."""
    other = S3Store(s3.endpoint, s3.bucket, s3.prefix)
    with s3.lock(LockMode.EXCLUSIVE, what="prune") as held:
        held.check()
        assert other.remove_locks(False) == []  # not stale
        [removed] = other.remove_locks(True)
        assert removed.startswith(f"exclusive lock of prune, pid {os.getpid()} on {socket.gethostname()}, since ")
        with pytest.raises(RepositoryLocked, match=r"exclusive lock of prune on s3:.* was lost \(its lock object"):
            held.check()
        assert not held.locked
        with pytest.raises(RepositoryLocked, match="was lost"):
            held.check()
    assert s3.list(LOCK_PREFIX).objects == []


def test_the_refreshing_thread_notices_a_removed_lock(s3: S3Store, fast_refresh: None):
    other = S3Store(s3.endpoint, s3.bucket, s3.prefix)
    with s3.lock(LockMode.SHARED, what="snapshot") as held:
        deadline = time.monotonic() + 10
        while held.locked and time.monotonic() < deadline:  # a removal racing with a refresh may miss the new one
            other.remove_locks(True)
            time.sleep(0.1)
        assert not held.locked
        with pytest.raises(RepositoryLocked, match="was lost"):
            held.check()
    assert s3.list(LOCK_PREFIX).objects == []


def test_remove_locks_removes_stale_ones_or_all(s3: S3Store):
    old, fresh = time.time() - LOCK_STALE_SECONDS - 60, time.time() - 10
    _write_lock(s3, f"{LOCK_PREFIX}exclusive-hostA-123-0", old, "exclusive", "prune", "hostA", 123)
    _write_lock(s3, f"{LOCK_PREFIX}shared-hostB-7-0", fresh, "shared", "snapshot", "hostB", 7)
    writer = s3.create()
    writer.write(b"junk")
    writer.commit(f"{LOCK_PREFIX}not-a-lock")
    assert [(r["what"], r["stale"]) for r in s3.list_locks()] == [("prune", True), ("snapshot", False)]
    assert s3.remove_locks(False) == [f"exclusive lock of prune, pid 123 on hostA, since {_since(old)}"]
    assert [o.name for o in s3.list(LOCK_PREFIX).objects] == [f"{LOCK_PREFIX}not-a-lock",
                                                              f"{LOCK_PREFIX}shared-hostB-7-0"]
    _write_lock(s3, f"{LOCK_PREFIX}exclusive-hostA-123-0", old, "exclusive", "prune", "hostA", 123)
    assert s3.remove_locks(True) == [f"exclusive lock of prune, pid 123 on hostA, since {_since(old)}",
                                     f"shared lock of snapshot, pid 7 on hostB, since {_since(fresh)}"]
    assert [o.name for o in s3.list(LOCK_PREFIX).objects] == [f"{LOCK_PREFIX}not-a-lock"]  # not a lock: left


# -- buckets ----------------------------------------------------------------------------------------------


def test_create_bucket(s3_server: Any, s3_credentials: None, monkeypatch: pytest.MonkeyPatch):
    """init's call: a bucket that does not exist is made (a signed PUT), then objects go in; twice is fine, and so
    is a bucket someone made between our HEAD and our PUT (409)."""
    store = S3Store(s3_server.endpoint, f"dedupimg-new-{uuid.uuid4().hex[:16]}", "repo")
    assert store.bucket_exists() is False
    try:
        assert store.create_bucket() is True
        assert store.bucket_exists() is True
        assert store.create_bucket() is False
        monkeypatch.setattr(store, "bucket_exists", lambda: False)
        assert store.create_bucket() is False  # 409 BucketAlreadyOwnedByYou
        writer = store.create()
        writer.write(b"config")
        writer.commit("config")
        assert S3Store(s3_server.endpoint, store.bucket, "repo").read("config") == b"config"
    finally:
        store.delete(_everything(store, ""))
        store._bucket_request("DELETE")


def test_create_bucket_outside_us_east_1(s3_server: Any, s3_credentials: None):
    """A region other than us-east-1 sends a CreateBucketConfiguration naming it (LocationConstraint)."""
    store = S3Store(s3_server.endpoint, f"dedupimg-new-{uuid.uuid4().hex[:16]}", "", region="eu-west-1")
    try:
        assert store.create_bucket() is True
        assert store.bucket_exists() is True
    finally:
        store._bucket_request("DELETE")


def test_sigv4_signature():
    """Compared with botocore's S3SigV4Auth for the same request (computed once; botocore is no dependency)."""
    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}
    now = calendar.timegm((2026, 11, 26, 8, 59, 16, 0, 0, 0))
    body = b"<CreateBucketConfiguration/>"
    scope = "Credential=AKIDEXAMPLE/20261126/eu-west-1/s3/aws4_request"
    headers = sign("PUT", "http://127.0.0.1:8333/new-bucket", "eu-west-1", body, now=now, env=env)
    assert headers["x-amz-date"] == "20261126T085916Z" and headers["host"] == "127.0.0.1:8333"
    assert headers["authorization"] == (
        f"AWS4-HMAC-SHA256 {scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, "
        "Signature=e7684ea4b2ececb65fcafbf21be7b61b8425a005553b5acfa5312c4bf028dfc5")
    headers = sign("PUT", "http://127.0.0.1:8333/new-bucket", "eu-west-1", body, now=now,
                   env={**env, "AWS_SESSION_TOKEN": "token"})
    assert headers["x-amz-security-token"] == "token" and headers["authorization"] == (
        f"AWS4-HMAC-SHA256 {scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, "
        "Signature=99f92dae32dfdf26e3b5c272cb8437a735719d7c6091550ec08e3d08cf2185d4")
    assert "authorization" not in sign("PUT", "http://h/b", "us-east-1", env={})  # no credentials: unsigned


# -- retries and timeouts ---------------------------------------------------------------------------------


def test_retry_and_timeout_settings_come_from_the_environment():
    assert S3Settings.from_env({}) == S3Settings(max_retries=30, retry_timeout=180.0, timeout=60.0,
                                                 connect_timeout=5.0)
    env = {"DEDUPIMG_S3_MAX_RETRIES": "3", "DEDUPIMG_S3_RETRY_TIMEOUT": "20", "DEDUPIMG_S3_TIMEOUT": "1.5",
           "DEDUPIMG_S3_CONNECT_TIMEOUT": " 2 "}
    assert S3Settings.from_env(env) == S3Settings(max_retries=3, retry_timeout=20.0, timeout=1.5, connect_timeout=2.0)


@pytest.mark.parametrize(("var", "value"), [("DEDUPIMG_S3_MAX_RETRIES", "-1"), ("DEDUPIMG_S3_MAX_RETRIES", "2.5"),
                                            ("DEDUPIMG_S3_RETRY_TIMEOUT", "inf"), ("DEDUPIMG_S3_TIMEOUT", "0"),
                                            ("DEDUPIMG_S3_TIMEOUT", "1m"), ("DEDUPIMG_S3_CONNECT_TIMEOUT", "nan")])
def test_a_bad_setting_is_a_one_line_usage_error(monkeypatch: pytest.MonkeyPatch, var: str, value: str):
    monkeypatch.setenv(var, value)
    with pytest.raises(UsageError) as info:
        S3Store("http://127.0.0.1:9", "bucket")
    assert str(info.value).startswith(f"{var}={value!r}: expected ") and "\n" not in str(info.value)


@pytest.mark.slow  # three attempts of 0.5 s each, with backoff between them
def test_a_stalled_server_times_out_and_is_retried(monkeypatch: pytest.MonkeyPatch):
    """A server that accepts the connection and never answers: each attempt gives up after DEDUPIMG_S3_TIMEOUT,
    DEDUPIMG_S3_MAX_RETRIES more are made (a new connection each), then one line of StoreError."""
    for var, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"), ("DEDUPIMG_S3_TIMEOUT", "0.5"),
                       ("DEDUPIMG_S3_MAX_RETRIES", "2")):
        monkeypatch.setenv(var, value)
    accepted: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.settimeout(0.1)

        def accept() -> None:
            while server.fileno() >= 0:
                try:
                    accepted.append(server.accept()[0])
                except OSError:
                    continue

        threading.Thread(target=accept, daemon=True).start()
        store = S3Store(f"http://127.0.0.1:{server.getsockname()[1]}", "bucket")
        for call in (lambda: store.size("packs/x"), store.create_bucket):
            accepted.clear()
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                call()
            assert 1.5 <= time.monotonic() - started < 10 and len(accepted) == 3
            assert "\n" not in str(info.value) and "2 retries" in str(info.value)
        for conn in accepted:
            conn.close()


@pytest.mark.parametrize("location", ["s3:http://127.0.0.1:99999/bkt", "s3:http://127.0.0.1:abc/bkt",
                                      "s3:http://[::1/bkt", "s3:http://127.0.0.1:0/bkt"])
def test_a_bad_port_or_host_is_a_usage_error(location: str):
    """Found by review: such a port reached object_store, which panicked (a 164-line traceback)."""
    from dedupimg.store import location_spec

    with pytest.raises(UsageError, match="port from 1 to 65535"):
        location_spec(location)
    assert location_spec("s3:http://[::1]:8333/b")["endpoint"] == "http://[::1]:8333"
