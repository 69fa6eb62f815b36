"""`dedupimg check`: prove the index and the packs consistent; with --read-data(-subset), the data too."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli import render
from dedupimg.cli.app import JsonOption, LockWait, RepoOption, open_repo
from dedupimg.cli.render import (
    JSON_VERSION,
    exit_codes_help,
    human_bytes,
    plural,
    print_json,
    progress_sink,
    prune_json,
    stdout,
)
from dedupimg.core.errors import CheckFailed, UsageError
from dedupimg.ops.checkup import Checkup, check_and_estimate
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
        checkup = check_and_estimate(repo, share, progress_sink(item_tasks=("check index", "check packs")))
    report = checkup.check
    if json:
        print_json(_report_json(checkup))
    else:
        _print_report(checkup)
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


def _report_json(checkup: Checkup) -> dict[str, object]:
    report = checkup.check
    return {
        "version": JSON_VERSION,
        "ok": report.ok,
        "read_data": report.read_data,
        "findings": [
            {"kind": f.kind, "message": f.message,
             "snapshots": [{"id": s.hex_id, "name": s.name, "time": s.time} for s in f.snapshots]}
            for f in report.findings
        ],
        "hints": [{"kind": h.kind, "message": _hint(h.kind, h.message, checkup)} for h in report.hints],
        "counts": vars(report.counts),
        "prune_estimate": None if checkup.prune is None else prune_json(checkup.prune),
    }


def _hint(kind: str, message: str, checkup: Checkup) -> str:
    """A garbage hint says what prune will free, from prune's own plan (with its default --max-unused)."""
    p = checkup.prune
    if kind != "garbage" or p is None:
        return message
    n = p.packs_keeping_garbage
    keeps = (f"; {plural(n, 'pack')} less than {p.max_unused:.0%} unused keep{'s its' if n == 1 else ' their'} unused "
             "space (prune --max-unused 0 frees that too)") if n else ""
    return (f"unreferenced data: prune would free about {human_bytes(p.bytes_to_free)} "
            f"({plural(p.packs_to_delete, 'pack')} to delete, {p.packs_to_rewrite} to rewrite){keeps}")


def _print_report(checkup: Checkup) -> None:
    report = checkup.check
    for f in report.findings:
        line = f"error [{f.kind}]: {f.message}"
        if f.snapshots:
            shown = ", ".join(f"{s.name}@{s.short_id}" for s in f.snapshots[:10])
            more = f" and {len(f.snapshots) - 10} more" if len(f.snapshots) > 10 else ""
            line += f"; affects snapshot{'s' if len(f.snapshots) > 1 else ''} {shown}{more}"
        stdout.print(line, markup=False)
    if render.verbosity == 0:
        return  # -q: problems only (cron mails nothing on a clean night); the exit code says the rest
    for h in report.hints:
        stdout.print(f"hint [{h.kind}]: {_hint(h.kind, h.message, checkup)}", markup=False)
    c = report.counts
    read = ""
    if report.read_data:
        read = f"; read {c.packs_read} of {plural(c.packs, 'pack')} ({human_bytes(c.bytes_read)})"
    verdict = "no problems found" if report.ok else f"{plural(len(report.findings), 'problem')} found"
    stdout.print(f"checked {plural(c.snapshots, 'snapshot')}, {plural(c.segments, 'segment')}, "
                 f"{plural(c.chunks, 'chunk')} in {plural(c.packs, 'pack')} ({human_bytes(c.pack_bytes)}){read}: "
                 f"{verdict}", markup=False)


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11))(check)
