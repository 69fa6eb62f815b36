"""The S3 store against network and server faults (issue 13 §2): a real server (SeaweedFS, the session's
``s3_server``) behind tests/faultproxy.py's TCP proxy, which answers 503s itself, resets connections, cuts
them mid-upload or mid-download and stalls them. What must hold: a passing fault is retried away (with
backoff, by obstore) and the operation succeeds; a lasting one ends in StoreError (exit 17, one line) in a
bounded time when retries are limited (DEDUPIMG_S3_MAX_RETRIES, DEDUPIMG_S3_RETRY_TIMEOUT, DEDUPIMG_S3_TIMEOUT
read when an S3Store is made); and a name never shows a partial object."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dedupimg.store.base import ObjectMissing, StoreError
from dedupimg.store.s3 import S3Store
from tests.faultproxy import FaultProxy

NAME = "packs/ab/one.pack"


@pytest.fixture
def prefix() -> str:
    return f"s3-faults/{os.getpid()}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def direct(s3_server: Any, s3_credentials: None, prefix: str) -> Iterator[S3Store]:
    """The same prefix without the proxy: to check what the server really holds, and to clean up."""
    store = S3Store(s3_server.endpoint, s3_server.bucket, prefix)
    yield store
    store.delete(_everything(store, ""))
    store.close()


@pytest.fixture
def proxy(s3_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy.to(s3_server.endpoint) as p:
        yield p


@pytest.fixture
def limited(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few retries, so that a lasting fault fails in seconds (the store reads these when it is made)."""
    monkeypatch.setenv("DEDUPIMG_S3_MAX_RETRIES", "2")
    monkeypatch.setenv("DEDUPIMG_S3_RETRY_TIMEOUT", "5")


def _everything(store: S3Store, prefix: str) -> list[str]:
    listing = store.list(prefix)
    return [o.name for o in listing.objects] + [n for d in listing.dirs for n in _everything(store, d + "/")]


def _through(proxy: FaultProxy, s3_server: Any, prefix: str) -> S3Store:
    return S3Store(proxy.endpoint, s3_server.bucket, prefix)


def _put(store: S3Store, name: str, data: bytes) -> None:
    writer = store.create()
    writer.write(data)
    writer.commit(name)


def _one_line_store_error(exc: BaseException, store: S3Store, name: str) -> None:
    assert isinstance(exc, StoreError) and not isinstance(exc, ObjectMissing), repr(exc)
    assert exc.exit_code == 17
    assert "\n" not in str(exc) and str(exc).startswith(store.location(name) + ": S3 request failed: "), str(exc)


def _whole_or_missing(direct: S3Store, name: str, data: bytes) -> None:
    """What the server shows under ``name``: the whole object or nothing, never a part."""
    try:
        got = direct.read(name)
    except ObjectMissing:
        assert name not in [o.name for o in direct.list(name.rpartition("/")[0] + "/").objects]
        return
    assert len(got) == len(data) and got == data


@pytest.mark.slow  # obstore's backoff between retries: about 1.5 s
def test_a_few_503s_are_retried_and_every_call_succeeds(proxy: FaultProxy, s3_server: Any, prefix: str,
                                                        s3_credentials: None, direct: S3Store):
    store = _through(proxy, s3_server, prefix)
    data = os.urandom(100_000)
    calls: list[tuple[str, Callable[[], object], object]] = [
        ("put", lambda: _put(store, NAME, data), None),
        ("read", lambda: store.read(NAME), data),
        ("range", lambda: store.read(NAME, 1000, 10), data[1000:1010]),
        ("size", lambda: store.size(NAME), len(data)),
        ("list", lambda: [(o.name, o.size) for o in store.list("packs/ab/").objects], [(NAME, len(data))]),
        ("delete", lambda: store.delete([NAME]), len(data)),
    ]
    for i, (what, call, expected) in enumerate(calls):
        before = proxy.errors
        proxy.http_5xx(500 if i % 2 else 503, count=2)
        assert call() == expected, what
        assert proxy.errors - before == 2 and proxy.mode == "pass", what  # both answered, then retried
    with pytest.raises(ObjectMissing):
        direct.read(NAME)


