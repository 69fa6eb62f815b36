"""A store in this process's memory, for tests: the contract of :mod:`dedupimg.store.base` without a disk.

Objects are bytes in a dict. A writer's bytes are listed under its temporary name in ``tmp/`` until it commits
or aborts, as a local store's temp file is (a writer dropped without either is what a crash leaves). The spec
opens the same store again in this process only (``cross_process`` is False: no read worker can use it).
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from dedupimg.core.errors import RepositoryLocked, UsageError
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

_stores: weakref.WeakValueDictionary[str, MemoryStore] = weakref.WeakValueDictionary()
_numbers = itertools.count(1)


class MemoryStore:
    cross_process = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, bytes] = {}
        self._writing: dict[str, MemoryWriter] = {}  # temp name -> writer not yet committed or aborted
        self._holders: tuple[int, bool] = (0, False)  # the repository lock: SHARED holders, EXCLUSIVE held
        self.id = f"{os.getpid()}-{next(_numbers)}"
        _stores[self.id] = self

    def __repr__(self) -> str:
        return f"MemoryStore({self.id!r}, {len(self._objects)} objects)"

    def location(self, name: str) -> str:
        return f"memory:{self.id}/{name}"

    def lock(self, mode: LockMode, wait: float = 0.0, what: str = "") -> MemoryLock:
        return MemoryLock(self, mode, wait, what)

    def list_locks(self) -> list[dict[str, Any]]:
        return []  # the lock is a counter in this process: nothing to list or go stale

    def remove_locks(self, all_locks: bool = False) -> list[str]:
        return []

    def spec(self) -> StoreSpec:
        return {"kind": "memory", "id": self.id}

    @classmethod
    def from_spec(cls, spec: StoreSpec) -> MemoryStore:
        store = _stores.get(spec.get("id", ""))
        if store is None:
            raise UsageError(f"in-memory store {spec.get('id')!r} does not exist in this process")
        return store

    def close(self) -> None:
        pass

    # -- writing ---------------------------------------------------------------------------------------------

    def create(self) -> MemoryWriter:
        writer = MemoryWriter(self, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(8).hex()}{TEMP_SUFFIX}")
        with self._lock:
            self._writing[writer.temp_name] = writer
        return writer

    def _commit(self, writer: MemoryWriter, name: str) -> None:
        data = b"".join(writer.parts)
        with self._lock:
            if self._writing.pop(writer.temp_name, None) is None:
                raise StoreError(writer.temp_name, "the writer was committed or aborted already")
            self._objects[name] = data

    def _drop(self, writer: MemoryWriter) -> None:
        with self._lock:
            self._writing.pop(writer.temp_name, None)

    def delete(self, names: Iterable[str]) -> int:
        freed = 0
        with self._lock:
            for name in names:
                data = self._objects.pop(check_name(name), None)
                if data is not None:
                    freed += len(data)
                elif (writer := self._writing.pop(name, None)) is not None:
                    freed += writer.size
        return freed

    # -- reading ---------------------------------------------------------------------------------------------

    def _get(self, name: str, where: str | None) -> bytes:
        with self._lock:
            data = self._objects.get(check_name(name))
        if data is None:
            raise ObjectMissing(self.location(name) if where is None else where, "the pack file is missing")
        return data

    def open(self, name: str, where: str | None = None) -> MemoryReader:
        return MemoryReader(self._get(name, where), self.location(name) if where is None else where)

    def read(self, name: str, offset: int = 0, length: int = -1, where: str | None = None) -> bytes:
        data = self._get(name, where)
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        return data[offset:] if length < 0 else data[offset : offset + length]

    def size(self, name: str, where: str | None = None) -> int:
        return len(self._get(name, where))

    def list(self, prefix: str) -> Listing:
        check_prefix(prefix)
        objects: list[ObjectInfo] = []
        dirs: set[str] = set()
        with self._lock:
            items = [(n, len(d)) for n, d in self._objects.items()]
            items += [(w.temp_name, w.size) for w in self._writing.values()]
        for name, size in items:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest:
                dirs.add(prefix + rest.split("/", 1)[0])
            else:
                objects.append(ObjectInfo(name, size))
        return Listing(sorted(objects, key=lambda o: o.name), sorted(dirs))


class MemoryReader(ReaderBase):
    """Range reads of bytes held in memory (also what tests use to parse a pack given as bytes)."""

    def __init__(self, data: bytes, where: str = "memory") -> None:
        self._data = data
        self.size = len(data)
        self.where = where

    def pread(self, length: int, offset: int) -> bytes:
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        return self._data[offset : offset + length]


class MemoryWriter:
    def __init__(self, store: MemoryStore, temp_name: str) -> None:
        self._store = store
        self.temp_name = temp_name
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        self.parts.append(bytes(data))
        self.size += len(data)

    def commit(self, name: str) -> None:
        self._store._commit(self, check_name(name))

    def abort(self) -> None:
        self._store._drop(self)
        self.parts = []


class MemoryLock:
    """The repository lock of a MemoryStore, with flock's rules inside one process: any number of SHARED
    holders or one EXCLUSIVE; a conflicting request polls for up to ``wait`` seconds, then RepositoryLocked."""

    def __init__(self, store: MemoryStore, mode: LockMode, wait: float, what: str) -> None:
        self._store, self.mode, self.wait, self.what = store, mode, wait, what
        self._held = False

    @property
    def locked(self) -> bool:
        return self._held

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            with self._store._lock:
                shared, exclusive = self._store._holders
                if not exclusive and (self.mode is LockMode.SHARED or not shared):
                    self._store._holders = (shared + 1, False) if self.mode is LockMode.SHARED else (0, True)
                    self._held = True
                    return
            if time.monotonic() >= deadline:
                raise RepositoryLocked(f"{self.mode.value} lock wanted for {self.what or 'this command'}: "
                                       f"{self._store.location('')} is locked by another holder")
            time.sleep(0.01)

    def release(self) -> None:
        if not self._held:
            return
        with self._store._lock:
            shared, _ = self._store._holders
            self._store._holders = (shared - 1, False) if self.mode is LockMode.SHARED else (0, False)
        self._held = False

    def check(self) -> None:
        """Never lost: only a holder that has not acquired, or has released, is refused."""
        if not self._held:
            raise RepositoryLocked(f"the {self.mode.value} lock of {self.what or 'this command'} on "
                                   f"{self._store.location('')} is not held")

    def __enter__(self) -> MemoryLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
