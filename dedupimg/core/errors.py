"""The one exception tree of dedupimg.

Every error the library raises on purpose derives from :class:`DedupimgError` and carries its process exit
code, so that the CLI has exactly one place that turns an exception into an exit (``dedupimg.cli.main``).
Each class's docstring is what its code means to a script; EXIT_CODES below is the table by code, the same as
README.md's and each command's ``--help`` (tests/cli/test_errors.py checks that the three agree). Classes share
a code only where a script has nothing to tell apart: the message says which case it was.
"""

from __future__ import annotations


class DedupimgError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user (after ``dedupimg: {label}:``)."""

    exit_code = 1
    label = "error"


class UsageError(DedupimgError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class SourceChanged(DedupimgError):
    """The snapshot was stored, but its source changed while it was read (restic's "incomplete snapshot").

    Raised by the CLI after it printed the snapshot's id: the image may match no single moment of the disk.
    """

    exit_code = 3
    label = "warning"


class RepositoryNotFound(DedupimgError):
    """There is no repository at the path given: it does not exist (``init`` makes one)."""

    exit_code = 10


class NotARepository(DedupimgError):
    """There is no repository at the path given: it exists but is not a dedupimg repository (no config)."""

    exit_code = 10


class RepositoryExists(DedupimgError):
    """``init``: the path is taken (a file, a non-empty directory, a repository) or lies inside a repository."""

    exit_code = 21


class RepositoryLocked(DedupimgError):
    """Another process holds a conflicting lock on the repository (``--lock-wait`` waits for it)."""

    exit_code = 11


class UnsupportedFormat(DedupimgError):
    """The repository's format version is not supported by this dedupimg, or its config is damaged."""

    exit_code = 12


class SnapshotNotFound(DedupimgError):
    """No snapshot matches the id, prefix, ``latest`` or ``NAME@latest`` given."""

    exit_code = 13


class AmbiguousSnapshot(DedupimgError):
    """The snapshot reference matches more than one snapshot (a short prefix; ``latest`` over several names)."""

    exit_code = 14


class TargetExists(DedupimgError):
    """The restore target exists (``--force`` replaces it)."""

    exit_code = 15


class SourceError(DedupimgError):
    """The snapshot source is missing, unreadable or not an image (a directory, say)."""

    exit_code = 16


class TargetError(DedupimgError):
    """The restore target (or mount point) cannot be used: not writable, the wrong kind of file, busy, ..."""

    exit_code = 16


class PermissionDenied(DedupimgError):
    """A file of the repository (its config, index or packs) cannot be read or written: permission denied."""

    exit_code = 16


class UnusablePath(DedupimgError):
    """A directory dedupimg keeps its own files in cannot be used: a repository's ``tmp/`` that is missing or not
    a directory, a cache directory on a read-only filesystem or below a file. The message names the path."""

    exit_code = 16


class IntegrityError(DedupimgError):
    """Stored data does not match its hash, a pack or record is damaged, or the index is missing or damaged
    (the message then says to run ``dedupimg repair index``, which rebuilds it from the packs)."""

    exit_code = 17


class CheckFailed(IntegrityError):
    """``check`` found something wrong (the findings are printed before this one-line summary)."""


class NoSpaceError(DedupimgError):
    """No space left on the device of the repository or of the restore target."""

    exit_code = 18


class Interrupted(DedupimgError):
    """SIGINT or SIGTERM ended the command; nothing partial is kept (a stopped ``serve`` exits 0)."""

    exit_code = 130


class OutputClosed(DedupimgError):
    """Standard output was closed by its reader (``dedupimg snapshots | head -1``): the command stops quietly,
    with no message, and exits 141, the code a shell reports for a process that SIGPIPE ended."""

    exit_code = 141


class WrongPassword(DedupimgError):
    """22: the password opens no key of the repository, or none was given (no terminal to ask on)."""

    exit_code = 22
    label = "error"


class UnchangedMismatch(DedupimgError):
    """An incremental snapshot (``--parent``) found a range its change list calls unchanged that differs from
    the parent (``--verify-unchanged``): nothing was stored; take a full snapshot and start a new bitmap."""

    exit_code = 23


class ListenError(DedupimgError):
    """``serve`` cannot listen on the address asked for (port in use, not a local address, ...)."""

    exit_code = 19


class MountError(DedupimgError):
    """``mount``: FUSE is not available on this machine (no /dev/fuse, no libfuse3), or the mount failed."""

    exit_code = 20


# The codes by number, as README.md documents them and each command's --help lists them; tests check that this
# table, README's and the classes agree.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error",
    2: "usage error (bad arguments, stdin without --name, ...)",
    3: "snapshot stored, but its source changed while it was read (it may match no moment of the disk)",
    10: "no repository at the path (missing, or not a dedupimg repository)",
    11: "repository locked by another process",
    12: "unsupported repository format version or damaged config",
    13: "no such snapshot",
    14: "snapshot reference is ambiguous",
    15: "restore target exists (use --force)",
    16: "a path cannot be read or written: the source, the target or mount point, or the repository's files or "
        "cache directory (permission denied, missing, the wrong kind of file, a read-only filesystem)",
    17: "integrity error: stored data or a restored image does not match its hash; check found a problem; "
        "the index is missing or damaged (run 'dedupimg repair index')",
    18: "no space left on the repository's or target's device",
    19: "cannot listen on the address (port in use, not a local address)",
    20: "FUSE is not available on this machine (no /dev/fuse or libfuse3), or the mount failed",
    21: "init: the path is taken (a file, a non-empty directory, a repository) or inside a repository",
    22: "wrong or missing password (no key of the repository opens with it)",
    23: "snapshot --verify-unchanged: a range the change list calls unchanged differs from the parent "
        "(nothing stored; take a full snapshot)",
    130: "interrupted",
    141: "standard output closed by its reader (a pipe into head): stopped quietly",
}
