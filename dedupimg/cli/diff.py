"""`dedupimg diff A B`: the byte ranges that differ between two snapshots, from their manifests."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli import render
from dedupimg.cli.app import JsonOption, RepoOption, open_repo
from dedupimg.cli.render import JSON_VERSION, exit_codes_help, human_bytes, plural, print_json, stdout
from dedupimg.ops.diff import DiffReport, diff_refs


def diff(
    ctx: typer.Context,
    first: Annotated[str, typer.Argument(metavar="A", help="The older snapshot (id, prefix, NAME@latest).")],
    second: Annotated[str, typer.Argument(metavar="B", help="The newer snapshot.")],
    json: JsonOption = False,
    repo_dir: RepoOption = None,
) -> None:
    """Changed byte ranges from A to B (merged), bytes changed and the new data B stored; no data is read."""
    with open_repo(ctx) as repo:
        report = diff_refs(repo, first, second)
    if json:
        print_json(_json(report))
        return
    if render.verbosity >= 1:
        for offset, length in report.ranges:
            stdout.print(f"{offset:>14} +{length:<12} {human_bytes(length)}")
    a, b = report.a, report.b
    stdout.print(f"{a.short_id} -> {b.short_id}: {human_bytes(report.bytes_changed)} changed in "
                 f"{plural(len(report.ranges), 'range')} (of {human_bytes(b.size)}); B needs "
                 f"{plural(report.new_chunks, 'chunk')} A lacks: {human_bytes(report.new_data)} "
                 f"({human_bytes(report.new_stored)} stored)")


def _json(r: DiffReport) -> dict[str, object]:
    return {
        "version": JSON_VERSION,
        "a": {"id": r.a.hex_id, "name": r.a.name, "time": r.a.time, "size": r.a.size},
        "b": {"id": r.b.hex_id, "name": r.b.name, "time": r.b.time, "size": r.b.size},
        "ranges": [{"offset": o, "length": n} for o, n in r.ranges],
        "bytes_changed": r.bytes_changed,
        "new_chunks": r.new_chunks,
        "new_data_bytes": r.new_data,
        "new_stored_bytes": r.new_stored,
    }


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(13, 14))(diff)
