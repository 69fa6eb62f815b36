"""`dedupimg snapshots`: list the snapshots (a table, or JSON)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dedupimg.cli.app import NameFilterOption, RepoOption, open_repo
from dedupimg.cli.render import exit_codes_help, human_bytes, print_json, record_json, stdout


def snapshots(
    ctx: typer.Context,
    name: NameFilterOption = None,
    json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    repo_dir: RepoOption = None,
) -> None:
    """List snapshots, oldest first."""
    with open_repo(ctx) as repo:
        records = repo.snapshots(name)
    if json:
        print_json([record_json(r) for r in records])
        return
    noted = any(r.changed_during_read for r in records)
    table = Table("id", "name", "time", "size", "tags", *(["note"] if noted else []), box=None, header_style="bold")
    for r in records:
        note = ["changed during read" if r.changed_during_read else ""] if noted else []
        table.add_row(r.short_id, r.name, r.time, human_bytes(r.size), ",".join(r.tags), *note)
    stdout.print(table)
    stdout.print(f"{len(records)} snapshots")


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help())(snapshots)
