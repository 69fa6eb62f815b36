"""The typer app, its root callback (``-r/--repo`` before the command) and what every command shares: the
option types (``-r`` after the command, ``--lock-wait``, ``--json``, ...) and the repository of ``-r``.

Command modules import this module and nothing else of the CLI but ``render``; ``main`` registers them on
``app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dedupimg.core.errors import UsageError
from dedupimg.repo.repository import Repository
from dedupimg.store.lock import LockMode

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

LockWait = Annotated[
    float,
    typer.Option("--lock-wait", metavar="SECONDS", min=0,
                 help="Wait up to this long for a conflicting command's lock to go (default: fail at once)."),
]

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]

DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")]

SnapshotArgument = Annotated[str, typer.Argument(help="Snapshot id, unique id prefix, 'latest' or NAME@latest.")]

LatestNameOption = Annotated[
    str | None, typer.Option("--name", help="With 'latest': the newest snapshot of this name.")
]

NameFilterOption = Annotated[str | None, typer.Option("--name", help="Only snapshots of this image name.")]


def repo_path(ctx: typer.Context) -> Path:
    path = ctx.find_root().obj
    if path is None:
        raise UsageError("no repository given: pass -r/--repo PATH or set DEDUPIMG_REPO")
    return Path(path)


def open_repo(ctx: typer.Context, lock: LockMode | None = None, wait: float = 0.0) -> Repository:
    """The repository of ``-r``; with ``lock``, holding that lock for the command (named in lock messages)."""
    return Repository.open(repo_path(ctx), lock, wait, ctx.info_name or "")
