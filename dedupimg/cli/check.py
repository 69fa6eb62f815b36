"""`dedupimg check`: prove the index and the packs consistent; with --read-data(-subset), the data too."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import JsonOption, LockWait, RepoOption, open_repo
from dedupimg.cli.render import exit_codes_help, human_bytes, print_json, progress_sink, stdout
from dedupimg.core.errors import CheckFailed, UsageError
from dedupimg.ops.check import CheckReport
from dedupimg.ops.check import check as check_repository
from dedupimg.store.lock import LockMode


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
    json: JsonOption = False,
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


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11))(check)
