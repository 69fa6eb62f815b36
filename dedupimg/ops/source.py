"""Snapshot sources: regular and sparse files, block devices, standard input (and, in ops/nbdsource.py, NBD).

A source is a sequence of regions: data to read and chunk, or holes that are recorded as zero extents and
never read. Holes come from SEEK_DATA/SEEK_HOLE, so only filesystems that report them save the reads.
:class:`ImageSource` is what the snapshot pipeline asks of any source; :class:`Source` is the file one.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dedupimg.core.errors import SourceError, UsageError


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileState:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def differences(self, now: FileState) -> str | None:
        """What differs in ``now`` ("size, mtime"), or None."""
        what = [label for label, a, b in (("size", self.size, now.size), ("mtime", self.mtime_ns, now.mtime_ns),
                                          ("ctime", self.ctime_ns, now.ctime_ns)) if a != b]
        return ", ".join(what) or None


@dataclass(frozen=True)
class Region:
    offset: int
    length: int | None  # None: read to the end of the stream
    is_data: bool


class Reader(Protocol):
    """Reads one region into the buffers it is given (0 at the region's end); counts what it read."""

    bytes_read: int

    def __call__(self, out: memoryview) -> int: ...


class ImageSource(Protocol):
    """What a snapshot reads: regions in image order, a reader per data region, positional reads (only of a
    seekable source: ``size`` is not None) and how it changed while it was read."""

    kind: str
    name: str
    size: int | None
    description: str  # what the record names as its source
    resolved: str  # the same with symlinks resolved (the default-name check compares both)

    def regions(self) -> Iterator[Region]: ...

    def reader(self, region: Region, stop: threading.Event | None = None) -> Reader: ...

    def read_at(self, offset: int, out: memoryview) -> None: ...

    def changes(self) -> str | None: ...

    def interrupt(self) -> None:
        """Make a read that is waiting give up (the snapshot is being stopped); called from another thread."""

    def close(self) -> None: ...


class Source:
    def __init__(self, fd: int, kind: str, name: str, size: int | None, description: str) -> None:
        self.fd = fd
        self.kind = kind  # "file", "block" or "stdin"
        self.name = name
        self.size = size  # None for stdin
        self.description = description  # absolute path as given (symlinks not resolved), or <stdin>
        self.resolved = description  # the path with symlinks resolved
        self.before: FileState | None = None  # a regular file's state when opened

    @classmethod
    def open(cls, spec: str, name: str | None = None) -> Source:
        if spec == "-":
            if not name:
                raise UsageError("reading the image from standard input needs --name")
            return cls(sys.stdin.buffer.fileno(), "stdin", name, None, "<stdin>")
        path = Path(spec)
        try:
            # O_NONBLOCK: opening a FIFO without a writer would block until one came; it is refused below.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SourceError(f"source {spec} does not exist") from None
        except PermissionError:
            raise SourceError(f"source {spec} is not readable: permission denied") from None
        except OSError as exc:
            raise SourceError(f"cannot open source {spec}: {exc.strerror}") from None
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode):
            os.set_blocking(fd, True)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise SourceError(f"source {spec} is a directory, not an image file or block device")
        if stat.S_ISBLK(st.st_mode):
            size, kind = os.lseek(fd, 0, os.SEEK_END), "block"
            os.lseek(fd, 0, os.SEEK_SET)
        elif stat.S_ISREG(st.st_mode):
            size, kind = st.st_size, "file"
        elif stat.S_ISFIFO(st.st_mode):
            os.close(fd)
            raise SourceError(f"source {spec} is a FIFO (named pipe), not an image file or block device; "
                              f"to snapshot a stream, pipe it in: dedupimg snapshot - --name NAME < {spec}")
        else:
            os.close(fd)
            raise SourceError(f"source {spec} is not a regular file or block device")
        # The path as given is the stable one: /dev/vg0/db or /dev/disk/by-id/... may resolve to another
        # /dev/dm-N or /dev/sdX after a reboot.
        src = cls(fd, kind, name or path.name, size, os.path.abspath(spec))
        src.resolved = str(path.resolve())
        src.before = FileState.of(st) if kind == "file" else None
        return src

    def changes(self) -> str | None:
        """How a regular-file source changed since it was opened (size, mtime, ctime), or None.

        A source that shrank raises SourceError: its end was read as zeros or not at all, as when a dense
        file ends early. Devices and stdin are not checked (a device's mtime says nothing about its data).
        """
        if self.before is None:
            return None
        now = FileState.of(os.fstat(self.fd))
        if now.size < self.before.size:
            raise SourceError(f"source {self.description} shrank from {self.before.size} to {now.size} bytes "
                              f"while it was read (truncated?)")
        return self.before.differences(now)

    def close(self) -> None:
        if self.kind != "stdin":
            os.close(self.fd)

    def interrupt(self) -> None:
        """Nothing to do: file reads do not wait, and a stdin read polls ``stop``."""

    def regions(self) -> Iterator[Region]:
        if self.size is None:
            yield Region(0, None, True)
            return
        if self.kind != "file":
            yield Region(0, self.size, True)
            return
        yield from _sparse_regions(self.fd, self.size)

    def reader(self, region: Region, stop: threading.Event | None = None) -> ReadInto:
        """Reads one region; a read from stdin waits at most ~0.1 s at a time for data, then checks ``stop``."""
        return ReadInto(self.fd, region.offset, region.length, seekable=self.kind != "stdin", stop=stop)

    def read_at(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` from ``offset`` (files and devices); SourceError if the source ends first."""
        read = ReadInto(self.fd, offset, len(out), seekable=True)
        pos = 0
        while pos < len(out):
            pos += read(out[pos:])


def _sparse_regions(fd: int, size: int) -> Iterator[Region]:
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole, unless the file shrank
                _check_size(fd, size)
                yield Region(pos, size - pos, False)
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # filesystem without SEEK_DATA
                yield Region(pos, size - pos, True)
                return
            raise SourceError(f"cannot find the data regions of the source at offset {pos}: {exc.strerror}") from None
        data = min(data, size)
        if data > pos:
            yield Region(pos, data - pos, False)
        if data >= size:
            return
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError as exc:  # ENXIO: data is now past the end of the file
            _check_size(fd, size)
            raise SourceError(f"cannot find the data regions of the source at offset {data}: {exc.strerror}") from None
        yield Region(data, hole - data, True)
        pos = hole


def _check_size(fd: int, size: int) -> None:
    now = os.fstat(fd).st_size
    if now < size:
        raise SourceError(f"source shrank from {size} to {now} bytes while it was read (truncated?)")


class ReadCancelled(Exception):
    """A read from a stream was given up because ``stop`` was set (the snapshot is being interrupted)."""


class ReadInto:
    """``readinto`` over one region: pread at an offset (files, devices) or plain reads (stdin).

    A stream read first polls for data with a short timeout, so that a stalled writer (``ssh`` hanging, a
    pipe nobody writes to) cannot keep an interrupted snapshot waiting: when ``stop`` is set the read raises
    :class:`ReadCancelled`.
    """

    def __init__(self, fd: int, offset: int, length: int | None, seekable: bool,
                 stop: threading.Event | None = None) -> None:
        self._fd = fd
        self._pos = offset
        self._left = length
        self._seekable = seekable
        self._stop = stop
        self.bytes_read = 0

    def _wait_readable(self) -> None:
        stop = self._stop
        if stop is None:
            return
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLPRI)
        while not poller.poll(100):  # readable, at EOF (POLLHUP) or in error: readv tells which
            if stop.is_set():
                raise ReadCancelled
        if stop.is_set():
            raise ReadCancelled

    def __call__(self, out: memoryview) -> int:
        want = len(out) if self._left is None else min(len(out), self._left)
        if want == 0:
            return 0
        try:
            if self._seekable:
                n = os.preadv(self._fd, [out[:want]], self._pos)
            else:
                self._wait_readable()
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
