"""Crash-safe file primitives: every durable write goes through here.

The pattern is always: write to a temporary name in the same directory, fsync the file, rename it into
place, fsync the directory. Only after that may an index transaction point at the file.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from dedupimg.core.errors import NoSpaceError

FILE_MODE = 0o600
DIR_MODE = 0o700


def printable_utf8(text: str) -> bool:
    """Whether ``text`` (a path or name, whose undecodable bytes Python holds as surrogate escapes) is valid
    UTF-8 without control characters: what snapshot records, LMDB paths and one-line messages can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return text.isprintable()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create ``path`` (owner-only) and make its new entry durable in the parent."""
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    fsync_dir(path.parent)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content."""
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise_for_space(exc, path)
        raise
    fsync_dir(path.parent)


def raise_for_space(exc: OSError, where: Path | str) -> None:
    """Turn ENOSPC/EDQUOT into the documented error; other errors are the caller's to handle."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpaceError(f"no space left on device while writing {where}") from exc
