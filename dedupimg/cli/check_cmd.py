"""`dedupimg check` and `dedupimg repair index`: registered on the app by import (see dedupimg/cli/main.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.main import LockWait, RepoOption, app, open_repo, repo_path
from dedupimg.cli.render import exit_codes_help, human_bytes, print_json, progress_sink, stdout
from dedupimg.core.errors import CheckFailed, UsageError
from dedupimg.ops.check import CheckReport
from dedupimg.ops.check import check as check_repository
from dedupimg.repo.lock import LockMode
from dedupimg.repo.repair import RepairReport, repair_index

repair_app = typer.Typer(help="Rebuild repository metadata from the pack files.", no_args_is_help=True)
app.add_typer(repair_app, name="repair")


def _percent(value: str) -> float:
    text = value.strip().removesuffix("%").strip()
    try:
        percent = float(text)
    except ValueError:
        percent = -1.0
    if not 0 < percent <= 100:
        raise UsageError(f"--read-data-subset takes a percentage above 0 and at most 100 (like 10 or 10%), "
                         f"not {value!r}")
    return percent / 100


@app.command(epilog=exit_codes_help(11))
def check(
    ctx: typer.Context,
    read_data: Annotated[
        bool, typer.Option("--read-data", help="Also read every pack: decompress and hash every blob.")
    ] = False,
    read_data_subset: Annotated[
        str | None,
        typer.Option("--read-data-subset", metavar="PERCENT",
                     help="Read this share of the packs (10 or 10%), chosen anew each day."),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Check the repository's structure (index against packs, reference counts), optionally its data.

    Exits 0 when nothing is wrong (hints such as orphan packs are allowed), 17 when anything is; every
    problem is printed with the snapshots it affects.
    """
    if read_data and read_data_subset is not None:
        raise UsageError("give --read-data or --read-data-subset, not both")
    share = 1.0 if read_data else _percent(read_data_subset) if read_data_subset is not None else 0.0
    with open_repo(ctx, LockMode.SHARED, lock_wait) as repo:
        report = check_repository(repo, share, progress_sink(item_tasks=("check index", "check packs")))
    if json:
        print_json(_report_json(report))
    else:
        _print_report(report)
    if not report.ok:
        n = len(report.findings)
        raise CheckFailed(f"check found {n} problem{'s' if n != 1 else ''}" + ("" if json else " (listed above)"))


def _report_json(report: CheckReport) -> dict[str, object]:
    return {
        "ok": report.ok,
        "read_data": report.read_data,
        "findings": [
            {"kind": f.kind, "message": f.message,
             "snapshots": [{"id": s.hex_id, "name": s.name, "time": s.time} for s in f.snapshots]}
            for f in report.findings
        ],
        "hints": [{"kind": h.kind, "message": h.message} for h in report.hints],
        "counts": vars(report.counts),
    }


def _print_report(report: CheckReport) -> None:
    for f in report.findings:
        line = f"error [{f.kind}]: {f.message}"
        if f.snapshots:
            shown = ", ".join(f"{s.name}@{s.short_id}" for s in f.snapshots[:10])
            more = f" and {len(f.snapshots) - 10} more" if len(f.snapshots) > 10 else ""
            line += f"; affects snapshot{'s' if len(f.snapshots) > 1 else ''} {shown}{more}"
        stdout.print(line, markup=False)
    for h in report.hints:
        stdout.print(f"hint [{h.kind}]: {h.message}", markup=False)
    c = report.counts
    read = ""
    if report.read_data:
        read = f"; read {c.packs_read} of {c.packs} packs ({human_bytes(c.bytes_read)})"
    verdict = "no problems found" if report.ok else f"{len(report.findings)} problems found"
    stdout.print(f"checked {c.snapshots} snapshots, {c.segments} segments, {c.chunks} chunks in {c.packs} packs "
                 f"({human_bytes(c.pack_bytes)}){read}: {verdict}", markup=False)


@repair_app.command("index", epilog=exit_codes_help(10, 11, 12, 16, 18, opens_repository=False))
def repair_index_cmd(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Rebuild the whole index (chunk locations, manifests, snapshot list, reference counts) from the packs.

    Use it when the index is missing or damaged. Damaged packs are reported and skipped; snapshots whose data
    is then incomplete are left out and reported; forgotten snapshots stay forgotten.
    """
    report = repair_index(repo_path(ctx), lock_wait, progress_sink(item_tasks=("repair index",)))
    if json:
        print_json(_repair_json(report))
        return
    for name, why in report.damaged_packs:
        stdout.print(f"skipped damaged pack {name}: {why}", markup=False)
    for why in report.damaged_blobs:
        stdout.print(f"unreadable blob: {why}", markup=False)
    for rec in report.left_out:
        stdout.print(f"left out snapshot {rec.name}@{rec.id.hex()[:8]} ({rec.time}): it {rec.reason}", markup=False)
    stdout.print(f"rebuilt the index from {report.packs} packs ({len(report.damaged_packs)} damaged, skipped): "
                 f"{report.snapshots} snapshots, {report.segments} segments; {report.forgotten} forgotten "
                 f"snapshot records and {len(report.left_out)} incomplete ones left out; "
                 f"in {report.seconds:.1f} s", markup=False)


def _repair_json(report: RepairReport) -> dict[str, object]:
    return {
        "packs": report.packs,
        "damaged_packs": [{"pack": n, "reason": why} for n, why in report.damaged_packs],
        "damaged_blobs": report.damaged_blobs,
        "segments": report.segments,
        "snapshots": report.snapshots,
        "forgotten": report.forgotten,
        "left_out": [{"id": r.id.hex(), "name": r.name, "time": r.time, "reason": r.reason}
                     for r in report.left_out],
        "leftovers_removed": report.leftovers_removed,
        "seconds": round(report.seconds, 3),
    }
