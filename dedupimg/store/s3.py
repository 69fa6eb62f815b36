"""A store in an S3 bucket (any S3-compatible server: AWS, MinIO, Ceph RGW, SeaweedFS, ...), through obstore.

An object ``name`` is the key ``<prefix>/<name>`` in ``bucket``. Credentials come from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; the region from
``AWS_DEFAULT_REGION`` unless the spec names one) and never enter the spec.

Writing: a writer gathers the object in memory (packs are at most 32 MiB) and :meth:`S3Writer.commit` uploads
it with one PUT (obstore switches to a multipart upload for large ones). A PUT is atomic on S3: the key shows
the whole object or nothing. S3 has no rename, so a writer's temporary name (``tmp/<pid>-<16 hex>.tmp``) exists
in this process's memory only: ``list("tmp/")`` shows nothing, and a crash leaves nothing behind but, at most,
an unfinished multipart upload (which the server or a bucket lifecycle rule expires). A commit replaces an
object of the same name, as a local store's rename does (names are content hashes; ``repair`` may write a good
copy over a damaged one), so no conditional ``If-None-Match`` create is used for data objects.

Reading: :meth:`S3Store.open` asks the size (HEAD); each ``pread`` of its reader is one ranged GET. A reader
of an object deleted meanwhile fails (ObjectMissing) on its next read: S3 keeps no deleted object for readers.

Listing is one level with delimiter ``/``. Deleting asks each object's size first (HEAD), to return the bytes
freed, then deletes it; DELETE_THREADS objects at a time.

Retries and timeouts come from the environment (read workers inherit it), checked when a store is made:
``DEDUPIMG_S3_MAX_RETRIES`` (default 30), ``DEDUPIMG_S3_RETRY_TIMEOUT`` (seconds from a request's first attempt
after which no retry starts, default 180), ``DEDUPIMG_S3_TIMEOUT`` (seconds one attempt may take, connecting to
the last byte of the answer, default 60: a stalled connection fails then and is retried) and
``DEDUPIMG_S3_CONNECT_TIMEOUT`` (default 5). A bad value is a UsageError.

Buckets: obstore works inside a bucket; :meth:`S3Store.create_bucket` (``init``) and
:meth:`S3Store.bucket_exists` send their one request themselves, signed by :mod:`dedupimg.store.sigv4`.

Errors: a missing object is ObjectMissing, access refused PermissionDenied (exit 16), anything else (network,
5xx after obstore's retries with backoff) StoreError (exit 17) with the first line of obstore's message.

Locks: :class:`S3Lock` (see there): lock objects under ``locks/``, restic's write-then-list protocol, refreshed
while held; :meth:`S3Store.remove_locks` removes stale ones (``dedupimg unlock``) or all.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import obstore
import obstore.exceptions
from obstore.store import S3Store as _ObjectStore

from dedupimg.core.errors import PermissionDenied, RepositoryLocked, UsageError
from dedupimg.store.base import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    Listing,
    ObjectInfo,
    ObjectMissing,
    ReaderBase,
    StoreError,
    StoreSpec,
    check_name,
    check_prefix,
)
from dedupimg.store.lock import LockMode
from dedupimg.store.sigv4 import sign

T = TypeVar("T")

LOCK_PREFIX = "locks/"
LOCK_STALE_SECONDS = 30 * 60  # a lock object older than this (its "time") is stale: ignored, and removable
LOCK_REFRESH_SECONDS = 5 * 60  # a held lock's object is written again this often
LOCK_RECORD_MAX = 4096  # bytes of a lock object read; a record is far smaller
# Its holder stops counting on a lock not refreshed for this share of LOCK_STALE_SECONDS (20 of 30 minutes):
# others judge staleness by their own clocks, which may run ahead of ours.
LOCK_TRUST_SHARE = 2 / 3
LOCK_FIRST_DELAY = 0.05
LOCK_MAX_DELAY = 0.5
DELETE_THREADS = 8


@dataclass(frozen=True)
class S3Settings:
    """Retries and timeouts of every request, from the environment (:meth:`from_env`)."""

    max_retries: int = 30  # retry_timeout is what bounds the time: a server restart takes tens of seconds
    retry_timeout: float = 180.0  # seconds since a request's first attempt after which no retry starts
    timeout: float = 60.0  # seconds one attempt may take, from connecting to the answer's last byte
    connect_timeout: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field, var in (("max_retries", "DEDUPIMG_S3_MAX_RETRIES"), ("retry_timeout", "DEDUPIMG_S3_RETRY_TIMEOUT"),
                           ("timeout", "DEDUPIMG_S3_TIMEOUT"), ("connect_timeout", "DEDUPIMG_S3_CONNECT_TIMEOUT")):
            text = env.get(var, "").strip()
            if not text:
                continue
            try:
                value = int(text) if field == "max_retries" else float(text)
            except ValueError:
                value = -1
            if value < 0 or (field != "max_retries" and not 0 < value < 1e6):
                wanted = "a whole number, 0 or more" if field == "max_retries" else "a number of seconds above 0"
                raise UsageError(f"{var}={text!r}: expected {wanted}")
            values[field] = value
        return cls(**values)


def describe_lock(record: Mapping[str, Any]) -> str:
    """A lock record in words: ``exclusive lock of prune, pid 123 on hostA, since 2026-11-26 08:00:00 UTC``."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(record.get("time", 0))))
    return (f"{record.get('mode')} lock of {record.get('what') or 'a command'}, pid {record.get('pid')} on "
            f"{record.get('host')}, since {since} UTC")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _xml(body: bytes, tag: str) -> str:
    """The text of the first ``<tag>`` in an S3 error document ("" when there is none)."""
    found = re.search(rf"<{tag}>([^<]*)</{tag}>".encode(), body)
    return found.group(1).decode(errors="replace").strip() if found else ""


