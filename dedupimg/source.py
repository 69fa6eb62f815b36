"""Snapshot sources: regular and sparse files, block devices, standard input.

A source is a sequence of regions: data to read and chunk, or holes that are recorded as zero extents and
never read. Holes come from SEEK_DATA/SEEK_HOLE, so only filesystems that report them save the reads.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dedupimg.errors import SourceError, UsageError


@dataclass(frozen=True)
class Region:
    offset: int
    length: int | None  # None: read to the end of the stream
    is_data: bool


class Source:
    def __init__(self, fd: int, kind: str, name: str, size: int | None, description: str) -> None:
        self.fd = fd
        self.kind = kind  # "file", "block" or "stdin"
        self.name = name
        self.size = size  # None for stdin
        self.description = description

    @classmethod
    def open(cls, spec: str, name: str | None = None) -> Source:
        if spec == "-":
            if not name:
                raise UsageError("reading the image from standard input needs --name")
            return cls(sys.stdin.buffer.fileno(), "stdin", name, None, "<stdin>")
        path = Path(spec)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SourceError(f"source {spec} does not exist") from None
        except PermissionError:
            raise SourceError(f"source {spec} is not readable: permission denied") from None
        except OSError as exc:
            raise SourceError(f"cannot open source {spec}: {exc.strerror}") from None
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise SourceError(f"source {spec} is a directory, not an image file or block device")
        if stat.S_ISBLK(st.st_mode):
            size, kind = os.lseek(fd, 0, os.SEEK_END), "block"
            os.lseek(fd, 0, os.SEEK_SET)
        elif stat.S_ISREG(st.st_mode):
            size, kind = st.st_size, "file"
        else:
            os.close(fd)
            raise SourceError(f"source {spec} is not a regular file or block device")
        return cls(fd, kind, name or path.name, size, str(path.resolve()))

    def close(self) -> None:
        if self.kind != "stdin":
            os.close(self.fd)

    def regions(self) -> Iterator[Region]:
        if self.size is None:
            yield Region(0, None, True)
            return
        if self.kind != "file":
            yield Region(0, self.size, True)
            return
        yield from _sparse_regions(self.fd, self.size)

    def reader(self, region: Region) -> ReadInto:
        return ReadInto(self.fd, region.offset, region.length, seekable=self.kind != "stdin")


def _sparse_regions(fd: int, size: int) -> Iterator[Region]:
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                yield Region(pos, size - pos, False)
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # filesystem without SEEK_DATA
                yield Region(pos, size - pos, True)
                return
            raise
        data = min(data, size)
        if data > pos:
            yield Region(pos, data - pos, False)
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield Region(data, hole - data, True)
        pos = hole


class ReadInto:
    """``readinto`` over one region: pread at an offset (files, devices) or plain reads (stdin)."""

    def __init__(self, fd: int, offset: int, length: int | None, seekable: bool) -> None:
        self._fd = fd
        self._pos = offset
        self._left = length
        self._seekable = seekable
        self.bytes_read = 0

    def __call__(self, out: memoryview) -> int:
        want = len(out) if self._left is None else min(len(out), self._left)
        if want == 0:
            return 0
        try:
            if self._seekable:
                n = os.preadv(self._fd, [out[:want]], self._pos)
            else:
                n = os.readv(self._fd, [out[:want]])
        except OSError as exc:
            raise SourceError(f"read error at offset {self._pos}: {exc.strerror}") from None
        if n == 0 and self._left:
            raise SourceError(f"source ended early at offset {self._pos} (was it truncated while reading?)")
        self._pos += n
        self.bytes_read += n
        if self._left is not None:
            self._left -= n
        return n
