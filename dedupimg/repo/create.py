"""A new local repository's directory, all or nothing: `init` that fails or is killed midway leaves nothing
that the next `init` refuses.

A path that does not exist is built whole under a temporary name beside it (``.NAME.init-PID-HEX``) and renamed
into place, the parent fsynced; a failure removes the temporary directory, and one a killed init left (its
process gone) is removed by the next init of the same path. An existing empty directory (a mount point cannot
be renamed onto) is built in place behind a marker file (INIT_MARKER), made first and removed once the config
is written: the next init clears what a killed one left there. What goes into the directory is the caller's
(``build``: Repository.init's files, the config last).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dedupimg.core.errors import PermissionDenied, RepositoryExists
from dedupimg.core.fsutil import DIR_MODE, FILE_MODE, fsync_dir, make_dirs, raise_for_space

T = TypeVar("T")

INIT_TEMP = ".{name}.init-"
INIT_MARKER = ".init-unfinished"
CONFIG = "config"  # a directory holding it is a repository (repo/repository.py's CONFIG)


def beside(path: Path, build: Callable[[Path], T]) -> T:
    """A new repository at ``path``, which does not exist: ``build`` fills a temporary directory in the same
    parent, which is then renamed into place (and the parent fsynced). Until the rename there is nothing at
    ``path``."""
    parent = path.parent
    make_dirs(parent)
    _remove_dead_inits(parent, INIT_TEMP.format(name=path.name))
    temp = parent / f"{INIT_TEMP.format(name=path.name)}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        os.mkdir(temp, DIR_MODE)
    except OSError as exc:
        _raise_init_error(exc, path)
        raise
    try:
        made = build(temp)
        try:
            os.rename(temp, path)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise RepositoryExists(f"{path} was created by someone else while init ran; refusing to "
                                       "replace it") from None
            raise
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, OSError):
            _raise_init_error(exc, path)
        raise
    fsync_dir(parent)
    return made


def in_place(path: Path, entries: set[str], build: Callable[[Path], T]) -> T:
    """A new repository in the existing directory ``path``: it must be empty, or hold only what an init killed
    there left (INIT_MARKER and some of ``entries``, the names ``build`` makes but the config), which is removed
    first. A failure removes what this init made; the marker is removed once ``build`` has written the
    config."""
    names = set(os.listdir(path))
    if names and not (INIT_MARKER in names and CONFIG not in names and names <= entries | {INIT_MARKER}):
        raise RepositoryExists(f"{path} exists and is not empty; refusing to create a repository there")
    for name in names - {INIT_MARKER}:
        shutil.rmtree(path / name)  # an unfinished init's directories
    os.chmod(path, DIR_MODE)
    marker = path / INIT_MARKER
    if INIT_MARKER not in names:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    fsync_dir(path)
    try:
        made = build(path)
    except BaseException:
        for name in entries:
            shutil.rmtree(path / name, ignore_errors=True)
        try:  # the marker last: if anything above is left, the next init still knows it for init's
            marker.unlink()
            fsync_dir(path)
        except OSError:
            pass
        raise
    marker.unlink()
    fsync_dir(path)
    return made


def _raise_init_error(exc: OSError, path: Path) -> None:
    """init's OS errors named by the repository's path, not by the temporary name it was being built under."""
    raise_for_space(exc, path)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise PermissionDenied(f"cannot create repository {path}: {exc.strerror}") from None


def _remove_dead_inits(parent: Path, prefix: str) -> None:
    """Remove the temporary directories that killed inits of this path left in ``parent`` (their process, named
    in the directory's name, is gone). Another init's, still running, stays."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or pid == str(os.getpid()) or _process_alive(int(pid)):
            continue
        shutil.rmtree(parent / name, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True