TRANSPORT_RETRIES = 4  # more tries for a transport error that obstore gives up on at once (below)


def _unretried_transport_error(exc: BaseException) -> bool:
    """A connection error that obstore did not retry: hyper's "connection was not ready" after a reset
    (object_store files it as an unknown kind, so it is returned at the first attempt). Every request this store
    makes is idempotent (content-named PUTs, GET, HEAD, LIST, DELETE), so trying again is safe."""
    text = str(exc)
    return isinstance(exc, obstore.exceptions.GenericError) and "retries" not in text and (
        "error sending request" in text or "connection" in text.lower() or "Canceled" in text)


def _call(where: str, fn: Callable[[], T]) -> T:
    """``fn()``, with obstore's errors turned into the store's (one line each, no traceback for the user)."""
    attempt = 0
    while True:
        try:
            return fn()
        except FileNotFoundError:
            raise ObjectMissing(where, "the pack file is missing") from None
        except (obstore.exceptions.PermissionDeniedError, obstore.exceptions.UnauthenticatedError) as exc:
            raise PermissionDenied(f"{where}: access denied by the S3 server: {_first_line(exc)}") from None
        except (obstore.exceptions.BaseError, OSError) as exc:
            attempt += 1
            if attempt < TRANSPORT_RETRIES and _unretried_transport_error(exc):
                time.sleep(0.2 * 2 ** attempt)
                continue
            raise StoreError(where, f"S3 request failed: {_first_line(exc)}") from None


def is_stale(record: dict[str, Any], now: float) -> bool:
    """A lock record is stale when it was not refreshed for LOCK_STALE_SECONDS, or when it names this host and a
    process that no longer runs here (a command killed with -9, or one that could not delete its lock because
    the server was gone: restic's rule too). Hosts are told apart by hostname: machines or containers that
    write to one repository need hostnames of their own."""
    if now - record["time"] > LOCK_STALE_SECONDS:
        return True
    if record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False


