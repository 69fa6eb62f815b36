"""A read-only FUSE view of a repository: every snapshot as an image file that reads bit for bit.

Layout (image names escaped by :func:`entry_name`)::

    /NAME/2026-11-25T14:30:00+00:00_3f2d1d19.img    one file per snapshot: UTC time (sorts), short id
    /NAME/latest -> 2026-...img                     a symlink to the newest file of NAME
    /by-id/<full id>.img

Files read through :class:`~dedupimg.serve.reader.SnapshotReader`, which verifies every chunk: damage is EIO for
that read, never wrong data. The mount is read-only (the kernel refuses writes with EROFS); the write
operations answer EROFS too, in case a request gets through. The view is rebuilt from the index at most
every REFRESH_SECONDS, so snapshots taken while mounted appear.

mfusepy is imported only when mounting: it loads libfuse when imported, and the rest of dedupimg must work on
a machine without FUSE. Background mode forks before the repository is opened (an LMDB environment must not
cross a fork); the server reports "ready" or its error back through a pipe.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import pickle
import queue
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable
from ctypes.util import find_library
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from dedupimg.core.errors import DedupimgError, MountError, TargetError
from dedupimg.core.extents import ExtentMap
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.repo.repository import Repository
from dedupimg.serve.reader import SnapshotReader
from dedupimg.store import normalize_location
from dedupimg.store.lock import LockMode

BY_ID = "by-id"
LATEST = "latest"
REFRESH_SECONDS = 2.0
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777
# st_blocks of a snapshot of at most this many image bytes (about 0.15 s of counting) is counted when first
# asked for; of a larger one, on a thread, the whole size until then. (By size, not by segments: how many
# segments cover a GiB depends on the repository's segment mask.)
SYNC_BYTES = 28 << 30
NAME_MAX = 255  # bytes of one path component: a longer name in a listing fails the whole readdir (EIO)
BLKSIZE = 1 << 20  # st_blksize: cp, cat and friends size their buffers by it
# kernel_cache: snapshots never change, so the page cache may outlive an open file. default_permissions: the
# kernel checks the modes below, so no access() round trips. max_threads 2: the read workers (readpool.py)
# do the heavy part, so one FUSE thread can copy a reply while the other waits for its chunks, and a slow
# read does not hold up every other request. With READ_AHEAD_KB below, a sequential read (512 MiB VM-like
# image, medians of 5-7, alternating) ran 673 vs 665 MB/s with one thread and 1 MiB read-ahead when the
# machine was quiet, and 450 vs 383 with a busy loop on one core. (Before the workers, more threads were
# slower: 250-310 against 430 MB/s, every thread contending for the GIL.) max_idle_threads: libfuse 3.14's
# default (no limit) makes it print a warning.
FUSE_OPTIONS: dict[str, Any] = {
    "ro": True,
    "subtype": "dedupimg",
    "default_permissions": True,
    "kernel_cache": True,
    "max_threads": 2,
    "max_idle_threads": 4,
}
# The kernel gives a FUSE mount 128 KiB of read-ahead, so 128 KiB requests; 1 MiB requests (FUSE's largest)
# take an eighth of the round trips through Python (about +35% sequential throughput), and 2 MiB of
# read-ahead keeps two of them in flight, one for each FUSE thread.
READ_AHEAD_KB = 2048
# libfuse installs its unmount-and-exit handler only over SIG_DFL; the CLI's handlers would shadow it.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
READY = b"ready"

log = logging.getLogger(__name__)


# -- the tree ---------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    mode: int
    mtime_ns: int
    size: int = 0
    record: SnapshotRecord | None = None  # regular files
    target: str = ""  # symlinks
    children: list[str] = field(default_factory=list)  # directories


def entry_name(name: str) -> str:
    """An image name as one path component: '%', '/' and NUL percent-encoded, no clash with '.', '..', by-id,
    and at most NAME_MAX bytes.

    A longer one (records of older versions may hold names of any length; a 5000 character name made `ls` of
    the whole mount fail) keeps its first bytes and ends with ``%~`` and 16 hex digits of the full name's hash:
    stable across mounts, distinct for distinct names, and never equal to a name that fits, in which '%' is
    always followed by two hex digits.
    """
    out = name.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    if out in ("", ".", "..", BY_ID):
        out = "".join(f"%{ord(c):02X}" for c in out) or "%"
    raw = out.encode(errors="surrogateescape")
    if len(raw) <= NAME_MAX:
        return out
    digest = hashlib.blake2b(name.encode(errors="surrogatepass"), digest_size=8).hexdigest()
    head = raw[: NAME_MAX - len(digest) - 2].decode(errors="ignore")
    cut = head.rfind("%", len(head) - 2)  # no escape cut in two ('%2' of '%2F')
    return f"{head[:cut] if cut >= 0 else head}%~{digest}"


def _utc(rec: SnapshotRecord) -> datetime:
    when = rec.datetime
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)


def file_name(rec: SnapshotRecord) -> str:
    """``2026-11-25T14:30:00+00:00_3f2d1d19.img``: in UTC, so that names sort by time."""
    return f"{_utc(rec).replace(microsecond=0).isoformat()}_{rec.short_id}.img"


def build_tree(records: list[SnapshotRecord]) -> dict[str, _Entry]:
    """Every path of the view -> its entry; ``records`` oldest first (as Repository.snapshots returns them)."""
    tree: dict[str, _Entry] = {}

    def add_dir(path: str, children: list[str], mtime_ns: int) -> None:
        tree[path] = _Entry(DIR_MODE, mtime_ns, children=children)

    by_name: dict[str, list[SnapshotRecord]] = {}
    for rec in records:
        by_name.setdefault(entry_name(rec.name), []).append(rec)
    newest = 0
    for dname, recs in by_name.items():
        names = []
        for rec in recs:
            mtime = round(_utc(rec).timestamp() * 1e6) * 1000
            newest = max(newest, mtime)
            names.append(file_name(rec))
            tree[f"/{dname}/{names[-1]}"] = _Entry(FILE_MODE, mtime, rec.size, rec)
            tree[f"/{BY_ID}/{rec.hex_id}.img"] = _Entry(FILE_MODE, mtime, rec.size, rec)
        tree[f"/{dname}/{LATEST}"] = _Entry(LINK_MODE, mtime, len(names[-1]), target=names[-1])
        add_dir(f"/{dname}", sorted(names) + [LATEST], max(tree[f"/{dname}/{n}"].mtime_ns for n in names))
    add_dir(f"/{BY_ID}", sorted(f"{r.hex_id}.img" for r in records), newest)
    add_dir("/", sorted([BY_ID, *by_name]), newest)
    return tree


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# -- the FUSE operations ----------------------------------------------------------------------------------------


class SnapshotFS:
    """The operations mfusepy calls (it looks methods up by name; anything missing answers ENOSYS)."""

    use_ns = True  # times in nanoseconds (mfusepy's float seconds are deprecated)

    def __init__(self, repo: Repository, ready: Callable[[], None] | None = None) -> None:
        self._repo = repo
        self._ready = ready
        self.was_ready = False
        self._lock = threading.Lock()
        self._tree: dict[str, _Entry] = {}
        self._loaded = float("-inf")
        self._handles: dict[int, SnapshotReader] = {}
        # One reader per open snapshot, shared by its handles, so that they share its chunk cache.
        self._readers: dict[bytes, tuple[SnapshotReader, int]] = {}
        self._next_fh = 1
        self._blocks: dict[bytes, int] = {}  # st_blocks of each snapshot, by id (a record never changes)
        self._to_count: queue.SimpleQueue[SnapshotRecord] = queue.SimpleQueue()  # ... large ones, counted apart
        self._counting: set[bytes] = set()
        self._counter: threading.Thread | None = None
        self._owner = {"st_uid": os.getuid(), "st_gid": os.getgid()}

    def load(self) -> dict[str, _Entry]:
        """The current tree, rebuilt from the index when older than REFRESH_SECONDS."""
        with self._lock:
            if time.monotonic() - self._loaded > REFRESH_SECONDS:
                try:
                    self._tree = build_tree(self._repo.snapshots())
                except DedupimgError as exc:
                    if not self._tree:
                        raise
                    log.error("dedupimg mount: keeping the previous view: %s", exc)
                self._loaded = time.monotonic()
            return self._tree

    def _entry(self, path: str) -> _Entry:
        entry = self.load().get(path)
        if entry is None:
            raise _fail(errno.ENOENT)
        return entry

    def init(self, path: str) -> None:
        # Called once the kernel has the mount (requests to it wait until this returns).
        self.was_ready = True
        if self._ready is not None:
            self._ready()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        e = self._entry(path)
        if e.mode != DIR_MODE:
            nlink = 1
        else:  # "." and the entry in its parent, plus each subdirectory's "..": only the root has subdirectories
            nlink = 2 + (len(e.children) if path == "/" else 0)
        return {
            "st_mode": e.mode,
            "st_nlink": nlink,
            "st_size": e.size,
            "st_blocks": (e.size + 511) // 512 if e.record is None else self._allocated_blocks(e.record),
            "st_blksize": BLKSIZE,
            "st_mtime": e.mtime_ns,
            "st_ctime": e.mtime_ns,
            "st_atime": e.mtime_ns,
            **self._owner,
        }

    def _allocated_blocks(self, rec: SnapshotRecord) -> int:
        """st_blocks of a snapshot's file: its bytes held in chunks, in 512-byte units, so that du, ls -s and
        cp see holes and zero runs as holes. Computed once per snapshot from its extent map (a pass over its
        segments, no chunk read: about 5 ms per GiB of image). For a snapshot of more than SYNC_BYTES of
        image, on a thread of its own, so that `ls -l` of many large images does not wait for it: until it
        is known (and when the segments cannot be read), the whole size."""
        blocks = self._blocks.get(rec.id)
        if blocks is not None:
            return blocks
        if rec.size <= SYNC_BYTES:
            self._count_allocated(rec)
        else:
            with self._lock:
                if rec.id not in self._counting:
                    self._counting.add(rec.id)
                    if self._counter is None:
                        self._counter = threading.Thread(target=self._count_queued, daemon=True)
                        self._counter.start()
                    self._to_count.put(rec)
        return self._blocks.get(rec.id, (rec.size + 511) // 512)

    def _count_allocated(self, rec: SnapshotRecord) -> None:
        with self._lock:
            reader = self._readers.get(rec.id, (None, 0))[0]
        extent_map = reader.map if reader is not None else ExtentMap(rec, self._repo.segment)
        try:
            self._blocks[rec.id] = (extent_map.allocated() + 511) // 512
        except Exception as exc:  # noqa: BLE001  (damage or any failure: stat still answers)
            log.error("dedupimg mount: snapshot %s: cannot map its extents: %s", rec.short_id, exc)

    def _count_queued(self) -> None:
        while True:
            rec = self._to_count.get()
            self._count_allocated(rec)
            with self._lock:
                self._counting.discard(rec.id)

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        tree = self.load()
        e = tree.get(path)
        if e is None or e.mode != DIR_MODE:
            raise _fail(errno.ENOTDIR if e else errno.ENOENT)
        base = path.rstrip("/")
        out = [(".", {"st_mode": DIR_MODE}, 0), ("..", {"st_mode": DIR_MODE}, 0)]
        return out + [(c, {"st_mode": tree[f"{base}/{c}"].mode}, 0) for c in e.children]

    def readlink(self, path: str) -> str:
        e = self._entry(path)
        if e.mode != LINK_MODE:
            raise _fail(errno.EINVAL)
        return e.target

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_ACCMODE | os.O_TRUNC):
            raise _fail(errno.EROFS)
        rec = self._entry(path).record
        if rec is None:
            raise _fail(errno.EISDIR)
        with self._lock:
            reader, users = self._readers.get(rec.id, (None, 0))
            if reader is None:
                reader = SnapshotReader(self._repo, rec)
            self._readers[rec.id] = (reader, users + 1)
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = reader
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        # mfusepy registers its read callback because this exists; DirectReadFUSE serves it with read_into.
        buf = bytearray(size)
        return bytes(buf[: self.read_into(path, buf, offset, fh)])

    def read_into(self, path: str, buf: bytearray | memoryview, offset: int, fh: int) -> int:
        reader = self._handles.get(fh)
        if reader is None:
            raise _fail(errno.EBADF)
        try:
            return reader.read_into(offset, buf)
        except Exception as exc:  # noqa: BLE001  (damage or any failure: EIO, never wrong bytes)
            log.error("dedupimg mount: %s: read of %d bytes at %d failed: %s", path, len(buf), offset, exc)
            raise _fail(errno.EIO) from None

    def lseek(self, path: str, offset: int, whence: int, fh: int) -> int:
        """SEEK_DATA and SEEK_HOLE from the extent map (holes and zero runs are holes), so that cp --sparse,
        qemu-img and other tools that look for holes skip them; the kernel answers the other kinds itself."""
        reader = self._handles.get(fh)
        if reader is None:
            raise _fail(errno.EBADF)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise _fail(errno.EINVAL)
        try:
            found = reader.map.seek(offset, whence == os.SEEK_DATA)
        except Exception as exc:  # noqa: BLE001  (a damaged segment: EIO, as a read)
            log.error("dedupimg mount: %s: seek from %d failed: %s", path, offset, exc)
            raise _fail(errno.EIO) from None
        if found is None:
            raise _fail(errno.ENXIO)
        return found

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            reader = self._handles.pop(fh, None)
            if reader is not None:
                rid = reader.record.id
                users = self._readers[rid][1] - 1
                if users:
                    self._readers[rid] = (reader, users)
                else:
                    del self._readers[rid]
        return 0

    def _read_only(self, *args: object) -> int:
        raise _fail(errno.EROFS)


for _op in ("chmod", "chown", "create", "fallocate", "link", "mkdir", "mknod", "removexattr", "rename", "rmdir",
            "setxattr", "symlink", "truncate", "unlink", "utimens", "write"):
    setattr(SnapshotFS, _op, SnapshotFS._read_only)


# -- mounting ---------------------------------------------------------------------------------------------------


def check_mountpoint(mountpoint: Path) -> Path:
    """The mount point as an absolute path; TargetError unless it is an empty directory, not mounted yet."""
    try:
        st = os.stat(mountpoint)
        entries = os.listdir(mountpoint) if stat.S_ISDIR(st.st_mode) else None
    except FileNotFoundError:
        raise TargetError(f"mount point {mountpoint} does not exist") from None
    except OSError as exc:
        # A FUSE mount whose server died: stat may still answer from the kernel's cache, listing cannot.
        if exc.errno == errno.ENOTCONN:
            raise TargetError(f"{mountpoint} is a dead FUSE mount: run fusermount3 -u {mountpoint}") from None
        raise TargetError(f"cannot use mount point {mountpoint}: {exc.strerror}") from None
    if entries is None:
        raise TargetError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise TargetError(f"{mountpoint} is already a mount point")
    if entries:
        raise TargetError(f"mount point {mountpoint} is not empty")
    return Path(os.path.abspath(mountpoint))


def check_fuse() -> None:
    """MountError unless this machine can mount FUSE: /dev/fuse, libfuse3, and fusermount3 for non-root."""
    try:
        is_device = stat.S_ISCHR(os.stat("/dev/fuse").st_mode)
    except OSError:
        is_device = False
    if not is_device:
        raise MountError("FUSE is not available on this machine: no /dev/fuse (is the fuse module loaded?)")
    if not os.environ.get("FUSE_LIBRARY_PATH") and find_library("fuse3") is None:
        raise MountError("FUSE is not available on this machine: libfuse3 is missing (apt-get install fuse3)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError("FUSE is not available on this machine: fusermount3 is missing (apt-get install fuse3)")


def _mfusepy() -> ModuleType:
    # mfusepy takes libfuse 2 when both are installed; FUSE_LIBRARY_NAME makes it take libfuse3.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except (OSError, AttributeError) as exc:
        raise MountError(f"FUSE is not available on this machine: {exc}") from None
    return mfusepy


def _direct_read_fuse(fuse: ModuleType) -> Any:
    """mfusepy's FUSE, but a read copies the snapshot's bytes straight into libfuse's buffer, instead of
    returning bytes that mfusepy then copies again: one copy of every byte read fewer."""

    class DirectReadFUSE(fuse.FUSE):  # type: ignore[name-defined]
        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            name = None if path is None else path.decode(self.encoding, self.errors)
            address = ctypes.cast(buf, ctypes.c_void_p).value or 0
            dest = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
            return int(self.operations.read_into(name, dest, offset, fip.contents.fh))

        def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
            # libfuse 3.8's lseek, which mfusepy lists but does not wrap (without this, mounting fails).
            name = None if path is None else path.decode(self.encoding, self.errors)
            return int(self.operations.lseek(name, offset, whence, fip.contents.fh))

    return DirectReadFUSE


def serve(
    location: Path | str, mountpoint: Path, ready: Callable[[], None] | None = None, lock_wait: float = 0.0
) -> None:
    """Mount and serve in this thread until unmounted (fusermount3 -u, SIGINT, SIGTERM or SIGHUP)."""
    # Absolute paths: libfuse changes the working directory to / once mounted.
    location, mountpoint = normalize_location(str(location)), Path(os.path.abspath(mountpoint))
    fuse = _mfusepy()

    def on_ready() -> None:
        threading.Thread(target=_raise_read_ahead, args=(mountpoint,), daemon=True).start()
        if ready is not None:
            ready()

    # The serving process holds the shared lock for as long as the mount is up (prune waits for it).
    with Repository.open(location, LockMode.SHARED, lock_wait, "mount") as repo:
        repo.start_read_pool()  # worker processes decompress and verify for the FUSE thread (readpool.py)
        fs = SnapshotFS(repo, on_ready)
        fs.load()  # a damaged index fails here, with its exit code, and not at the first ls
        saved: dict[signal.Signals, Any] = {}
        try:
            for sig in SIGNALS:
                saved[sig] = signal.signal(sig, signal.SIG_DFL)
        except ValueError:
            pass  # not the main thread: signals stay as they are
        fsname = f"dedupimg:{location}".replace("\\", "\\\\").replace(",", "\\,")  # libfuse's -o escapes
        try:
            # The multi-threaded loop with two threads (FUSE_OPTIONS says why), or one when reads run in this
            # process (no read workers), where more threads only contend for the GIL.
            options = {**FUSE_OPTIONS, "max_threads": FUSE_OPTIONS["max_threads"] if repo.parallel_reads else 1}
            _direct_read_fuse(fuse)(fs, str(mountpoint), foreground=True, nothreads=False, fsname=fsname,
                                    **options)
        except RuntimeError:
            # libfuse's loop ends with an error code when a signal stopped it; it has unmounted by then.
            if not fs.was_ready:
                raise MountError(f"could not mount at {mountpoint} (see libfuse's message above)") from None
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _raise_read_ahead(mountpoint: Path) -> None:
    """Best effort (root only): READ_AHEAD_KB of kernel read-ahead for the mount at ``mountpoint``.

    Runs in a thread started by FUSE's init: the stat waits until init is done, and the kernel sets the
    read-ahead from init's answer, so a value written earlier would not stay.
    """
    try:
        dev = os.stat(mountpoint).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError:
        pass  # not root or no sysfs: the kernel's default read-ahead works too


def mount(
    location: Path | str,
    mountpoint: Path,
    foreground: bool = False,
    ready: Callable[[], None] | None = None,
    lock_wait: float = 0.0,
) -> None:
    """Mount the repository's snapshots read-only at ``mountpoint``.

    In the foreground, serve until unmounted; ``ready`` is called (from a FUSE thread) once the mount is up.
    Otherwise fork a server that outlives this process and return once the mount is up, calling ``ready``
    first. The repository is opened by the serving process (an LMDB environment must not cross a fork), so it
    takes a location (a directory or an ``s3:`` URL).
    """
    mountpoint = check_mountpoint(Path(mountpoint))
    check_fuse()
    location = normalize_location(str(location))  # the server runs in /
    if foreground:
        serve(location, mountpoint, ready, lock_wait)
        return
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # a new session, then the server as its child, so that we can reap this one at once
        os.close(rfd)
        os.setsid()
        if os.fork() == 0:
            _daemon(location, mountpoint, wfd, lock_wait)
        os._exit(0)
    os.close(wfd)
    os.waitpid(pid, 0)
    with os.fdopen(rfd, "rb") as pipe:
        status = pipe.read()
    if status != READY:
        raise pickle.loads(status) if status else MountError("the mount process exited before the mount was up")
    if ready is not None:
        ready()


def _daemon(location: str, mountpoint: Path, wfd: int, lock_wait: float) -> NoReturn:
    """The background server: tells the parent READY or its error (pickled) through ``wfd``, then serves."""
    status = os.fdopen(wfd, "wb")
    null = os.open(os.devnull, os.O_RDWR)

    def ready() -> None:
        # stderr stays open until here, so that libfuse's own mount errors still reach the user.
        os.dup2(null, 2)
        try:
            status.write(READY)
            status.close()
        except OSError:
            pass  # the parent is gone; serve anyway

    code = 0
    try:
        os.chdir("/")
        os.dup2(null, 0)
        os.dup2(null, 1)
        serve(location, mountpoint, ready, lock_wait)
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, whatever it is)
        code = 1
        if not isinstance(exc, DedupimgError):
            exc = MountError(f"unexpected {type(exc).__name__}: {exc}")
        try:
            status.write(pickle.dumps(exc))
            status.close()
        except (OSError, ValueError):
            pass
    os._exit(code)
