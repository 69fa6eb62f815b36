"""The one exception tree of dedupimg.

Every error the library raises on purpose derives from :class:`DedupimgError` and carries its process exit
code, so that the CLI has exactly one place that turns an exception into an exit (``dedupimg.cli.main``).
Codes are documented in README.md and in each command's help; keep them unique per class.
"""

from __future__ import annotations


class DedupimgError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_code = 1


class UsageError(DedupimgError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class RepositoryNotFound(DedupimgError):
    exit_code = 10


class NotARepository(DedupimgError):
    exit_code = 10


class RepositoryExists(DedupimgError):
    exit_code = 10


class RepositoryLocked(DedupimgError):
    exit_code = 11


class UnsupportedFormat(DedupimgError):
    exit_code = 12


class SnapshotNotFound(DedupimgError):
    exit_code = 13


class AmbiguousSnapshot(DedupimgError):
    exit_code = 14


class TargetExists(DedupimgError):
    exit_code = 15


class SourceError(DedupimgError):
    """The snapshot source is missing, unreadable or not an image (a directory, say)."""

    exit_code = 16


class TargetError(DedupimgError):
    """The restore target cannot be written."""

    exit_code = 16


class IntegrityError(DedupimgError):
    """Stored data does not match its hash, or a pack or record is damaged."""

    exit_code = 17


class CheckFailed(IntegrityError):
    """``check`` found something wrong (the findings are printed before this one-line summary)."""


class NoSpaceError(DedupimgError):
    exit_code = 18


class Interrupted(DedupimgError):
    exit_code = 130


class ListenError(DedupimgError):
    """``serve`` cannot listen on the address asked for (port in use, not a local address, ...)."""

    exit_code = 19


class MountError(DedupimgError):
    """``mount``: FUSE is not available on this machine (no /dev/fuse, no libfuse3), or the mount failed."""

    exit_code = 20


# The codes as documented; tests check that this table and the classes agree.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error",
    2: "usage error (bad arguments, stdin without --name, ...)",
    10: "repository missing, not a repository, or already exists",
    11: "repository locked by another process",
    12: "unsupported repository format version or damaged config",
    13: "no such snapshot",
    14: "snapshot reference is ambiguous",
    15: "restore target exists (use --force)",
    16: "source or target cannot be read or written",
    17: "integrity error: stored data or a restored image does not match its hash; check found a problem; "
        "the index is missing (run 'dedupimg repair index')",
    18: "no space left on the repository's or target's device",
    19: "cannot listen on the address (port in use, not a local address)",
    20: "FUSE is not available on this machine (no /dev/fuse or libfuse3), or the mount failed",
    130: "interrupted",
}
