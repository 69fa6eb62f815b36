"""The ``dedupimg`` entry point: the one place that turns exceptions into exit codes."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dedupimg.errors import DedupimgError, Interrupted, UsageError
from dedupimg.lock import LockMode
from dedupimg.repository import Repository

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
        typer.Option("-r", "--repo", envvar="DEDUPIMG_REPO", help="Repository directory (or $DEDUPIMG_REPO)."),
    ] = None,
) -> None:
    ctx.obj = repo


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


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"dedupimg: error: {message}\n")
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
        _fail(str(exc), exc.exit_code)
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
        _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
    except Exception as exc:  # noqa: BLE001  (the last line of defence: one line, not a traceback)
        if debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set DEDUPIMG_DEBUG=1 for a traceback)", 1)
    sys.exit(rv if isinstance(rv, int) else 0)
