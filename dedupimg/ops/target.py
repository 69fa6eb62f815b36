"""Restore targets: a file (temporary name, holes, rename when verified), a block device, or stdout.

With ``in_place`` (delta restore) an existing file or device is opened for reading and writing and updated
where it differs; there is no temporary copy, since writing only the differences is the point.

What would destroy the wrong thing is refused: a symlink is followed and what it points at gets every rule
(messages name both); character devices, FIFOs, sockets and directories are never written, ``--force`` or
not; a block device is opened with O_EXCL, so a mounted or otherwise held one is refused (naming what holds
it, as mkfs does); an existing entry, a dangling symlink included, needs ``--force``; a replaced file's owner,
group and mode are kept.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from dedupimg.core.errors import TargetError, TargetExists, UsageError
from dedupimg.core.fsutil import FILE_MODE, fsync_dir, raise_for_space, temp_name
from dedupimg.core.zeros import ZERO_BLOCK

Buffer = bytes | bytearray | memoryview

IOV_MAX = 512  # buffers per pwritev (Linux allows 1024)
_ZEROS = memoryview(ZERO_BLOCK)


class Target:
    def __init__(self, spec: str, size: int, force: bool, in_place: bool = False) -> None:
        self.spec = spec
        self.shown = spec  # the target as named in messages: "LINK (a symlink to PATH)" for a symlink
        self.in_place = False  # writes go straight to the target (a device, --delta): a failure leaves it partial
        self.tmp: Path | None = None
        self.final: Path | None = None
        self.sparse = False  # zero extents need no writes (a fresh file is all holes)
        self.seekable = True
        self.readable = False  # the current content can be read (delta restore)
        self.fd = -1
        if spec == "-":
            if in_place:
                raise UsageError("--delta needs a file or block device target, not standard output")
            if sys.stdout.isatty():
                raise UsageError("refusing to write a disk image to a terminal; redirect standard output")
            self.fd = sys.stdout.buffer.fileno()
            self.seekable = False
            return
        path, self.shown, is_link = _follow(spec)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise TargetError(f"cannot use target {self.shown}: {exc.strerror}") from None
        if st is None:
            if is_link and not force:
                raise TargetExists(f"target {self.shown} is dangling: nothing exists there; pass --force to "
                                   f"create {path}")
            self._open_temp(path, size, keep=None)
            return
        kind = _unwritable_kind(st.st_mode)
        if kind:
            raise TargetError(f"target {self.shown} is {kind}; give a file path or a block device")
        if stat.S_ISBLK(st.st_mode):
            if not (force or in_place):
                raise TargetExists(f"target {self.shown} is a block device; pass --force to overwrite it")
            self._open_device(path, st.st_rdev, size, in_place)
        elif in_place:
            self.fd = _open(path, os.O_RDWR, self.shown)
            self.readable = self.in_place = True
            self._truncate(size)
        else:
            if not force:
                raise TargetExists(
                    f"target {self.shown} exists; pass --force to replace it (or --delta to update it)"
                )
            self._open_temp(path, size, keep=st)

    def _open_device(self, path: Path, rdev: int, size: int, in_place: bool) -> None:
        """Open a block device exclusively (O_EXCL), as mkfs does: a mounted or held device is refused."""
        try:
            self.fd = os.open(path, (os.O_RDWR if in_place else os.O_WRONLY) | os.O_EXCL)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise TargetError(
                    f"block device {self.shown} is in use ({device_users(rdev)}); refusing to write to it"
                ) from None
            raise TargetError(f"cannot open target {self.shown}: {exc.strerror}") from None
        self.readable = in_place
        self.in_place = True
        end = os.lseek(self.fd, 0, os.SEEK_END)
        if end < size:
            self.close()
            raise TargetError(f"block device {self.shown} holds {end} bytes; the image needs {size}")

    def _open_temp(self, path: Path, size: int, keep: os.stat_result | None) -> None:
        """A new file under a temporary name; ``keep``: the file it will replace, whose owner and mode it gets."""
        if not path.parent.is_dir():
            raise TargetError(f"directory {path.parent} of target {self.shown} does not exist")
        self.final = path
        self.tmp = temp_name(path)
        try:  # the caller gets this target only once it is whole: until then a failure or interrupt removes the file
            self.fd = _open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            if keep is not None:
                try:
                    os.fchown(self.fd, keep.st_uid, keep.st_gid)  # before chmod: chown clears set-id bits
                    os.fchmod(self.fd, stat.S_IMODE(keep.st_mode))
                except OSError as exc:
                    raise TargetError(
                        f"cannot give the new {self.shown} the owner {keep.st_uid}:{keep.st_gid} and mode "
                        f"{stat.S_IMODE(keep.st_mode):o} of the file it replaces: {exc.strerror}"
                    ) from None
            self.sparse = True
            self._truncate(size)  # zero extents stay holes
        except BaseException:
            self.abort()
            raise

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self.abort()
            raise_for_space(exc, self.spec)
            raise TargetError(f"cannot size target {self.spec}: {exc.strerror}") from None

    def read(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise TargetError(f"cannot read target {self.spec} at {offset}: {exc.strerror}") from None

    def write(self, offset: int, buffers: Sequence[Buffer]) -> None:
        try:
            for i in range(0, len(buffers), IOV_MAX):
                group = buffers[i : i + IOV_MAX]
                if self.seekable:
                    offset += self._pwrite_all(group, offset)
                else:
                    for b in group:
                        view = memoryview(b)
                        while view:
                            view = view[os.write(self.fd, view) :]
        except BrokenPipeError:
            raise TargetError("output pipe closed before the image was complete") from None
        except OSError as exc:
            raise_for_space(exc, self.spec)
            raise TargetError(f"cannot write target {self.spec}: {exc.strerror}") from None

    def start_writeback(self, offset: int, length: int) -> None:
        """Have the kernel start writing ``[offset, offset+length)`` to the disk now, without waiting for it.

        Otherwise the whole image sits dirty in the page cache until the final fdatasync, which then took a
        fifth of a 2 GiB restore (0.65 of 3.3 s) with the disk idle until then. POSIX_FADV_DONTNEED starts
        writeback of dirty pages (and drops only pages that are already clean)."""
        if self.seekable:
            try:
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # only advice: the final fdatasync still makes everything durable

    def _pwrite_all(self, buffers: Sequence[Buffer], offset: int) -> int:
        total = sum(len(b) for b in buffers)
        done = os.pwritev(self.fd, buffers, offset)
        if done != total:  # short write: finish it piece by piece
            rest = memoryview(b"".join(buffers))[done:]
            while rest:
                n = os.pwrite(self.fd, rest, offset + done)
                done += n
                rest = rest[n:]
        return total

    def write_zeros(self, offset: int, length: int) -> int:
        """Make ``[offset, offset+length)`` zero; returns the bytes actually written."""
        if self.sparse:
            return 0
        written = 0
        while written < length:
            n = min(length - written, len(ZERO_BLOCK))
            self.write(offset + written, [_ZEROS[:n]])
            written += n
        return written

    def commit(self) -> None:
        """Make the restored image durable and, for a new file, move it into place."""
        try:
            if self.seekable:
                os.fdatasync(self.fd)
        except OSError as exc:
            raise_for_space(exc, self.spec)
            raise TargetError(f"cannot flush target {self.spec}: {exc.strerror}") from None
        if self.tmp is not None and self.final is not None:
            self.close()
            os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
            self.tmp = None

    def close(self) -> None:
        if self.fd >= 0 and self.spec != "-":
            os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        self.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def _open(path: Path, flags: int, shown: str | None = None) -> int:
    try:
        return os.open(path, flags, FILE_MODE)
    except OSError as exc:
        raise TargetError(f"cannot open target {shown or path}: {exc.strerror}") from None


def _follow(spec: str) -> tuple[Path, str, bool]:
    """The path to write (a symlink followed to its end), the target as messages name it, and if it is a link.

    ``/dev/disk/by-id/...`` links are the normal way to name a disk, so a link is never replaced: what it
    points at is the target, and gets every rule.
    """
    try:
        if not stat.S_ISLNK(os.lstat(spec).st_mode):
            return Path(spec), spec, False
    except FileNotFoundError:
        return Path(spec), spec, False
    except OSError as exc:
        raise TargetError(f"cannot use target {spec}: {exc.strerror}") from None
    try:
        real = os.path.realpath(spec, strict=True)
    except FileNotFoundError:
        real = os.path.realpath(spec)  # dangling: where the last link points
    except OSError as exc:  # a loop of links
        raise TargetError(f"cannot follow symlink {spec}: {exc.strerror}") from None
    return Path(real), f"{spec} (a symlink to {real})", True


def _unwritable_kind(mode: int) -> str | None:
    """What a target is that no restore may write, ``--force`` or not (None: a file or a block device)."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file or block device"


