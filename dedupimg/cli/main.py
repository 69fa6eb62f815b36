"""The ``dedupimg`` entry point: the one place that turns exceptions into exit codes."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dedupimg.core.errors import DedupimgError, Interrupted, PermissionDenied, UsageError
from dedupimg.repo.lock import LockMode
from dedupimg.repo.repository import Repository

app = typer.Typer(
    name="dedupimg",
    help="Deduplicating backups of whole disk and VM images.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    repo: Annotated[
        Path | None,
        # readable=False: an unreadable repository is reported by the command (exit 16), not as a usage error.
        typer.Option("-r", "--repo", envvar="DEDUPIMG_REPO", readable=False,
                     help="Repository directory (or $DEDUPIMG_REPO); also accepted after the command."),
    ] = None,
) -> None:
    ctx.obj = repo


def _repo_after_command(ctx: typer.Context, value: Path | None) -> None:
    """``dedupimg CMD -r PATH`` means ``dedupimg -r PATH CMD``; it overrides $DEDUPIMG_REPO, as ``-r`` does."""
    if value is None:
        return
    root_ctx = ctx.find_root()
    before = root_ctx.obj
    source = root_ctx.get_parameter_source("repo")
    if before is not None and source is not None and source.name == "COMMANDLINE" and Path(before) != value:
        raise UsageError(f"two repositories given: -r {before} before the command and -r {value} after it")
    root_ctx.obj = value


# Every command that takes a repository declares this parameter (its value reaches ``repo_path`` through the
# root context; the function's own argument stays None), so that ``-r`` is accepted after the command too.
RepoOption = Annotated[
    Path | None,
    typer.Option("-r", "--repo", callback=_repo_after_command, expose_value=False, readable=False,
                 show_default=False, help="Repository directory (also accepted before the command)."),
]


def repo_path(ctx: typer.Context) -> Path:
    path = ctx.find_root().obj
    if path is None:
        raise UsageError("no repository given: pass -r/--repo PATH or set DEDUPIMG_REPO")
    return Path(path)


def open_repo(ctx: typer.Context, lock: LockMode | None = None, wait: float = 0.0) -> Repository:
    """The repository of ``-r``; with ``lock``, holding that lock for the command (named in lock messages)."""
    return Repository.open(repo_path(ctx), lock, wait, ctx.info_name or "")


LockWait = Annotated[
    float,
    typer.Option("--lock-wait", metavar="SECONDS", min=0,
                 help="Wait up to this long for a conflicting command's lock to go (default: fail at once)."),
]


def _fail(message: str, code: int, label: str = "error") -> None:
    sys.stderr.write(f"dedupimg: {label}: {message}\n")
    sys.exit(code)


def _on_signal(signum: int, frame: Any) -> None:
    # An ordinary exception, not KeyboardInterrupt: typer would turn that into a silent exit 130, and the
    # operations' cleanup (dropping a half-written pack or restore target) runs for any exception.
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> None:
    # Importing the command modules registers their commands on ``app``.
    from dedupimg.cli import check_cmd, commands, forget_cmd, mount_cmd, serve_cmd  # noqa: F401

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    debug = bool(os.environ.get("DEDUPIMG_DEBUG"))
    try:
        rv = app(args=argv, prog_name="dedupimg", standalone_mode=False)
    except DedupimgError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code, exc.label)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]  # plain `dedupimg`: the help text
            sys.exit(2)
        _fail(f"{exc.format_message()} (see 'dedupimg --help')", exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except OSError as exc:
        if debug:
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            _fail(f"no space left on device ({exc.filename or 'repository'})", 18)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # any path the library did not name better itself
            _fail(f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}", PermissionDenied.exit_code)
        _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
    except Exception as exc:  # noqa: BLE001  (the last line of defence: one line, not a traceback)
        if debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set DEDUPIMG_DEBUG=1 for a traceback)", 1)
    sys.exit(rv if isinstance(rv, int) else 0)
