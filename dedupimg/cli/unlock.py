"""`dedupimg unlock`: remove stale locks (an object store's lock objects of killed commands)."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import JsonOption, RepoOption, repo_location
from dedupimg.cli.render import JSON_VERSION, exit_codes_help, print_json, stdout
from dedupimg.ops.unlock import unlock as remove_locks


def unlock(
    ctx: typer.Context,
    remove_all: Annotated[
        bool, typer.Option("--remove-all", help="Remove every lock, also those of commands still running.")
    ] = False,
    json: JsonOption = False,
    repo_dir: RepoOption = None,
) -> None:
    """Remove stale locks: lock objects not refreshed for 30 minutes, or of a process of this host that is gone.

    Only a repository in an object store (S3) can have them; a local repository's lock dies with its process.
    """
    removed = remove_locks(repo_location(ctx), remove_all)
    if json:
        print_json({"version": JSON_VERSION, "removed": removed})
        return
    for what in removed:
        stdout.print(f"removed {what}", markup=False)
    stdout.print(f"{len(removed)} lock{'' if len(removed) == 1 else 's'} removed", markup=False)


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help())(unlock)