@pytest.mark.parametrize("what", ["put", "read", "list", "delete"])
def test_a_lasting_503_is_a_one_line_store_error_in_bounded_time(what: str, proxy: FaultProxy, s3_server: Any,
                                                                 prefix: str, s3_credentials: None,
                                                                 direct: S3Store, limited: None):
    _put(direct, NAME, b"x" * 1000)
    store = _through(proxy, s3_server, prefix)
    call: Callable[[], object] = {"put": lambda: _put(store, NAME, b"y" * 1000), "read": lambda: store.read(NAME),
                                  "list": lambda: store.list("packs/ab/"), "delete": lambda: store.delete([NAME])}[what]
    proxy.http_5xx(503, count=None)
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        call()
    elapsed = time.monotonic() - start
    _one_line_store_error(info.value, store, "packs/ab/" if what == "list" else NAME)
    assert "503" in str(info.value)
    assert proxy.errors == 3, proxy.stats()  # the first try and DEDUPIMG_S3_MAX_RETRIES=2 retries
    assert elapsed < 5, elapsed
    assert direct.read(NAME) == b"x" * 1000  # nothing reached the server


def test_refused_connections_are_a_one_line_store_error_in_bounded_time(proxy: FaultProxy, s3_server: Any,
                                                                        prefix: str, s3_credentials: None,
                                                                        direct: S3Store, limited: None):
    store = _through(proxy, s3_server, prefix)
    proxy.refuse()
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        _put(store, NAME, b"z" * 1000)
    elapsed = time.monotonic() - start
    _one_line_store_error(info.value, store, NAME)
    assert 1 <= proxy.refused <= 3 and proxy.bytes_up == 0, proxy.stats()  # at most 2 retries; nothing got through
    assert elapsed < 5, elapsed
    with pytest.raises(ObjectMissing):
        direct.read(NAME)


