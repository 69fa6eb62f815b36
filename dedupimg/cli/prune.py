"""`dedupimg prune`: give back the space of forgotten and interrupted snapshots."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import DryRunOption, JsonOption, LockWait, RepoOption, open_repo
from dedupimg.cli.render import exit_codes_help, print_json, progress_sink, prune_json, render_prune
from dedupimg.core.config import DEFAULT_MAX_UNUSED
from dedupimg.core.errors import UsageError
from dedupimg.ops.prune import prune as prune_repository
from dedupimg.store.lock import LockMode


def prune(
    ctx: typer.Context,
    max_unused: Annotated[
        str,
        typer.Option(metavar="PERCENT", help="Rewrite packs whose unused share is above this (default 5%)."),
    ] = f"{DEFAULT_MAX_UNUSED * 100:g}%",
    dry_run: DryRunOption = False,
    json: JsonOption = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Delete packs that hold no live data, rewrite mostly-dead ones, and report the space freed.

    Safe to interrupt at any point: a re-run finishes the work. Needs the repository alone (exclusive lock).
    """
    fraction = _percent(max_unused, "--max-unused")
    with open_repo(ctx, LockMode.EXCLUSIVE, lock_wait) as repo:
        report = prune_repository(repo, fraction, dry_run=dry_run, progress=progress_sink())
    if json:
        print_json(prune_json(report))
    else:
        render_prune(report)


def _percent(text: str, option: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise UsageError(f"{option} must be a percentage like 5 or 5%, got {text!r}") from None
    if not 0 <= value <= 100:
        raise UsageError(f"{option} must be from 0 to 100, got {text!r}")
    return value / 100


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 18))(prune)
