"""The typer app, its root callback (``-r/--repo`` before the command) and what every command shares: the
option types (``-r`` after the command, ``--lock-wait``, ``--json``, ...) and the repository of ``-r``.

Command modules import this module and nothing else of the CLI but ``render``; ``main`` registers them on
``app``.
"""

from __future__ import annotations

import getpass
import os
import select
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from dedupimg.cli import render
from dedupimg.core.errors import OutputClosed, UsageError, WrongPassword
from dedupimg.core.password import prefer_file, set_prompt
from dedupimg.core.retention import SnapshotFilter, parse_tag_list
from dedupimg.repo.repository import CACHE_ENV, Repository
from dedupimg.store import normalize_location
from dedupimg.store.lock import LockMode


def stdout_closed() -> bool:
    """Whether standard output is a pipe (or socket) whose reader has gone: poll reports an error on it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # POLLERR and POLLHUP are always reported
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout at all, or one without a descriptor
        return False


class DedupimgGroup(typer.core.TyperGroup):
    """The app's click group: a command whose output pipe was closed by its reader (``| head -1``) raises
    OutputClosed, which main ends quietly, instead of the BrokenPipeError that click would turn into a silent
    exit 1 before main could see it."""

    def invoke(self, ctx: typer.core._click.Context) -> Any:  # typer's own copy of click
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            if stdout_closed():
                raise OutputClosed("standard output was closed by its reader") from None
            raise


app = typer.Typer(
    cls=DedupimgGroup,
    name="dedupimg",
    help="Deduplicating backups of whole disk and VM images.",
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command_group(help: str) -> typer.Typer:
    """A group of commands (``dedupimg key``, ``dedupimg repair``): given without one of its commands, it says so
    in one line and exits 2 (usage error), naming the commands it has."""
    group = typer.Typer(help=help)

    @group.callback(invoke_without_command=True)
    def require_command(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
            names = ", ".join(ctx.command.list_commands(ctx))  # type: ignore[attr-defined]  # a group's context
            raise UsageError(f"{ctx.command_path}: missing command ({names}); see '{ctx.command_path} --help'")

    return group


def _version() -> str:
    try:
        return package_version("dedupimg")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"dedupimg {_version()}\n")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="No progress and no summary lines; results and errors only.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="More detail: full ids, hosts and sources in tables.")
    ] = False,
    repo: Annotated[
        str | None,
        typer.Option("-r", "--repo", envvar="DEDUPIMG_REPO", metavar="REPOSITORY",
                     help="Repository: a directory, or s3:http(s)://HOST[:PORT]/BUCKET/PREFIX (or $DEDUPIMG_REPO); "
                          "also accepted after the command."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", envvar=CACHE_ENV, file_okay=False,
                     help="Where a remote (S3) repository's index cache lives (or $DEDUPIMG_CACHE_DIR; default "
                          "$XDG_CACHE_HOME/dedupimg/REPO_ID). Deleting it loses nothing."),
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", envvar="DEDUPIMG_PASSWORD_FILE", dir_okay=False,
                     help="Read an encrypted repository's password from the first line of this file (or "
                          "$DEDUPIMG_PASSWORD, $DEDUPIMG_PASSWORD_FILE; else asked on the terminal)."),
    ] = None,
    password_command: Annotated[
        str | None,
        typer.Option("--password-command", envvar="DEDUPIMG_PASSWORD_COMMAND", metavar="COMMAND",
                     help="Run this (no shell) and take the first line it prints as the password."),
    ] = None,
) -> None:
    if quiet and verbose:
        raise UsageError("give -q/--quiet or -v/--verbose, not both")
    render.verbosity = 0 if quiet else 2 if verbose else 1
    ctx.obj = repo
    # The library, and the processes a command starts (a mount's server), read these from the environment.
    if cache_dir is not None:
        os.environ[CACHE_ENV] = os.path.abspath(cache_dir)
    given = ctx.get_parameter_source("password_file")
    if password_file is not None and given is not None and given.name == "COMMANDLINE":
        prefer_file("DEDUPIMG_", os.path.abspath(password_file))  # the command line beats $DEDUPIMG_PASSWORD
    elif password_command is not None:
        given = ctx.get_parameter_source("password_command")
        if given is not None and given.name == "COMMANDLINE":
            os.environ.pop("DEDUPIMG_PASSWORD", None)
        os.environ["DEDUPIMG_PASSWORD_COMMAND"] = password_command
    if sys.stdin is not None and sys.stdin.isatty():  # None: started with stdin closed
        set_prompt(_ask_password)


def _level_after_command(ctx: typer.Context, param: typer.core.TyperOption, value: bool) -> None:
    """``dedupimg CMD -q`` means ``dedupimg -q CMD`` (and -v alike), as restic takes its global flags."""
    if not value:
        return
    wanted = 0 if param.name == "quiet_after" else 2
    if render.verbosity not in (1, wanted):
        raise UsageError("give -q/--quiet or -v/--verbose, not both")
    render.verbosity = wanted


def accept_levels_everywhere(command: typer.core.TyperCommand | typer.core.TyperGroup) -> None:
    """Give every command of ``command`` (the app's click group, nested groups too) ``-q`` and ``-v`` after
    its name; main calls it once before parsing."""
    subs = getattr(command, "commands", None)
    if subs is not None:
        for sub in subs.values():
            accept_levels_everywhere(sub)
        return
    for names, dest, what in ((("-q", "--quiet"), "quiet_after", "No progress, no summary lines"),
                              (("-v", "--verbose"), "verbose_after", "More detail")):
        if not any(set(names) & set(p.opts) for p in command.params):
            command.params.append(typer.core.TyperOption(
                param_decls=[*names, dest], is_flag=True, expose_value=False, callback=_level_after_command,
                help=f"{what} (also accepted before the command)."))


def _ask_password(what: str, confirm: bool) -> str:
    """Ask on the terminal without echo (twice for a new password)."""
    try:
        first = getpass.getpass(f"enter {what}: ")
        if confirm and getpass.getpass(f"enter {what} again: ") != first:
            raise WrongPassword("the two passwords differ")
    except EOFError:
        raise WrongPassword(f"no password given for {what}") from None
    return first


def _repo_after_command(ctx: typer.Context, value: str | None) -> None:
    """``dedupimg CMD -r PATH`` means ``dedupimg -r PATH CMD``; it overrides $DEDUPIMG_REPO, as ``-r`` does."""
    if value is None:
        return
    root_ctx = ctx.find_root()
    before = root_ctx.obj
    source = root_ctx.get_parameter_source("repo")
    if before is not None and source is not None and source.name == "COMMANDLINE" and before != value:
        raise UsageError(f"two repositories given: -r {before} before the command and -r {value} after it")
    root_ctx.obj = value


# Every command that takes a repository declares this parameter (its value reaches ``repo_location`` through the
# root context; the function's own argument stays None), so that ``-r`` is accepted after the command too.
RepoOption = Annotated[
    str | None,
    typer.Option("-r", "--repo", callback=_repo_after_command, expose_value=False, metavar="REPOSITORY",
                 show_default=False, help="Repository directory or s3:... URL (also accepted before the command)."),
]

def _finite_wait(value: float) -> float:
    if not 0 <= value < float("inf"):  # also NaN, which passes min=0 and would wait for ever
        raise typer.BadParameter(f"must be a number of seconds, 0 or more, not {value}")
    return value


LockWait = Annotated[
    float,
    typer.Option("--lock-wait", metavar="SECONDS", min=0, callback=_finite_wait,
                 help="Wait up to this long for a conflicting command's lock to go (default: fail at once)."),
]

FromPasswordFile = Annotated[
    Path | None,
    typer.Option("--from-password-file", dir_okay=False,
                 help="The source repository's password, from the first line of this file (else "
                      "$DEDUPIMG_FROM_PASSWORD, $DEDUPIMG_FROM_PASSWORD_FILE, $DEDUPIMG_FROM_PASSWORD_COMMAND, or "
                      "asked on the terminal)."),
]


def use_from_password_file(path: Path | None) -> None:
    if path is not None:
        prefer_file("DEDUPIMG_FROM_", os.path.abspath(path))


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]

DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")]

SnapshotArgument = Annotated[str, typer.Argument(help="Snapshot id, unique id prefix, 'latest' or NAME@latest.")]

LatestNameOption = Annotated[
    str | None, typer.Option("--name", help="With 'latest': the newest snapshot of this name.")
]

NameFilterOption = Annotated[str | None, typer.Option("--name", help="Only snapshots of this image name.")]

HostFilterOption = Annotated[
    list[str] | None, typer.Option("--host", metavar="HOST", help="Only snapshots taken on this host (repeatable).")
]

TagFilterOption = Annotated[
    list[str] | None,
    typer.Option("--tag", metavar="TAG[,TAG...]",
                 help="Only snapshots with all these tags (repeatable: any of the lists; '' is untagged)."),
]


def snapshot_filter(name: str | None, hosts: list[str] | None, tags: list[str] | None) -> SnapshotFilter:
    """The filter of ``--name``, ``--host`` and ``--tag``."""
    return SnapshotFilter(names=(name,) if name is not None else (), hosts=tuple(hosts or ()),
                          tags=tuple(parse_tag_list(t) for t in tags or ()))


def repo_location(ctx: typer.Context) -> str:
    """The repository of ``-r``: a local directory made absolute, or an ``s3:`` URL as given."""
    location = ctx.find_root().obj
    if not location:
        raise UsageError("no repository given: pass -r/--repo PATH or set DEDUPIMG_REPO")
    return normalize_location(str(location))


def open_repo(ctx: typer.Context, lock: LockMode | None = None, wait: float = 0.0) -> Repository:
    """The repository of ``-r``; with ``lock``, holding that lock for the command (named in lock messages)."""
    return Repository.open(repo_location(ctx), lock, wait, ctx.info_name or "")
