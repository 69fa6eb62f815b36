"""The store interface: immutable named objects, the only way dedupimg reaches pack storage.

A store holds objects under names such as ``packs/ab/<64 hex>.pack``: ``/`` separates levels, as directories
do on a disk and prefixes do in an object store. An object is written once through an :class:`ObjectWriter`
and becomes visible, durable and complete in one step (``commit``); until then (and after ``abort``, or a crash)
nothing is visible under its name. Objects are then only read (a byte range, or repeatedly through an
:class:`ObjectReader`), listed, and deleted.

A writer's bytes live meanwhile under a temporary name in ``tmp/`` (``tmp/<pid>-<16 hex>.tmp``): a crash leaves
it there, and :meth:`Store.list` of ``tmp/`` shows such leftovers so that prune can delete them.

Listing is one level at a time, like a directory or an S3 listing with delimiter ``/``: the objects directly
under a prefix, and the names of the levels below it (``dirs``). On a local disk an entry that is a directory
is never an object: a directory named like an object shows up in ``dirs``, never in ``objects``.

Another process (a read worker, say) reaches the same store through ``open_store(store.spec())``
(:mod:`dedupimg.store`): a spec is a small dict of strings, so it crosses a pipe as msgpack or JSON.

Errors: a missing object is :class:`ObjectMissing`, an entry that is not an object (a FIFO, a directory, a
device named like one) :class:`NotAnObject`, any other failure to read :class:`StoreError`; all three are
IntegrityError (exit 17), with the caller's ``where`` in front of the message. An object the user may not
read is PermissionDenied (exit 16): not damage. A full disk while writing is NoSpaceError (exit 18).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from dedupimg.core.errors import IntegrityError
from dedupimg.store.lock import LockMode

TEMP_PREFIX = "tmp/"  # where writers keep objects being written
TEMP_SUFFIX = ".tmp"

StoreSpec = dict[str, str]  # what open_store needs: {"kind": ..., ...}, strings only


class StoreError(IntegrityError):
    """An object that cannot be read (exit 17, as damage): ``where`` says which, ``reason`` why."""

    def __init__(self, where: str, reason: str, strerror: str | None = None) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.strerror = strerror or reason  # the operating system's words, when it gave any


class ObjectMissing(StoreError):
    """No object has that name (exit 17: the index points at a pack that is gone)."""


class NotAnObject(StoreError):
    """Something else bears an object's name: a FIFO, a directory, a device (exit 17)."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int


@dataclass
class Listing:
    """One level of names: its objects and the levels below it (both sorted by name)."""

    objects: list[ObjectInfo] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # "packs/ab": no trailing slash


class ObjectReader(Protocol):
    """An open object for repeated range reads (local: one file descriptor, read with pread)."""

    where: str  # what messages call it
    size: int  # its size when it was opened (objects never change)

    def pread(self, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end); raises OSError on an I/O error."""
        ...

    def advise_sequential(self) -> None:
        """The whole object will be read in order (local: read-ahead)."""
        ...

    def drop_cache(self) -> None:
        """Done reading it all: do not keep it cached (a check should not evict what is in use)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> ObjectReader: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class ReaderBase:
    """What every store's reader shares: no cache hints to give, nothing to close, a context manager.
    A reader overrides what its store can do (local: read-ahead hints and a descriptor to close)."""

    def advise_sequential(self) -> None:
        pass

    def drop_cache(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ObjectWriter(Protocol):
    """A new object being written: nothing is visible under any object name until :meth:`commit`."""

    temp_name: str  # the name it has meanwhile, in tmp/

    def write(self, data: bytes) -> None:
        """Append ``data`` (the writer may hold it back until it has gathered about a megabyte)."""
        ...

    def commit(self, name: str) -> None:
        """Make the object durable and visible as ``name``, atomically (local: fsync, rename, fsync the
        directory). An object already there under that name is replaced (it has the same content: names are
        content hashes). On failure call :meth:`abort`."""
        ...

    def abort(self) -> None:
        """Drop what was written; nothing stays (a no-op after a successful commit)."""
        ...


class Store(Protocol):
    def create(self) -> ObjectWriter:
        """A writer for a new object, under a fresh temporary name."""
        ...

    def open(self, name: str, where: str | None = None) -> ObjectReader:
        """Open ``name`` for range reads; ``where`` (default: :meth:`location`) starts error messages."""
        ...

    def read(self, name: str, offset: int = 0, length: int = -1, where: str | None = None) -> bytes:
        """``length`` bytes at ``offset`` (all the rest when negative; fewer at the end)."""
        ...

    def size(self, name: str, where: str | None = None) -> int: ...

    def list(self, prefix: str) -> Listing:
        """The level ``prefix`` (``""`` or ending in ``/``); an empty listing when there is nothing under it."""
        ...

    def delete(self, names: Iterable[str]) -> int:
        """Delete ``names`` (missing ones are skipped) and make that durable; returns the bytes freed."""
        ...

    def location(self, name: str) -> str:
        """``name`` as a user finds it (local: the file's path), for messages."""
        ...

    def spec(self) -> StoreSpec:
        """What :func:`dedupimg.store.open_store` needs to open this store again, in any process that may."""
        ...

    @property
    def cross_process(self) -> bool:
        """Whether another process can open this store from :meth:`spec` (not so an in-memory store)."""
        ...

    def lock(self, mode: LockMode, wait: float = 0.0, what: str = "") -> StoreLock:
        """The repository's lock in this store (not yet acquired): SHARED for commands that add or read,
        EXCLUSIVE for those that delete (forget, prune, repair). A conflicting holder is waited for up to
        ``wait`` seconds, then RepositoryLocked (exit 11). Local: ``flock`` on ``lock`` (store/lock.py)."""
        ...

    def list_locks(self) -> builtins.list[dict[str, Any]]:
        """The lock records this store keeps as objects (host, pid, time, mode, what, name, stale); ``[]`` for
        a store whose locks are not objects (local: flock; memory)."""
        ...

    def remove_locks(self, all_locks: bool = False) -> builtins.list[str]:
        """Remove the stale lock objects (every one with ``all_locks``: ``unlock --remove-all``) and say what
        was removed, one description each. ``[]`` for local and memory stores: their locks die with the holder."""
        ...

    def close(self) -> None: ...


class StoreLock(Protocol):
    """A lock from :meth:`Store.lock`: acquire once, release once (or use it as a context manager)."""

    @property
    def locked(self) -> bool: ...

    def acquire(self) -> None: ...

    def check(self) -> None:
        """RepositoryLocked unless the lock is still held: not acquired, released, or lost (an S3 lock whose
        object was removed or could not be refreshed in time). Called before deleting (prune)."""
        ...

    def release(self) -> None: ...

    def __enter__(self) -> StoreLock: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


def write_object(store: Store, name: str, data: bytes) -> None:
    """Write a small object whole, durably, as ``name`` (an existing one is replaced); nothing on an error."""
    writer = store.create()
    try:
        writer.write(data)
        writer.commit(name)
    except BaseException:
        writer.abort()
        raise


def check_name(name: str) -> str:
    """``name`` if it is a valid object name (relative, no empty, ``.`` or ``..`` level); else StoreError."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise StoreError(repr(name), "not a valid object name")
    return name


def check_prefix(prefix: str) -> str:
    if prefix and (not prefix.endswith("/") or prefix.startswith("/")
                   or any(p in ("", ".", "..") for p in prefix[:-1].split("/"))):
        raise StoreError(repr(prefix), "not a valid listing prefix (a level ends with '/')")
    return prefix