class S3Store:
    """Objects as keys under ``prefix`` in ``bucket`` at ``endpoint`` (``http://host:port`` or ``https://...``)."""

    cross_process = True

    def __init__(self, endpoint: str, bucket: str, prefix: str = "", region: str | None = None,
                 settings: S3Settings | None = None) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"S3 endpoint {endpoint!r} must start with http:// or https://")
        if len(bucket) < 3 or "/" in bucket:
            raise UsageError(f"S3 bucket name {bucket!r} is not valid")
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        self.settings = S3Settings.from_env() if settings is None else settings
        try:
            self._os = _ObjectStore(
                bucket,
                prefix=self.prefix or None,
                endpoint=self.endpoint,
                region=self.region,
                virtual_hosted_style_request=False,
                client_options={"allow_http": self.endpoint.startswith("http://"),
                                "timeout": timedelta(seconds=self.settings.timeout),
                                "connect_timeout": timedelta(seconds=self.settings.connect_timeout)},
                # Backoff from 1 s up to 15 s (with jitter), until max_retries or retry_timeout: this outlasts a
                # server restart of tens of seconds, which obstore's default (100 ms, 10 retries) gave up on in 3 s.
                retry_config={"max_retries": self.settings.max_retries,
                              "retry_timeout": timedelta(seconds=self.settings.retry_timeout),
                              "backoff": {"init_backoff": timedelta(seconds=1),
                                          "max_backoff": timedelta(seconds=15), "base": 2}},
            )
        except (obstore.exceptions.BaseError, ValueError) as exc:
            raise UsageError(f"cannot use S3 at {self.location('')}: {_first_line(exc)}") from None

    def __repr__(self) -> str:
        return f"S3Store({self.location('')!r})"

    def location(self, name: str) -> str:
        return f"s3:{self.endpoint}/{self.bucket}/" + (f"{self.prefix}/" if self.prefix else "") + name

    def spec(self) -> StoreSpec:
        return {"kind": "s3", "endpoint": self.endpoint, "bucket": self.bucket, "prefix": self.prefix,
                "region": self.region}

    @classmethod
    def from_spec(cls, spec: StoreSpec) -> S3Store:
        return cls(spec["endpoint"], spec["bucket"], spec.get("prefix", ""), spec.get("region") or None)

    def lock(self, mode: LockMode, wait: float = 0.0, what: str = "") -> S3Lock:
        return S3Lock(self, mode, wait, what)

    def list_locks(self) -> list[dict[str, Any]]:
        """The lock records under ``locks/``, each with its object's ``name`` and whether it is ``stale``."""
        now = time.time()
        found = []
        for info in self.list(LOCK_PREFIX).objects:
            record = self._lock_record(info.name)
            if record is not None:
                found.append({**record, "name": info.name, "stale": is_stale(record, now)})
        return found

    def remove_locks(self, all_locks: bool = False) -> list[str]:
        """Delete the stale lock objects (every one with ``all_locks``); what was removed, in words."""
        gone = [r for r in self.list_locks() if all_locks or r["stale"]]
        self.delete([r["name"] for r in gone])
        return [describe_lock(r) for r in gone]

    def _lock_record(self, name: str) -> dict[str, Any] | None:
        """The lock record in object ``name``; None when it is gone or not a lock record."""
        try:
            # A record is ~150 bytes: a planted object, however large or deeply nested, is just not a lock.
            record = json.loads(self.read(name, 0, LOCK_RECORD_MAX))
            record["mode"] = LockMode(record["mode"]).value
            record["time"] = float(record["time"])
        except (ObjectMissing, ValueError, KeyError, TypeError, RecursionError):
            return None
        return dict(record)

    def close(self) -> None:
        pass

    # -- the bucket ------------------------------------------------------------------------------------------

    def bucket_exists(self) -> bool:
        """Whether the bucket exists (HEAD on it); PermissionDenied when the server will not say."""
        status, body = self._bucket_request("HEAD")
        if status in (200, 404):
            return status == 200
        self._bucket_error("HEAD", status, body)

    def create_bucket(self) -> bool:
        """Make the bucket unless it exists (``init``, as restic does); True when this call made it. A bucket
        made meanwhile by someone else (409 BucketAlreadyOwnedByYou or BucketAlreadyExists) counts as there."""
        if self.bucket_exists():
            return False
        body = b""
        if self.region != "us-east-1":
            body = ('<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    f"<LocationConstraint>{self.region}</LocationConstraint></CreateBucketConfiguration>").encode()
        status, answer = self._bucket_request("PUT", body)
        if status == 200:
            return True
        if status == 409 and _xml(answer, "Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
        self._bucket_error("PUT", status, answer)

    def _bucket_request(self, method: str, body: bytes = b"") -> tuple[int, bytes]:
        """One signed request on the bucket itself, retried as obstore retries (connection errors, 5xx)."""
        url = f"{self.endpoint}/{self.bucket}"
        parts = urlsplit(url)
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        first = time.monotonic()
        for attempt in range(self.settings.max_retries + 1):
            last = attempt == self.settings.max_retries or \
                time.monotonic() - first > self.settings.retry_timeout
            client = connection(parts.netloc, timeout=self.settings.timeout)
            try:
                client.request(method, parts.path, body=body, headers=sign(method, url, self.region, body))
                response = client.getresponse()
                status, answer = response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                if last:
                    raise StoreError(f"s3:{url}", f"S3 {method} of the bucket failed after "
                                     f"{attempt} retries: {_first_line(exc)}") from None
            else:
                if status < 500 or last:
                    return status, answer
            finally:
                client.close()
            time.sleep(min(15.0, 0.1 * 2 ** attempt))
        raise AssertionError("unreachable")

    def _bucket_error(self, method: str, status: int, body: bytes) -> NoReturn:
        where = f"s3:{self.endpoint}/{self.bucket}"
        words = " ".join([f"HTTP {status}", *(w for w in (_xml(body, "Code"), _xml(body, "Message")) if w)])
        if status == 403:
            raise PermissionDenied(f"{where}: access denied by the S3 server ({method} of the bucket): {words}")
        if status == 301:
            words += f"; the bucket may be in another region than {self.region} (set AWS_DEFAULT_REGION)"
        raise StoreError(where, f"S3 {method} of the bucket failed: {words}")

    # -- writing ---------------------------------------------------------------------------------------------

    def create(self) -> S3Writer:
        return S3Writer(self)

    def _put(self, name: str, data: bytes | memoryview) -> None:
        _call(self.location(name), lambda: obstore.put(self._os, name, data, mode="overwrite"))

    def delete(self, names: Iterable[str]) -> int:
        """Each object's size (HEAD), then its DELETE; DELETE_THREADS objects at a time. The first failure
        stops the rest (objects not yet started stay) and is raised."""
        unique = list(dict.fromkeys(check_name(n) for n in names))  # a name given twice is freed once

        def one(name: str) -> int:
            try:
                size = self.size(name)
            except ObjectMissing:
                return 0
            _call(self.location(name), lambda: obstore.delete(self._os, name))
            return size

        if len(unique) <= 1:
            return sum(one(n) for n in unique)
        with ThreadPoolExecutor(min(DELETE_THREADS, len(unique)), thread_name_prefix="s3-delete") as pool:
            futures = [pool.submit(one, n) for n in unique]
            try:
                return sum(f.result() for f in futures)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _exists(self, name: str) -> bool:
        try:
            self.size(name)
        except ObjectMissing:
            return False
        return True

    # -- reading ---------------------------------------------------------------------------------------------

    def open(self, name: str, where: str | None = None) -> S3Reader:
        where = self.location(name) if where is None else where
        return S3Reader(self, name, self.size(name, where), where)

    def _range(self, name: str, start: int, end: int, where: str) -> bytes:
        return bytes(self._range_view(name, start, end, where))

    def _range_view(self, name: str, start: int, end: int, where: str) -> memoryview:
        """The bytes as obstore received them, not copied (a copy of every run read cost a restore ~10%)."""
        if end <= start:
            return memoryview(b"")
        return memoryview(_call(where, lambda: obstore.get_range(self._os, name, start=start, end=end)))

    def read(self, name: str, offset: int = 0, length: int = -1, where: str | None = None) -> bytes:
        check_name(name)
        where = self.location(name) if where is None else where
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if offset == 0 and length < 0:
            return bytes(_call(where, lambda: obstore.get(self._os, name).bytes()))
        size = self.size(name, where)
        end = size if length < 0 else min(size, offset + length)
        return self._range(name, offset, end, where)

    def size(self, name: str, where: str | None = None) -> int:
        check_name(name)
        where = self.location(name) if where is None else where
        return int(_call(where, lambda: obstore.head(self._os, name))["size"])

    def list(self, prefix: str) -> Listing:
        check_prefix(prefix)
        found = _call(self.location(prefix), lambda: obstore.list_with_delimiter(self._os, prefix or None))
        objects = [ObjectInfo(o["path"], int(o["size"])) for o in found["objects"]
                   if o["path"].startswith(prefix) and "/" not in o["path"][len(prefix):]]
        dirs = [d.rstrip("/") for d in found["common_prefixes"]]
        return Listing(sorted(objects, key=lambda o: o.name), sorted(dirs))


class S3Reader(ReaderBase):
    """An object opened for range reads: each ``pread`` is one ranged GET (failures are OSError, as a disk's)."""

    def __init__(self, store: S3Store, name: str, size: int, where: str) -> None:
        self._store, self._name = store, name
        self.size = size
        self.where = where

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.pread_view(length, offset))

    def pread_view(self, length: int, offset: int) -> memoryview:
        """:meth:`pread` without a copy, for a reader that only parses the bytes (pack.read_blob_run)."""
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        end = min(self.size, offset + length)
        try:
            return self._store._range_view(self._name, offset, end, self.where)
        except ObjectMissing as exc:
            raise OSError(errno.ENOENT, f"the object is gone: {exc.reason}") from None
        except StoreError as exc:
            raise OSError(errno.EIO, exc.reason) from None


class S3Writer:
    """A new object gathered in memory; its temporary name is never an S3 key (S3 has no rename).

    One growing buffer, handed to obstore as it is: no list of pieces joined into a second copy at commit
    (a snapshot keeps several packs of up to 32 MiB uploading at once, so copies count)."""

    def __init__(self, store: S3Store) -> None:
        self._store = store
        self.temp_name = f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(8).hex()}{TEMP_SUFFIX}"
        self._buf: bytearray | None = bytearray()

    def write(self, data: bytes) -> None:
        if self._buf is None:
            raise StoreError(self.temp_name, "the writer was committed or aborted already")
        self._buf += data

    def commit(self, name: str) -> None:
        check_name(name)
        if self._buf is None:
            raise StoreError(self.temp_name, "the writer was committed or aborted already")
        self._store._put(name, memoryview(self._buf))
        self._buf = None

    def abort(self) -> None:
        self._buf = None


