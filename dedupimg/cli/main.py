"""The command line's entry point (``dedupimg.cli.main:main``, called by ``dedupimg/__main__.py`` once it has
made an early Ctrl-C harmless): registers every command on the app, installs the
signal handlers and is the one place that turns exceptions into exit codes."""

from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
from typing import Any, NoReturn

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
from dedupimg.cli.app import accept_levels_everywhere, app, stdout_closed
from dedupimg.core import envints, interrupts
from dedupimg.core.errors import DedupimgError, Interrupted, OutputClosed, PermissionDenied

# ``dedupimg --help`` lists the commands in this order (command groups, here ``key`` and ``repair``, come last).
COMMANDS = (check, init, snapshot, snapshots, restore, verify, info, stats, diff, tag, copy, forget, prune, unlock,
            mount, serve, key, repair)
for _command in COMMANDS:
    _command.register(app)


def _report(message: str, code: int, label: str = "error") -> int:
    sys.stderr.write(f"dedupimg: {label}: {message}\n")
    return code


def _on_signal(signum: int, frame: Any) -> None:
    if interrupts.past_commit():
        return  # too late to stop anything: the snapshot is listed, so the command finishes and says so
    # An ordinary exception, not KeyboardInterrupt: typer would turn that into a silent exit 130, and the
    # operations' cleanup (dropping a half-written pack or restore target) runs for any exception.
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    _exit(_run(argv))


def _run(argv: list[str] | None) -> int:
    """Run the command; its exit code, after the one line that says what went wrong."""
    debug = bool(os.environ.get("DEDUPIMG_DEBUG"))
    render.json_status = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        envints.check()  # read at import, where a bad value could only fall back to the default
        command = typer.main.get_command(app)  # what app() runs, with -q/-v added after every command
        accept_levels_everywhere(command)  # type: ignore[arg-type]  # a TyperGroup, typed as click's Command
        rv = command.main(args=argv, prog_name="dedupimg", standalone_mode=False)
        sys.stdout.flush()  # here, where a reader that went away is still an error of this command
    except OutputClosed:
        return _quiet_on_closed_stdout()
    except DedupimgError as exc:
        if debug:
            raise
        return _report(str(exc), exc.exit_code, exc.label)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # type: ignore[attr-defined]  # plain `dedupimg`: the help text
            return 2
        return _report(f"{exc.format_message()} (see 'dedupimg --help')", exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        return _report("interrupted", 130)
    except OSError as exc:
        if exc.errno == errno.EPIPE and stdout_closed():
            return _quiet_on_closed_stdout()
        if debug:
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _report(f"no space left on device ({exc.filename or 'repository'})", 18)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # any path the library did not name better itself
            return _report(f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}", PermissionDenied.exit_code)
        return _report(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
    except Exception as exc:  # noqa: BLE001  (the last line of defence: one line, not a traceback)
        if debug:
            raise
        return _report(f"unexpected {type(exc).__name__}: {exc} (set DEDUPIMG_DEBUG=1 for a traceback)", 1)
    return rv if isinstance(rv, int) else 0


def _quiet_on_closed_stdout() -> int:
    """The reader of standard output went away (``| head -1``): stop without a word, as a process that SIGPIPE
    ends. Standard output now goes to /dev/null, so that the interpreter's last flush of what is still buffered
    does not fail too ("Exception ignored ... BrokenPipeError"), as the Python documentation advises."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return OutputClosed.exit_code


def _exit(code: int) -> NoReturn:
    """Exit with ``code``. The command is over, and so its outcome: a SIGINT or SIGTERM from now on ends the
    process at once with this code (a Ctrl-C just after a snapshot was stored exited 130 before, a signal's death
    in the interpreter's shutdown), and once the shutdown's exit functions run, signals are ignored (the
    interpreter restores the default action, death, for a handler of Python's before it tears the modules down)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            if stream is sys.stdout:
                _quiet_on_closed_stdout()  # what is left is dropped, not written again at the interpreter's exit
        except ValueError:  # closed
            pass

    def finished(signum: int, frame: Any) -> None:
        os._exit(code)

    signal.signal(signal.SIGINT, finished)
    signal.signal(signal.SIGTERM, finished)
    atexit.register(_ignore_signals)  # registered last, so run first of the exit functions
    sys.exit(code)


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