@pytest.mark.parametrize("size", [1 << 20, 7 << 20], ids=["one-put", "multipart"])
def test_a_connection_cut_mid_upload_is_retried_and_the_object_is_whole(size: int, proxy: FaultProxy,
                                                                       s3_server: Any, prefix: str,
                                                                       s3_credentials: None, direct: S3Store):
    store = _through(proxy, s3_server, prefix)
    data = os.urandom(size)
    proxy.drop_after(size // 3, direction="up", count=1)
    _put(store, NAME, data)  # a PUT (or part upload) of the same bytes is idempotent: retried, never an error
    assert proxy.dropped == 1 and proxy.bytes_up > size, proxy.stats()  # the cut happened, then all went up
    assert direct.read(NAME) == data


@pytest.mark.parametrize("size", [1 << 20, 7 << 20], ids=["one-put", "multipart"])
def test_uploads_cut_every_time_fail_cleanly_and_leave_no_partial_object(size: int, proxy: FaultProxy,
                                                                        s3_server: Any, prefix: str,
                                                                        s3_credentials: None, direct: S3Store,
                                                                        limited: None):
    store = _through(proxy, s3_server, prefix)
    data = os.urandom(size)
    proxy.drop_after(size // 3, direction="up", count=None)
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        _put(store, NAME, data)
    _one_line_store_error(info.value, store, NAME)
    assert time.monotonic() - start < 5
    # each request tried at most 3 times (DEDUPIMG_S3_MAX_RETRIES=2): one PUT; or create, 2 parts, complete
    assert 1 <= proxy.dropped <= (3 if size < 5 << 20 else 12), proxy.stats()
    _whole_or_missing(direct, NAME, data)
    with pytest.raises(ObjectMissing):
        direct.size(NAME)


def test_a_connection_cut_mid_download_gives_the_whole_object_or_an_error(proxy: FaultProxy, s3_server: Any,
                                                                          prefix: str, s3_credentials: None,
                                                                          direct: S3Store):
    data = os.urandom(2 << 20)
    _put(direct, NAME, data)
    store = _through(proxy, s3_server, prefix)
    for read in (lambda: store.read(NAME), lambda: store.read(NAME, 100, len(data) - 200)):
        proxy.drop_after(len(data) // 2, direction="down")
        before = proxy.dropped
        try:
            got = read()
        except StoreError as exc:
            _one_line_store_error(exc, store, NAME)
        else:
            assert len(got) in (len(data), len(data) - 200) and got in (data, data[100:-100])  # never a part
        assert proxy.dropped == before + 1, proxy.stats()


@pytest.mark.slow  # two 2 s timeouts
def test_a_stalled_request_times_out_and_is_retried(proxy: FaultProxy, s3_server: Any, prefix: str,
                                                    s3_credentials: None, direct: S3Store,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DEDUPIMG_S3_TIMEOUT", "2")
    data = os.urandom(50_000)
    _put(direct, NAME, data)
    store = _through(proxy, s3_server, prefix)
    calls: list[tuple[Callable[[], object], object]] = [(lambda: store.read(NAME), data),
                                                        (lambda: _put(store, NAME, data), None)]
    for call, expected in calls:
        proxy.stall(count=1)
        start = time.monotonic()
        before = proxy.stalled
        try:
            got = call()
        except StoreError as exc:
            pytest.fail(f"a stalled request was not retried: {exc}")
        elapsed = time.monotonic() - start
        assert proxy.stalled == before + 1, proxy.stats()
        assert 1.5 < elapsed < 10, elapsed  # waited for the 2 s timeout, then retried at once
        assert got == expected
    assert direct.read(NAME) == data


@pytest.mark.slow  # three 1 s timeouts
def test_a_lasting_stall_is_a_one_line_store_error_in_bounded_time(proxy: FaultProxy, s3_server: Any,
                                                                   prefix: str, s3_credentials: None,
                                                                   direct: S3Store, limited: None,
                                                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DEDUPIMG_S3_TIMEOUT", "1")
    store = _through(proxy, s3_server, prefix)
    proxy.stall()
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.size(NAME)
    elapsed = time.monotonic() - start
    _one_line_store_error(info.value, store, NAME)
    assert 0.9 < elapsed < 8, elapsed
    assert proxy.stalled >= 1, proxy.stats()


@pytest.mark.slow  # the server is away for 1.5 s
def test_a_server_away_for_a_while_is_waited_for(proxy: FaultProxy, s3_server: Any, prefix: str,
                                                 s3_credentials: None, direct: S3Store,
                                                 monkeypatch: pytest.MonkeyPatch):
    """The session's server must stay up for the other tests, so its going away is the proxy's: for 1.5 s it
    stops listening (a connect is refused, as when the server process is gone) and resets the open connections,
    while a put retries; then it listens again on the same port and the put gets through.

    Not refuse() (accept, then reset): obstore does not retry every reset. When hyper reports a new connection
    reset before the request went out as "connection was not ready" (Canceled), object_store classes it Unknown
    and gives up at once, retries left or not (about 1 reset in 60 here), so such a test would fail now and
    then; that is a known weakness of the store, not what this test is about."""
    monkeypatch.setenv("DEDUPIMG_S3_MAX_RETRIES", "10")
    monkeypatch.setenv("DEDUPIMG_S3_RETRY_TIMEOUT", "30")
    store = _through(proxy, s3_server, prefix)
    _put(store, "warm", b"w")  # a kept-alive connection exists when the server goes
    data = os.urandom(300_000)
    outcome: list[BaseException | None] = []

    def put() -> None:
        try:
            _put(store, NAME, data)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            outcome.append(exc)

    proxy.down()
    sent = proxy.bytes_up
    worker = threading.Thread(target=put)
    start = time.monotonic()
    worker.start()
    time.sleep(1.5)
    assert worker.is_alive() and proxy.bytes_up == sent  # still retrying: nothing got through
    proxy.passthrough()
    worker.join(timeout=30)
    elapsed = time.monotonic() - start
    assert not worker.is_alive() and outcome == [None], outcome
    assert 1.5 <= elapsed < 10, elapsed
    assert proxy.bytes_up > sent + len(data) and direct.read(NAME) == data
