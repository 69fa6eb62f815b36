"""The ``dedupimg`` entry point (``dedupimg.cli.main:main``): registers every command on the app, installs the
signal handlers and is the one place that turns exceptions into exit codes."""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any

import typer

from dedupimg.cli import (
    check,
    copy,
    diff,
    forget,
    info,
    init,
    key,
    mount,
    prune,
    render,
    repair,
    restore,
    serve,
    snapshot,
    snapshots,
    stats,
    tag,
    unlock,
    verify,
)
from dedupimg.cli.app import accept_levels_everywhere, app
from dedupimg.core import envints, interrupts
from dedupimg.core.errors import DedupimgError, Interrupted, PermissionDenied

# ``dedupimg --help`` lists the commands in this order (command groups, here ``key`` and ``repair``, come last).
COMMANDS = (check, init, snapshot, snapshots, restore, verify, info, stats, diff, tag, copy, forget, prune, unlock,
            mount, serve, key, repair)
for _command in COMMANDS:
    _command.register(app)


def _fail(message: str, code: int, label: str = "error") -> None:
    sys.stderr.write(f"dedupimg: {label}: {message}\n")
    sys.exit(code)


def _on_signal(signum: int, frame: Any) -> None:
    if interrupts.past_commit():
        return  # too late to stop anything: the snapshot is listed, so the command finishes and says so
    # An ordinary exception, not KeyboardInterrupt: typer would turn that into a silent exit 130, and the
    # operations' cleanup (dropping a half-written pack or restore target) runs for any exception.
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    debug = bool(os.environ.get("DEDUPIMG_DEBUG"))
    render.json_status = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        envints.check()  # read at import, where a bad value could only fall back to the default
        command = typer.main.get_command(app)  # what app() runs, with -q/-v added after every command
        accept_levels_everywhere(command)  # type: ignore[arg-type]  # a TyperGroup, typed as click's Command
        rv = command.main(args=argv, prog_name="dedupimg", standalone_mode=False)
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
