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
freed.

Errors: a missing object is ObjectMissing, access refused PermissionDenied (exit 16), anything else (network,
5xx after obstore's retries with backoff) StoreError (exit 17) with the first line of obstore's message.

Locks: :class:`S3Lock` (see there): lock objects under ``locks/``, restic's write-then-list protocol.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

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

T = TypeVar("T")

LOCK_PREFIX = "locks/"
LOCK_STALE_SECONDS = 30 * 60  # a lock object older than this is ignored (not refreshed yet: issue 13, later)
LOCK_FIRST_DELAY = 0.05
LOCK_MAX_DELAY = 0.5


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _call(where: str, fn: Callable[[], T]) -> T:
    """``fn()``, with obstore's errors turned into the store's (one line each, no traceback for the user)."""
    try:
        return fn()
    except FileNotFoundError:
        raise ObjectMissing(where, "the pack file is missing") from None
    except (obstore.exceptions.PermissionDeniedError, obstore.exceptions.UnauthenticatedError) as exc:
        raise PermissionDenied(f"{where}: access denied by the S3 server: {_first_line(exc)}") from None
    except (obstore.exceptions.BaseError, OSError) as exc:
        raise StoreError(where, f"S3 request failed: {_first_line(exc)}") from None


class S3Store:
    """Objects as keys under ``prefix`` in ``bucket`` at ``endpoint`` (``http://host:port`` or ``https://...``)."""

    cross_process = True

    def __init__(self, endpoint: str, bucket: str, prefix: str = "", region: str | None = None) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"S3 endpoint {endpoint!r} must start with http:// or https://")
        if len(bucket) < 3 or "/" in bucket:
            raise UsageError(f"S3 bucket name {bucket!r} is not valid")
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        try:
            self._os = _ObjectStore(
                bucket,
                prefix=self.prefix or None,
                endpoint=self.endpoint,
                region=self.region,
                virtual_hosted_style_request=False,
                client_options={"allow_http": self.endpoint.startswith("http://")},
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

    def close(self) -> None:
        pass

    # -- writing ---------------------------------------------------------------------------------------------

    def create(self) -> S3Writer:
        return S3Writer(self)

    def _put(self, name: str, data: bytes) -> None:
        _call(self.location(name), lambda: obstore.put(self._os, name, data, mode="overwrite"))

    def delete(self, names: Iterable[str]) -> int:
        freed = 0
        for name in names:
            check_name(name)
            try:
                size = self.size(name)
            except ObjectMissing:
                continue
            _call(self.location(name), lambda n=name: obstore.delete(self._os, n))  # type: ignore[misc]
            freed += size
        return freed

    # -- reading ---------------------------------------------------------------------------------------------

    def open(self, name: str, where: str | None = None) -> S3Reader:
        where = self.location(name) if where is None else where
        return S3Reader(self, name, self.size(name, where), where)

    def _range(self, name: str, start: int, end: int, where: str) -> bytes:
        if end <= start:
            return b""
        return bytes(_call(where, lambda: obstore.get_range(self._os, name, start=start, end=end)))

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
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        end = min(self.size, offset + length)
        try:
            return self._store._range(self._name, offset, end, self.where)
        except ObjectMissing as exc:
            raise OSError(errno.ENOENT, f"the object is gone: {exc.reason}") from None
        except StoreError as exc:
            raise OSError(errno.EIO, exc.reason) from None


class S3Writer:
    """A new object gathered in memory; its temporary name is never an S3 key (S3 has no rename)."""

    def __init__(self, store: S3Store) -> None:
        self._store = store
        self.temp_name = f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(8).hex()}{TEMP_SUFFIX}"
        self._parts: list[bytes] | None = []

    def write(self, data: bytes) -> None:
        if self._parts is None:
            raise StoreError(self.temp_name, "the writer was committed or aborted already")
        self._parts.append(bytes(data))

    def commit(self, name: str) -> None:
        check_name(name)
        if self._parts is None:
            raise StoreError(self.temp_name, "the writer was committed or aborted already")
        data = b"".join(self._parts)
        self._store._put(name, data)
        self._parts = None

    def abort(self) -> None:
        self._parts = None


class S3Lock:
    """The repository lock as objects under ``locks/`` (restic's protocol, for servers with or without
    conditional writes): write this holder's lock object (``locks/<mode>-<host>-<pid>-<16 hex>``, JSON: host,
    pid, time, mode, what) under a name nobody else uses, then list ``locks/``. Any other lock object that is
    not stale and conflicts (either of the two EXCLUSIVE) means: delete ours, wait a little (20% jitter) and try
    again until ``wait`` runs out, then RepositoryLocked (exit 11) naming a holder. Two writers that both see
    each other both back off, so at least one of them never holds a lock the other conflicts with.

    A lock object whose ``time`` is older than LOCK_STALE_SECONDS (30 minutes) is stale and ignored; a lock is
    not refreshed yet while held (issue 13, later), so a command holding one longer than that may be
    overtaken. An unreadable or vanished lock object counts as not there. release() deletes the object; a
    process killed while holding a lock leaves it until it goes stale (``dedupimg unlock``: later)."""

    def __init__(self, store: S3Store, mode: LockMode, wait: float, what: str) -> None:
        self._store, self.mode, self.wait, self.what = store, mode, wait, what
        self._name: str | None = None
        self._mutex = threading.Lock()

    @property
    def locked(self) -> bool:
        return self._name is not None

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                           "mode": self.mode.value, "what": self.what}).encode()

    def _conflict(self, mine: str) -> dict[str, Any] | None:
        """A live lock object that conflicts with ``mine``, as its record; None when there is none."""
        for info in self._store.list(LOCK_PREFIX).objects:
            if info.name == mine:
                continue
            try:
                record = json.loads(self._store.read(info.name))
                mode = LockMode(record["mode"])
                stamp = float(record["time"])
            except (ObjectMissing, ValueError, KeyError, TypeError):
                continue  # released meanwhile, or not a lock of ours
            if time.time() - stamp > LOCK_STALE_SECONDS:
                continue
            if LockMode.EXCLUSIVE in (mode, self.mode):
                return dict(record)
        return None

    def acquire(self) -> None:
        with self._mutex:
            if self._name is not None:
                raise UsageError("this lock is held already")
            deadline = time.monotonic() + self.wait
            delay = LOCK_FIRST_DELAY
            host = socket.gethostname().replace("/", "_") or "host"
            while True:
                name = f"{LOCK_PREFIX}{self.mode.value}-{host}-{os.getpid()}-{os.urandom(8).hex()}"
                self._store._put(name, self._record())
                try:
                    holder = self._conflict(name)
                except BaseException:
                    self._store.delete([name])
                    raise
                if holder is None:
                    self._name = name
                    return
                self._store.delete([name])
                if time.monotonic() >= deadline:
                    raise RepositoryLocked(
                        f"{self.mode.value} lock wanted for {self.what or 'this command'}: "
                        f"{self._store.location('')} is locked by {holder.get('what') or 'a command'} "
                        f"({holder.get('mode')}, pid {holder.get('pid')} on {holder.get('host')}, "
                        f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder.get('time', 0)))} UTC)")
                jitter = 1 + (int.from_bytes(os.urandom(1), "big") / 255 - 0.5) * 0.4
                time.sleep(min(delay * jitter, max(0.0, deadline - time.monotonic()) + 0.001))
                delay = min(delay * 1.5, LOCK_MAX_DELAY)

    def release(self) -> None:
        with self._mutex:
            if self._name is None:
                return
            name, self._name = self._name, None
            self._store.delete([name])

    def __enter__(self) -> S3Lock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
