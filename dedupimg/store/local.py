"""A store in a local directory: an object is a file, ``/`` in its name a subdirectory.

Writing follows docs/format.md §8: the object is written to ``tmp/<pid>-<16 hex>.tmp`` (``O_CREAT|O_EXCL``,
0600) with writev in pieces of about a megabyte, fsynced, renamed to its name, and the directory it landed in
fsynced; only then may an index transaction point at it. Files are opened for reading non-blocking and
checked to be regular files before a byte is read, so a FIFO named like an object never blocks ``open()``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

from dedupimg.core.errors import PermissionDenied, UnusablePath
from dedupimg.core.fsutil import DIR_MODE, FILE_MODE, fsync_dir, make_dirs, raise_for_space
from dedupimg.store.base import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    Listing,
    NotAnObject,
    ObjectInfo,
    ObjectMissing,
    ReaderBase,
    StoreError,
    StoreSpec,
    check_name,
    check_prefix,
)
from dedupimg.store.lock import LockMode, RepositoryLock


class LocalStore:
    """Objects as files under ``root`` (the repository directory)."""

    cross_process = True

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        # Writers neither committed nor aborted. An interrupt (raised between any two bytecodes of the main
        # thread) can land after a writer's file is created and before its owner holds the writer that would
        # abort it; close() aborts what is left, so no path leaks a temp file or its descriptor.
        self._uncommitted: set[LocalWriter] = set()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def initialize(self, dirs: Iterable[str]) -> None:
        """Create ``tmp/`` and the directories ``dirs`` (in order, 0700) and make them durable: each parent
        directory is fsynced once, after all its new entries (``init``: ``packs`` and its 256 levels)."""
        parents: dict[Path, None] = {}
        for d in [TEMP_PREFIX.rstrip("/"), *dirs]:
            path = self.root / check_name(d)
            os.mkdir(path, DIR_MODE)
            parents[path.parent] = None
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(parent)

    def path(self, name: str) -> Path:
        """The file of object ``name`` (local only: tests and messages)."""
        return self.root / check_name(name)

    def location(self, name: str) -> str:
        return str(self.root / name)

    def lock(self, mode: LockMode, wait: float = 0.0, what: str = "") -> RepositoryLock:
        return RepositoryLock(self.root, mode, wait, what)

    def list_locks(self) -> list[dict[str, Any]]:
        return []  # flock: the kernel keeps the lock, no object to list

    def remove_locks(self, all_locks: bool = False) -> list[str]:
        return []  # a flock dies with its process: never a stale one to remove

    def spec(self) -> StoreSpec:
        return {"kind": "local", "root": os.path.abspath(self.root)}

    def close(self) -> None:
        """Abort the writers neither committed nor aborted (nothing can commit them now)."""
        for writer in list(self._uncommitted):
            writer.abort()

    # -- writing ---------------------------------------------------------------------------------------------

    def create(self) -> LocalWriter:
        return LocalWriter(self)

    def delete(self, names: Iterable[str]) -> int:
        """Unlink each file (a missing one frees nothing), then fsync once each directory that lost one."""
        freed = 0
        dirs: set[Path] = set()
        for name in names:
            path = self.path(name)
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
            dirs.add(path.parent)
        for d in sorted(dirs):
            fsync_dir(d)
        return freed

    # -- reading ---------------------------------------------------------------------------------------------

    def open(self, name: str, where: str | None = None) -> LocalReader:
        path = self.path(name)
        where = str(path) if where is None else where
        fd, size = open_file(path, where)
        return LocalReader(fd, size, where)

    def read(self, name: str, offset: int = 0, length: int = -1, where: str | None = None) -> bytes:
        path = self.path(name)
        where = str(path) if where is None else where
        fd, size = open_file(path, where)
        try:
            if offset == 0 and length < 0:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    return f.read()
            want = max(0, size - offset) if length < 0 else length
            parts: list[bytes] = []
            while want > 0:
                part = os.pread(fd, want, offset)
                if not part:
                    break
                parts.append(part)
                offset += len(part)
                want -= len(part)
            return b"".join(parts)
        except OSError as exc:
            raise StoreError(where, f"cannot read pack: {exc.strerror}", exc.strerror) from None
        finally:
            os.close(fd)

    def size(self, name: str, where: str | None = None) -> int:
        path = self.path(name)
        where = str(path) if where is None else where
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            raise ObjectMissing(where, "the pack file is missing") from None
        except OSError as exc:
            raise StoreError(where, f"cannot read pack: {exc.strerror}", exc.strerror) from None

    def list(self, prefix: str) -> Listing:
        """Entries of the directory ``prefix``, symlinks followed: directories in ``dirs``, anything else
        (FIFOs and devices too: opening one fails in :meth:`open`) in ``objects``. A missing directory is
        an empty listing; other errors (permission denied) are raised."""
        check_prefix(prefix)
        out = Listing()
        try:
            entries = sorted(os.scandir(self.root / prefix), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return out
        for entry in entries:
            name = prefix + entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                out.dirs.append(name)
                continue
            try:
                size = entry.stat().st_size
            except OSError:
                size = 0  # a dangling symlink, or gone meanwhile
            out.objects.append(ObjectInfo(name, size))
        return out


def open_file(path: Path | str, where: str) -> tuple[int, int]:
    """A descriptor of the regular file ``path`` and its size, or the store's error naming ``where``.

    O_NONBLOCK keeps a FIFO named like a pack from blocking open() until some writer appears (a hang no signal
    ends while it lasts); fstat then refuses anything but a regular file (FIFO, device, socket, directory)
    before a byte is read. O_NONBLOCK changes nothing for reads of a regular file. A symlink is followed and
    the file it names gets the same checks (dedupimg never makes one, but an admin who moved packs elsewhere
    may have).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise ObjectMissing(where, "the pack file is missing") from None
    except PermissionError:  # not damage: repair must not leave out the snapshots it holds, check must not pass
        raise PermissionDenied(f"{where}: cannot open the pack file: permission denied") from None
    except OSError as exc:
        raise StoreError(where, f"cannot open the pack file: {exc.strerror}", exc.strerror) from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise StoreError(where, f"cannot read pack: {exc.strerror}", exc.strerror) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotAnObject(where, f"is {_file_kind(st.st_mode)}, not a pack file")
    return fd, st.st_size


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


