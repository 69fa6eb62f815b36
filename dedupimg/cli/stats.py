"""`dedupimg stats`: what each snapshot costs (shared and unique bytes, what forgetting it frees) and the
repository's totals, zeros apart from deduplication."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from dedupimg.cli import render
from dedupimg.cli.app import (
    HostFilterOption,
    JsonOption,
    NameFilterOption,
    RepoOption,
    TagFilterOption,
    open_repo,
    snapshot_filter,
)
from dedupimg.cli.render import (
    JSON_VERSION,
    exit_codes_help,
    human_bytes,
    local_time,
    plural,
    print_json,
    stdout,
    table,
)
from dedupimg.ops.stats import SnapshotCost, StatsReport, Totals
from dedupimg.ops.stats import stats as snapshot_costs


def stats(
    ctx: typer.Context,
    snapshot_refs: Annotated[
        list[str] | None,
        typer.Argument(metavar="[SNAPSHOT]...", help="Snapshots (id, prefix, latest, NAME@latest); default: all."),
    ] = None,
    name: NameFilterOption = None,
    host: HostFilterOption = None,
    tag: TagFilterOption = None,
    json: JsonOption = False,
    repo_dir: RepoOption = None,
) -> None:
    """What each snapshot costs, from the index alone (no data is read).

    size: logical bytes; data: bytes in chunks (holes and zero runs are not stored); shared: data other
    snapshots need too; unique: data only this one needs; frees: what forgetting it alone, then prune, gives
    back in the packs. Totals count zeros apart from deduplication.
    """
    with open_repo(ctx) as repo:
        report = snapshot_costs(repo, snapshot_refs, snapshot_filter(name, host, tag))
    if json:
        print_json(_json(report))
    else:
        _print(report)


def _cost_json(c: SnapshotCost) -> dict[str, object]:
    r = c.record
    return {"id": r.hex_id, "name": r.name, "time": r.time, "host": r.host, "tags": r.tags, "size": c.size,
            "allocated_bytes": c.allocated, "zero_bytes": c.zeros, "shared_bytes": c.shared,
            "unique_bytes": c.unique, "unique_chunks": c.unique_chunks, "unique_data_bytes": c.unique_data,
            "freed_bytes": c.freed}


def _totals_json(t: Totals) -> dict[str, object]:
    return {"snapshots": t.snapshots, "size": t.size, "allocated_bytes": t.allocated, "zero_bytes": t.zeros,
            "chunks": t.chunks, "data_bytes": t.data, "stored_bytes": t.stored, "freed_bytes": t.freed,
            "dedup_ratio": round(t.dedup_ratio, 3), "compression_ratio": round(t.compression_ratio, 3)}


def _json(report: StatsReport) -> dict[str, object]:
    return {
        "version": JSON_VERSION,
        "snapshots": [_cost_json(c) for c in report.snapshots],
        "totals": _totals_json(report.totals),
        "repository": {"snapshots": report.repository.snapshots, "pack_bytes": report.repository.pack_bytes,
                       "packs": report.repository.packs},
    }


def _print(report: StatsReport) -> None:
    sizes = ("size", "data", "zeros", "shared", "unique", "frees")
    rows = table("id", "time", "name", *sizes, fixed=("id", "time"))
    for c in report.snapshots:
        r = c.record
        cells = [r.hex_id if render.verbosity >= 2 else r.short_id, local_time(r.time), r.name,
                 *(human_bytes(n) for n in (c.size, c.allocated, c.zeros, c.shared, c.unique, c.freed))]
        rows.add_row(*(Text(x) for x in cells))
    stdout.print(rows)
    t, whole = report.totals, report.repository
    of_all = "" if t.snapshots == whole.snapshots else f" of {whole.snapshots}"
    stdout.print(f"{plural(t.snapshots, 'snapshot')}{of_all}: {human_bytes(t.size)} logical = "
                 f"{human_bytes(t.allocated)} data + {human_bytes(t.zeros)} holes and zero runs (not stored)")
    stdout.print(f"data: {human_bytes(t.data)} in {plural(t.chunks, 'distinct chunk')} (dedup {t.dedup_ratio:.2f}x), "
                 f"stored as {human_bytes(t.stored)} (compression {t.compression_ratio:.2f}x)")
    stdout.print(f"forgetting {'them' if t.snapshots != 1 else 'it'} would free {human_bytes(t.freed)} after prune; "
                 f"repository: {human_bytes(whole.pack_bytes)} in {plural(whole.packs, 'pack')}")


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(13, 14))(stats)
