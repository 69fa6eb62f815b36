"""`dedupimg snapshots`: list the snapshots (a table, or JSON)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from dedupimg.cli import render
from dedupimg.cli.app import HostFilterOption, NameFilterOption, RepoOption, TagFilterOption, open_repo, snapshot_filter
from dedupimg.cli.render import (
    exit_codes_help,
    human_bytes,
    local_time,
    plural,
    print_json,
    record_json,
    stdout,
    table,
)
from dedupimg.ops.selection import select_snapshots


def snapshots(
    ctx: typer.Context,
    name: NameFilterOption = None,
    host: HostFilterOption = None,
    tag: TagFilterOption = None,
    json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    repo_dir: RepoOption = None,
) -> None:
    """List snapshots, oldest first (by the instant taken), times in the local zone ($TZ)."""
    with open_repo(ctx) as repo:
        records = select_snapshots(repo, None, snapshot_filter(name, host, tag))
    if json:
        print_json([record_json(r) for r in records])
        return
    verbose = render.verbosity >= 2
    noted = any(r.changed_during_read for r in records)
    columns = ["id", "time", "name", *(["host"] if verbose else []), "size", "tags",
               *(["source"] if verbose else []), *(["note"] if noted else [])]
    rows = table(*columns, fixed=("id", "time"))
    for r in records:
        note = ["changed during read" if r.changed_during_read else ""] if noted else []
        cells = [r.hex_id if verbose else r.short_id, local_time(r.time), r.name, *([r.host] if verbose else []),
                 human_bytes(r.size), ",".join(r.tags), *([r.source] if verbose else []), *note]
        rows.add_row(*(Text(c) for c in cells))  # Text: names and tags are not rich markup
    stdout.print(rows)
    if render.verbosity >= 1:
        stdout.print(plural(len(records), "snapshot"))


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help())(snapshots)