class LocalReader(ReaderBase):
    """An open file: ``pread`` is os.pread on its descriptor (no layer between a read and the system call)."""

    def __init__(self, fd: int, size: int, where: str) -> None:
        self.fd = fd
        self.size = size
        self.where = where
        self.pread = partial(os.pread, fd)

    def advise_sequential(self) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def drop_cache(self) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def unusable_tmp(root: Path) -> UnusablePath:
    """The error for a repository whose ``tmp/`` (where every file is written first) is missing or is not a
    directory: the repository is damaged, and no command that writes can run until it is a directory again."""
    tmp = root / TEMP_PREFIX.rstrip("/")
    if not os.path.lexists(tmp):
        return UnusablePath(f"the repository's temporary directory {tmp} is missing: make it (mkdir -m 700 {tmp})")
    return UnusablePath(f"the repository's temporary directory {tmp} is not a directory: move what is there away "
                        f"and make it one (mkdir -m 700 {tmp})")


class LocalWriter:
    """A new file in ``tmp/``. Writes are gathered and issued with writev in pieces of about a megabyte: two
    small writes per chunk would cost more in system calls than the copy itself."""

    FLUSH_BYTES = 1 << 20
    FLUSH_PIECES = 512  # below Linux's IOV_MAX of 1024

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self.temp_name = f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(8).hex()}{TEMP_SUFFIX}"
        self._tmp = store.root / self.temp_name
        self._fd = -1
        store._uncommitted.add(self)  # before the file exists: from here on the store's close() finds it
        try:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except (FileNotFoundError, NotADirectoryError):
            store._uncommitted.discard(self)
            raise unusable_tmp(store.root) from None
        except BaseException:
            store._uncommitted.discard(self)
            raise
        self._pieces: list[bytes] = []
        self._buffered = 0

    def write(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered >= self.FLUSH_BYTES or len(self._pieces) >= self.FLUSH_PIECES:
            self._flush()

    def _flush(self) -> None:
        pieces, self._pieces, self._buffered = self._pieces, [], 0
        if not pieces:
            return
        try:
            done = os.writev(self._fd, pieces)
            total = sum(len(p) for p in pieces)
            if done < total:  # short write: finish it piece by piece
                rest = memoryview(b"".join(pieces))[done:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except OSError as exc:
            raise_for_space(exc, self._tmp)
            raise

    def commit(self, name: str) -> None:
        final = self._store.path(name)
        if self._fd < 0:
            raise StoreError(self.temp_name, "the writer was committed or aborted already")
        self._flush()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise_for_space(exc, self._tmp)
            raise
        os.close(self._fd)
        self._fd = -1
        try:
            os.replace(self._tmp, final)
        except FileNotFoundError:
            if not self._tmp.exists():
                raise
            make_dirs(final.parent)  # a level that does not exist yet (init makes every packs/xx)
            os.replace(self._tmp, final)
        self._store._uncommitted.discard(self)
        fsync_dir(final.parent)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)
        self._store._uncommitted.discard(self)
