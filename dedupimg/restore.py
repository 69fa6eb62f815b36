"""Restoring a snapshot to a file, a block device or standard output, verified against the image hash."""

from __future__ import annotations

import os
import stat
import sys
import time as _time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from dedupimg.errors import IntegrityError, TargetError, TargetExists, UsageError
from dedupimg.fsutil import FILE_MODE, fsync_dir, raise_for_space, temp_name
from dedupimg.manifest import SnapshotRecord
from dedupimg.progress import NoProgress, Progress
from dedupimg.repository import Repository
from dedupimg.zeros import ZERO_BLOCK, hash_zeros

READ_BATCH = 8 << 20  # bytes of chunks read and written per batch
IOV_MAX = 512  # buffers per pwritev (Linux allows 1024)


@dataclass(frozen=True)
class RestoreResult:
    record: SnapshotRecord
    target: str
    bytes_written: int
    seconds: float


class _Target:
    """Where the bytes go. Files are written under a temporary name and renamed when verified."""

    def __init__(self, spec: str, size: int, force: bool) -> None:
        self.spec = spec
        self.tmp: Path | None = None
        self.final: Path | None = None
        self.sparse = False
        self.seekable = True
        if spec == "-":
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
        if st is not None and stat.S_ISBLK(st.st_mode):
            if not force:
                raise TargetExists(f"target {spec} is a block device; pass --force to overwrite it")
            self.fd = _open(path, os.O_WRONLY)
            dev_size = os.lseek(self.fd, 0, os.SEEK_END)
            if dev_size < size:
                os.close(self.fd)
                raise TargetError(f"block device {spec} holds {dev_size} bytes; the image needs {size}")
            return
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise TargetError(f"target {spec} is a directory; give a file path")
            if not force:
                raise TargetExists(f"target {spec} exists; pass --force to replace it")
        if not path.parent.is_dir():
            raise TargetError(f"directory {path.parent} of target {spec} does not exist")
        self.final = path
        self.tmp = temp_name(path)
        self.fd = _open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self.sparse = True
        try:
            os.ftruncate(self.fd, size)  # zero extents stay holes
        except OSError as exc:
            self.abort()
            raise_for_space(exc, spec)
            raise TargetError(f"cannot size target {spec}: {exc.strerror}") from None

    def write(self, offset: int, buffers: list[bytes]) -> None:
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

    def _pwrite_all(self, buffers: list[bytes], offset: int) -> int:
        total = sum(len(b) for b in buffers)
        done = os.pwritev(self.fd, buffers, offset)
        if done != total:  # short write: finish it piece by piece
            rest = memoryview(b"".join(buffers))[done:]
            while rest:
                n = os.pwrite(self.fd, rest, offset + done)
                done += n
                rest = rest[n:]
        return total

    def write_zeros(self, offset: int, length: int) -> None:
        if self.sparse:
            return
        while length > 0:
            n = min(length, len(ZERO_BLOCK))
            self.write(offset, [memoryview(ZERO_BLOCK)[:n]])  # type: ignore[list-item]
            offset += n
            length -= n

    def commit(self) -> None:
        try:
            if self.seekable:
                os.fsync(self.fd)
        except OSError as exc:
            raise_for_space(exc, self.spec)
            raise TargetError(f"cannot flush target {self.spec}: {exc.strerror}") from None
        if self.tmp is not None and self.final is not None:
            os.close(self.fd)
            self.fd = -1
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


def restore(
    repo: Repository,
    ref: str,
    target: str,
    force: bool = False,
    name: str | None = None,
    progress: Progress | None = None,
) -> RestoreResult:
    progress = progress or NoProgress()
    started = _time.monotonic()
    record = repo.resolve(ref, name)
    if target == "-" and sys.stdout.isatty():
        raise UsageError("refusing to write a disk image to a terminal; redirect standard output")
    out = _Target(target, record.size, force)
    try:
        progress.start(f"restore {record.short_id}", record.size)
        hasher = blake3.blake3()
        written = 0
        for offset, length, data in iter_image(repo, record):
            if data is None:
                hash_zeros(hasher, length)
                out.write_zeros(offset, length)
                if not out.sparse:
                    written += length
            else:
                for b in data:
                    hasher.update(b)
                out.write(offset, data)
                written += length
            progress.advance(length)
        if hasher.digest() != record.image_hash:
            raise IntegrityError(
                f"restored image of snapshot {record.short_id} does not match its recorded blake3; "
                "the target was not written"
            )
        out.commit()
        progress.finish()
    except BaseException:
        out.abort()
        raise
    out.close()
    return RestoreResult(record, target, written, _time.monotonic() - started)


def iter_image(repo: Repository, record: SnapshotRecord) -> Iterator[tuple[int, int, list[bytes] | None]]:
    """The image as runs: ``(offset, length, None)`` for zeros, ``(offset, length, [chunk bytes...])``."""
    offset = 0
    for seg_id, seg_len in record.segments:
        segment = repo.segment(seg_id)
        if segment.size != seg_len:
            raise IntegrityError(f"manifest segment {seg_id.hex()[:16]} has the wrong length")
        run_start = run_bytes = 0
        run_ids: list[bytes] = []
        run_lens: list[int] = []
        for length, id_ in segment.extents():
            if id_ is None:
                if run_ids:
                    yield run_start, run_bytes, _read_run(repo, run_ids, run_lens, run_start)
                    run_ids, run_lens = [], []
                yield offset, length, None
            else:
                if not run_ids:
                    run_start, run_bytes = offset, 0
                run_ids.append(id_)
                run_lens.append(length)
                run_bytes += length
                if run_bytes >= READ_BATCH:
                    yield run_start, run_bytes, _read_run(repo, run_ids, run_lens, run_start)
                    run_ids, run_lens = [], []
            offset += length
        if run_ids:
            yield run_start, run_bytes, _read_run(repo, run_ids, run_lens, run_start)


def _read_run(repo: Repository, ids: list[bytes], lengths: list[int], start: int) -> list[bytes]:
    try:
        data = repo.read_blobs(ids)
    except IntegrityError as exc:
        end = start + sum(lengths)
        raise IntegrityError(f"damaged data in image range {start}-{end}: {exc}") from None
    for d, n in zip(data, lengths, strict=True):
        if len(d) != n:
            raise IntegrityError(f"chunk length does not match its extent near image offset {start}")
    return data
