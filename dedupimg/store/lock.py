"""Repository locks: ``flock(2)`` on ``REPO/lock``.

``snapshot``, ``restore``, ``mount`` and ``serve`` hold a SHARED lock; ``forget`` and ``prune`` hold an
EXCLUSIVE one. The lock is a ``flock`` on the file ``REPO/lock`` (created on first use with mode 0644, never
deleted), so the kernel drops it when the last descriptor for it is closed, also when a process dies by
SIGKILL or a crash: there is no stale lock to clean up.

A conflicting command polls with non-blocking attempts for up to ``wait`` seconds (``--lock-wait``, default
0: one attempt) and then raises :class:`~dedupimg.core.errors.RepositoryLocked` (exit 11) with one line that says
what it wanted and who seems to hold the lock.

Holder information: ``flock`` records no owner, so an EXCLUSIVE holder writes ``"<pid> <what>"`` into the
lock file after acquiring it. A process that an exclusive lock blocks reads it for its message, worded as
"last exclusive holder recorded" because the record may be stale (the holder may not have written yet, or
the lock may have been inherited by a forked child). SHARED holders write nothing; a blocked exclusive
request only says that the lock is shared by other processes.

Forks: a ``flock`` belongs to the open file description, not to the process. A child made by ``fork()``
shares it and keeps the repository locked after the parent exits; this is what ``mount`` needs when it forks
its server into the background (take the lock before ``dedupimg.serve.mount.mount``; the daemon inherits it).
Therefore :meth:`RepositoryLock.release` only closes this process's descriptor and never calls ``LOCK_UN``,
which would unlock the forked children too. The descriptor is ``O_CLOEXEC``: programs run by ``exec``
(``fusermount3``, say) do not inherit it.

Read-only repositories: when ``REPO/lock`` cannot be opened for writing (EACCES, EPERM, EROFS), an existing
lock file is opened read-only instead (``flock`` works on read-only descriptors, in either mode; no holder
record is written then). When it is missing and cannot be created, a SHARED lock proceeds without locking:
nobody can write that directory through this path either (read-only media, a read-only bind mount), so a
concurrent prune there is not expected, and refusing would make backups on read-only media unrestorable.
(A user with write access who prunes in that window is not excluded; that is the accepted cost.) An
EXCLUSIVE lock raises instead: forget and prune need to write the repository anyway.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from dedupimg.core.errors import NotARepository, PermissionDenied, RepositoryLocked, RepositoryNotFound, UsageError

LOCK_FILE = "lock"
LOCK_FILE_MODE = 0o644
FIRST_DELAY = 0.02  # seconds between attempts: 20 ms, growing by half up to 100 ms
MAX_DELAY = 0.1
HOLDER_MAX = 200  # bytes of holder record written and read

# open(2) errors that mean "this user or this filesystem cannot write here".
_READ_ONLY = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# flock(2) errors that mean "no working flock on this filesystem" (EBADF: NFS emulates flock with POSIX
# locks, which refuse an exclusive lock on a read-only descriptor).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF})
_BUSY = frozenset({errno.EWOULDBLOCK, errno.EAGAIN})


class LockMode(enum.Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


class RepositoryLock:
    """A SHARED or EXCLUSIVE ``flock`` on ``repo_path/lock``; a context manager.

    ``wait``: seconds to keep trying when another process holds a conflicting lock (0: try once).
    ``what``: the command name, for messages and the holder record ("prune", "snapshot", ...).
    Not re-entrant: one acquire per object; a second lock object in the same process conflicts with the first
    like another process would (flock locks belong to open file descriptions).
    """

    def __init__(self, repo_path: Path, mode: LockMode, wait: float = 0.0, what: str = "") -> None:
        if wait < 0:
            raise UsageError(f"lock wait must be 0 or more seconds, not {wait}")
        self.repo_path = Path(repo_path)
        self.path = self.repo_path / LOCK_FILE
        self.mode = mode
        self.wait = float(wait)
        self.what = what
        self._fd: int | None = None
        self._acquired = False

    @property
    def locked(self) -> bool:
        """True while held; False before, after, and for a SHARED lock on read-only media without a lock file."""
        return self._fd is not None

    def acquire(self) -> None:
        if self._acquired:
            raise RuntimeError(f"{self.path} is already acquired by this RepositoryLock (it is not re-entrant)")
        while True:
            fd, writable = self._open()
            if fd is None:
                self._acquired = True  # SHARED on read-only media without a lock file: proceed unlocked
                return
            try:
                self._lock(fd)
                current = self._is_current(fd)
                if current and self.mode is LockMode.EXCLUSIVE and writable:
                    self._record_holder(fd)
            except BaseException:  # also Interrupted from the signal handler while sleeping
                os.close(fd)
                raise
            if current:
                break
            os.close(fd)  # the lock file was removed (or replaced) while we waited for it: lock the new one
        self._fd = fd
        self._acquired = True

    def check(self) -> None:
        """RepositoryLocked before acquire or after release, or when the lock file was removed or replaced since
        (someone deleted ``lock`` by hand, as one does with a stale lock of other tools: a process that
        opens the new file locks it regardless of ours). A SHARED lock that proceeded unlocked on read-only
        media counts as held."""
        if not self._acquired:
            raise RepositoryLocked(f"the {self.mode.value} lock of {self.what or 'this command'} on "
                                   f"{self.repo_path} is not held")
        if self._fd is not None and not self._is_current(self._fd):
            raise RepositoryLocked(f"the {self.mode.value} lock of {self.what or 'this command'} on "
                                   f"{self.repo_path} was lost (its lock file {self.path} was removed or "
                                   "replaced): another command may be changing the repository")

    def release(self) -> None:
        """Close the descriptor: the lock goes when no forked child still shares it (no ``LOCK_UN``)."""
        fd, self._fd = self._fd, None
        self._acquired = False
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> RepositoryLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # -- internals -----------------------------------------------------------------------------------------

    def _open(self) -> tuple[int | None, bool]:
        """(descriptor, writable); (None, False) for a SHARED lock where no lock file can exist."""
        flags = os.O_CLOEXEC | os.O_NOCTTY
        try:
            return os.open(self.path, flags | os.O_RDWR | os.O_CREAT, LOCK_FILE_MODE), True
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise RepositoryNotFound(f"repository {self.repo_path} does not exist") from None
            if exc.errno == errno.ENOTDIR:
                raise NotARepository(f"{self.repo_path} is not a dedupimg repository (not a directory)") from None
            if exc.errno not in _READ_ONLY:
                raise RepositoryLocked(self._cannot_open(exc)) from None
            first = exc
        try:
            return os.open(self.path, flags | os.O_RDONLY), False
        except OSError as exc:
            if exc.errno == errno.ENOENT and self.mode is LockMode.SHARED:
                return None, False
            # Not a lock held by anyone: this process cannot write here (exit 16, not 11).
            raise PermissionDenied(self._cannot_open(first)) from None

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at ``self.path`` (a flock on a removed file excludes nobody)."""
        held = os.fstat(fd)
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    def _cannot_open(self, exc: OSError) -> str:
        need = ""
        if self.mode is LockMode.EXCLUSIVE:
            need = f"; {self.what or 'an exclusive lock'} needs write access to the repository"
        return f"cannot lock repository {self.repo_path}: cannot open {self.path}: {exc.strerror}{need}"

    def _lock(self, fd: int) -> None:
        op = (fcntl.LOCK_EX if self.mode is LockMode.EXCLUSIVE else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.wait
        delay = FIRST_DELAY
        while True:
            if self._try(fd, op):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise RepositoryLocked(self._locked_message(fd))
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, MAX_DELAY)

    def _try(self, fd: int, op: int) -> bool:
        """One non-blocking attempt: True if locked, False if another holder conflicts."""
        while True:
            try:
                fcntl.flock(fd, op)
                return True
            except InterruptedError:
                continue  # EINTR (Python retries itself unless a handler raised; then we never get here)
            except OSError as exc:
                if exc.errno in _BUSY:
                    return False
                if exc.errno in _NO_FLOCK:
                    raise RepositoryLocked(
                        f"repository {self.repo_path} is on a filesystem without working flock "
                        f"(network filesystems are not supported): {exc.strerror}"
                    ) from None
                raise

    def _record_holder(self, fd: int) -> None:
        """Best effort "<pid> <what>" for the messages of blocked processes; the lock does not depend on it."""
        what = " ".join((self.what or "dedupimg").split())  # one line
        record = f"{os.getpid()} {what}\n".encode(errors="replace")[:HOLDER_MAX]
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError:
            pass

    def _holder(self, fd: int) -> str:
        """Who blocks us, as far as can be told without being wrong."""
        if self.mode is LockMode.EXCLUSIVE and self._try(fd, fcntl.LOCK_SH | fcntl.LOCK_NB):
            # Only shared holders: our probe joined them (the caller closes fd, which drops it again).
            return "it is shared by other processes (snapshot, restore, mount or serve)"
        try:
            raw = os.pread(fd, HOLDER_MAX, 0)
        except OSError:
            raw = b""
        pid, _, what = raw.decode(errors="replace").strip().partition(" ")
        if not pid.isdigit() or not pid.isascii():
            return "an exclusive lock is held"
        if what:
            pid = f"{pid} ({what})"
        return f"an exclusive lock is held; last exclusive holder recorded: pid {pid}"

    def _locked_message(self, fd: int) -> str:
        wanted = f"{self.mode.value} lock wanted" + (f" for {self.what}" if self.what else "")
        waited = f"waited {self.wait:g} s" if self.wait > 0 else "did not wait"
        return (
            f"repository {self.repo_path} is locked by another dedupimg process ({wanted}; {self._holder(fd)}): "
            f"{waited}; try again or pass --lock-wait SECONDS"
        )