def _clocks() -> tuple[float, float]:
    """Two clocks for the age of our lock object: one that counts time suspended (CLOCK_BOOTTIME; a process
    stopped or a laptop asleep does not refresh, and CLOCK_MONOTONIC stands still in suspend) and the wall
    clock, by which other hosts judge staleness (a paused VM's may jump ahead when it resumes)."""
    boot = time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()
    return boot, time.time()


class S3Lock:
    """The repository lock as objects under ``locks/`` (restic's protocol, for servers with or without
    conditional writes): write this holder's lock object (``locks/<mode>-<host>-<pid>-<16 hex>``, JSON: host,
    pid, time, mode, what) under a name nobody else uses, then list ``locks/``. Any other lock object that is
    not stale and conflicts (either of the two EXCLUSIVE) means: delete ours, wait a little (20% jitter) and try
    again until ``wait`` runs out, then RepositoryLocked (exit 11) naming a holder. Two writers that both see
    each other both back off, so at least one of them never holds a lock the other conflicts with.

    A lock object whose ``time`` is older than LOCK_STALE_SECONDS (30 minutes) is stale and ignored. While held,
    a daemon thread refreshes the lock every LOCK_REFRESH_SECONDS (5 minutes; :meth:`refresh`): it writes a new
    lock object with the time now, checks that the old one is still there and deletes it. A refresh that fails
    (network) is tried again at the next tick. The lock is lost when its object is found gone (``dedupimg
    unlock --remove-all``, or another host removed it as stale) or when it has not been refreshed for 20 of
    those 30 minutes (LOCK_TRUST_SHARE), by a clock that counts time suspended or by the wall clock (others
    may soon treat it as stale, and a refresh must not revive a lock another host has ignored meanwhile);
    :meth:`check` raises RepositoryLocked then, so a command about to delete (prune) or to list a new snapshot
    stops. An unreadable or vanished lock object of another holder counts as not
    there. release() stops the refreshing and deletes the object; a process killed while holding a lock leaves
    it until it goes stale (or ``S3Store.remove_locks``)."""

    def __init__(self, store: S3Store, mode: LockMode, wait: float, what: str) -> None:
        self._store, self.mode, self.wait, self.what = store, mode, wait, what
        self._name: str | None = None  # our lock object while held
        self._spare: set[str] = set()  # other lock objects of ours a refresh left (deleted later, or by release)
        self._lost: str | None = None  # why the lock was lost
        self._written = (0.0, 0.0)  # _clocks() before our lock object was last written
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._mutex = threading.Lock()  # one of acquire, refresh, check, release at a time

    @property
    def locked(self) -> bool:
        """Held: acquired, not released, not known to be lost."""
        return self._name is not None and self._lost is None

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                           "mode": self.mode.value, "what": self.what}).encode()

    def _new_name(self) -> str:
        host = socket.gethostname().replace("/", "_") or "host"
        return f"{LOCK_PREFIX}{self.mode.value}-{host}-{os.getpid()}-{os.urandom(8).hex()}"

    def _conflict(self, mine: str) -> dict[str, Any] | None:
        """A live lock object that conflicts with ``mine``, as its record; None when there is none."""
        for info in self._store.list(LOCK_PREFIX).objects:
            if info.name == mine:
                continue
            record = self._store._lock_record(info.name)  # None: released meanwhile, or not a lock of ours
            if record is None or is_stale(record, time.time()):
                continue
            if LockMode.EXCLUSIVE in (LockMode(record["mode"]), self.mode):
                return record
        return None

    def acquire(self) -> None:
        with self._mutex:
            if self._name is not None:
                raise UsageError("this lock is held already")
            deadline = time.monotonic() + self.wait
            delay = LOCK_FIRST_DELAY
            while True:
                name = self._new_name()
                written = _clocks()
                self._store._put(name, self._record())
                try:
                    holder = self._conflict(name)
                except BaseException:
                    self._store.delete([name])
                    raise
                if holder is None:
                    self._name, self._lost, self._written = name, None, written
                    self._stop = threading.Event()
                    self._refresher = threading.Thread(target=self._refresh_loop, args=(self._stop,),
                                                       name="s3-lock-refresh", daemon=True)
                    self._refresher.start()
                    return
                self._store.delete([name])
                if time.monotonic() >= deadline:
                    raise RepositoryLocked(
                        f"{self.mode.value} lock wanted for {self.what or 'this command'}: "
                        f"{self._store.location('')} is locked by {holder.get('what') or 'a command'} "
                        f"({holder.get('mode')}, pid {holder.get('pid')} on {holder.get('host')}, "
                        f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder['time']))} UTC)")
                jitter = 1 + (int.from_bytes(os.urandom(1), "big") / 255 - 0.5) * 0.4
                time.sleep(min(delay * jitter, max(0.0, deadline - time.monotonic()) + 0.001))
                delay = min(delay * 1.5, LOCK_MAX_DELAY)

    def _refresh_loop(self, stop: threading.Event) -> None:
        while not stop.wait(LOCK_REFRESH_SECONDS):
            try:
                self.refresh()
            except RepositoryLocked:
                return  # lost or released: check() says so
            except (StoreError, PermissionDenied):
                continue  # the network or the server: try again at the next tick

    def _held(self) -> str:
        """Our lock object's name; RepositoryLocked when the lock is not held (never, released, or lost)."""
        trust = LOCK_STALE_SECONDS * LOCK_TRUST_SHARE
        if self._name is not None and self._lost is None and \
                max(now - then for now, then in zip(_clocks(), self._written, strict=True)) > trust:
            since = f"{trust / 60:g} minutes" if trust >= 60 else f"{trust:g} s"
            self._lose(f"not refreshed for {since}, so others may treat it as stale")
        if self._lost is not None:
            raise RepositoryLocked(self._lost)
        if self._name is None:
            raise RepositoryLocked(f"the {self.mode.value} lock of {self.what or 'this command'} on "
                                   f"{self._store.location('')} is not held")
        return self._name

    def _lose(self, why: str) -> None:
        self._lost = (f"the {self.mode.value} lock of {self.what or 'this command'} on {self._store.location('')} "
                      f"was lost ({why}): another command may be changing the repository")
        self._stop.set()

    def _delete_spare(self) -> None:
        try:
            self._store.delete(sorted(self._spare))
        except (StoreError, PermissionDenied):
            return  # tried again after the next refresh, and by release()
        self._spare.clear()

    def refresh(self) -> None:
        """Write a new lock object with the time now, check that the old one is still there, delete it.
        RepositoryLocked when the lock is not held or was lost; StoreError when the server cannot be asked (the
        lock stays held: the refreshing thread tries again at its next tick)."""
        with self._mutex:
            old = self._held()
            new = self._new_name()
            self._spare.add(new)  # until it counts: a PUT whose answer was lost may still have made it
            written = _clocks()
            self._store._put(new, self._record())
            if not self._store._exists(old):
                self._lose(f"its lock object {old} was removed")
                self._delete_spare()
                raise RepositoryLocked(self._lost or "")
            self._name, self._written = new, written
            self._spare.discard(new)
            self._spare.add(old)
            self._delete_spare()

    def check(self) -> None:
        """RepositoryLocked ("... was lost ...") unless this lock is still held: its object is there (one HEAD)
        and was written less than LOCK_TRUST_SHARE of LOCK_STALE_SECONDS ago. For commands about to delete
        (prune) or to list a new snapshot (whose chunks a prune that took the lost lock may have deleted)."""
        with self._mutex:
            name = self._held()
            if not self._store._exists(name):
                self._lose(f"its lock object {name} was removed")
                raise RepositoryLocked(self._lost or "")

    def release(self) -> None:
        self._stop.set()
        with self._mutex:
            if self._name is None:
                return
            names = [self._name, *sorted(self._spare)]
            self._name, self._lost = None, None
            self._spare.clear()
            refresher, self._refresher = self._refresher, None
            self._store.delete(names)
        if refresher is not None and refresher is not threading.current_thread():
            refresher.join()

    def __enter__(self) -> S3Lock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
