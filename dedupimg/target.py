"""Restore targets: a file (temporary name, holes, rename when verified), a block device, or stdout.

With ``in_place`` (delta restore) an existing file or device is opened for reading and writing and updated
where it differs; there is no temporary copy, since writing only the differences is the point.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from dedupimg.errors import TargetError, TargetExists, UsageError
from dedupimg.fsutil import FILE_MODE, fsync_dir, raise_for_space, temp_name
from dedupimg.zeros import ZERO_BLOCK

Buffer = bytes | bytearray | memoryview

IOV_MAX = 512  # buffers per pwritev (Linux allows 1024)
_ZEROS = memoryview(ZERO_BLOCK)


class Target:
    def __init__(self, spec: str, size: int, force: bool, in_place: bool = False) -> None:
        self.spec = spec
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
        path = Path(spec)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise TargetError(f"cannot use target {spec}: {exc.strerror}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise TargetError(f"target {spec} is a directory; give a file path")
        if st is not None and stat.S_ISBLK(st.st_mode):
            if not (force or in_place):
                raise TargetExists(f"target {spec} is a block device; pass --force to overwrite it")
            self._open_existing(path, size, device=True, in_place=in_place)
        elif st is not None and in_place:
            self._open_existing(path, size, device=False, in_place=True)
        else:
            if st is not None and not force:
                raise TargetExists(f"target {spec} exists; pass --force to replace it (or --delta to update it)")
            self._open_temp(path, size)

    def _open_existing(self, path: Path, size: int, device: bool, in_place: bool) -> None:
        self.fd = _open(path, os.O_RDWR if in_place else os.O_WRONLY)
        self.readable = in_place
        end = os.lseek(self.fd, 0, os.SEEK_END)
        if device and end < size:
            self.close()
            raise TargetError(f"block device {self.spec} holds {end} bytes; the image needs {size}")
        if not device:
            self._truncate(size)

    def _open_temp(self, path: Path, size: int) -> None:
        if not path.parent.is_dir():
            raise TargetError(f"directory {path.parent} of target {self.spec} does not exist")
        self.final = path
        self.tmp = temp_name(path)
        self.fd = _open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self.sparse = True
        self._truncate(size)  # zero extents stay holes

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


def _open(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    try:
        return os.open(path, flags, mode)
    except OSError as exc:
        raise TargetError(f"cannot open target {path}: {exc.strerror}") from None


class NullTarget:
    """Discards the image: ``verify`` runs the restore pipeline (every check included) without writing."""

    sparse = True
    seekable = True
    readable = False
    tmp: Path | None = None

    def read(self, offset: int, length: int) -> bytes:  # pragma: no cover - never readable
        raise TargetError("nothing to read")

    def write(self, offset: int, buffers: Sequence[Buffer]) -> None:
        pass

    def write_zeros(self, offset: int, length: int) -> int:
        return 0

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