def _unescape(field: str) -> str:
    """A path from /proc/self/mountinfo or /proc/swaps (space, tab, newline and backslash are octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def device_users(rdev: int) -> str:
    """What holds a block device (or one of its partitions), as a phrase: mounts, swap, device-mapper, md."""
    sysfs = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    devices = {f"{os.major(rdev)}:{os.minor(rdev)}": ""}  # maj:min -> "" (the device) or "partition NAME "
    dirs = [sysfs]
    try:
        for part in sysfs.iterdir():
            if (part / "partition").exists():
                devices[(part / "dev").read_text().strip()] = f"partition {part.name} "
                dirs.append(part)
    except OSError:
        pass
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                source = fields[fields.index("-") + 2] if "-" in fields else ""
                which = devices.get(fields[2])
                if which is None and source.startswith("/dev/"):
                    try:  # btrfs and others report an anonymous device number: match the source instead
                        which = devices.get(_majmin(os.stat(source)))
                    except OSError:
                        pass
                if which is not None:
                    found.append(f"{which}mounted on {_unescape(fields[4])}")
    except OSError:
        pass
    try:
        with open("/proc/swaps") as f:
            for line in list(f)[1:]:
                try:
                    which = devices.get(_majmin(os.stat(_unescape(line.split()[0]))))
                except (OSError, IndexError):
                    continue
                if which is not None:
                    found.append(f"{which}used as swap")
    except OSError:
        pass
    for d in dirs:
        try:
            holders = sorted(h.name for h in (d / "holders").iterdir())
        except OSError:
            continue
        which = "" if d == sysfs else f"partition {d.name} "
        for h in holders:
            try:
                h += f" ({(d / 'holders' / h / 'dm' / 'name').read_text().strip()})"
            except OSError:
                pass
            found.append(f"{which}held by {h}")
    found = list(dict.fromkeys(found))  # a bind mount lists the same mount point's device again
    if not found:
        return "opened exclusively by another program"
    return ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")


def _majmin(st: os.stat_result) -> str:
    if not stat.S_ISBLK(st.st_mode):
        return ""
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


class NullTarget:
    """Discards the image: ``verify`` runs the restore pipeline (every check included) without writing."""

    sparse = True
    seekable = True
    readable = False
    in_place = False
    tmp: Path | None = None

    def read(self, offset: int, length: int) -> bytes:  # pragma: no cover - never readable
        raise TargetError("nothing to read")

    def write(self, offset: int, buffers: Sequence[Buffer]) -> None:
        pass

    def write_zeros(self, offset: int, length: int) -> int:
        return 0

    def start_writeback(self, offset: int, length: int) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
