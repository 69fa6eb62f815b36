"""`dedupimg forget` and `dedupimg prune`: registered on the app by import (see dedupimg/cli/main.py)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from dedupimg.cli.main import LockWait, RepoOption, app, open_repo
from dedupimg.cli.render import exit_codes_help, human_bytes, print_json, progress_sink, stdout
from dedupimg.core.errors import UsageError
from dedupimg.core.retention import Policy, parse_duration, parse_tag_list
from dedupimg.ops.forget import ForgetPlan, forget_and_prune
from dedupimg.ops.prune import PruneReport, prune
from dedupimg.repo.compaction import DEFAULT_MAX_UNUSED
from dedupimg.repo.lock import LockMode


def _count(help_text: str) -> typer.models.OptionInfo:
    return typer.Option(metavar="N", help=help_text + " (-1: unlimited).")


@app.command(epilog=exit_codes_help(11, 13, 14, 18))
def forget(
    ctx: typer.Context,
    snapshot_ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID]...", help="Remove exactly these snapshots (no keep rules).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only snapshots of this image name.")] = None,
    keep_last: Annotated[int, _count("Keep the N newest snapshots")] = 0,
    keep_hourly: Annotated[int, _count("Keep the newest snapshot of each of the last N hours with one")] = 0,
    keep_daily: Annotated[int, _count("Keep the newest snapshot of each of the last N days with one")] = 0,
    keep_weekly: Annotated[int, _count("Keep the newest snapshot of each of the last N ISO weeks with one")] = 0,
    keep_monthly: Annotated[int, _count("Keep the newest snapshot of each of the last N months with one")] = 0,
    keep_yearly: Annotated[int, _count("Keep the newest snapshot of each of the last N years with one")] = 0,
    keep_within: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Keep snapshots newer than the newest minus DURATION (like 1y2m3d4h)."),
    ] = None,
    keep_tag: Annotated[
        list[str] | None,
        typer.Option(metavar="TAG[,TAG...]", help="Keep snapshots that have all these tags (repeatable)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    and_prune: Annotated[bool, typer.Option("--prune", help="Run prune afterwards (same lock).")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Remove snapshots by a retention policy (restic forget's rules, per image name) or by id.

    Lists every kept snapshot with the rules that keep it. With neither keep rules nor ids, nothing is
    removed (exit 2). prune (or --prune) gives the space back.
    """
    ids = snapshot_ids or []
    policy = Policy(
        last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly, monthly=keep_monthly,
        yearly=keep_yearly, within=parse_duration(keep_within) if keep_within else None,
        tags=tuple(parse_tag_list(t) for t in keep_tag or []),
    )
    if ids and not policy.empty():
        raise UsageError("give snapshot ids or keep rules, not both")
    if ids and name:
        raise UsageError("--name selects snapshots for keep rules; it does not apply to snapshot ids")
    with open_repo(ctx, LockMode.EXCLUSIVE, lock_wait) as repo:
        result = forget_and_prune(repo, ids, policy, name, dry_run=dry_run, and_prune=and_prune)
    todo, report = result.plan, result.prune
    if json:
        doc: dict[str, object] = {"dry_run": dry_run, "groups": _plan_json(todo)}
        if report is not None:
            doc["prune"] = _prune_json(report)
        print_json(doc)
        return
    _render_plan(todo, dry_run, pruning=report is not None)
    if report is not None:
        _render_prune(report)


@app.command(name="prune", epilog=exit_codes_help(11, 18))
def prune_cmd(
    ctx: typer.Context,
    max_unused: Annotated[
        str,
        typer.Option(metavar="PERCENT", help="Rewrite packs whose unused share is above this (default 5%)."),
    ] = f"{DEFAULT_MAX_UNUSED * 100:g}%",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Delete packs that hold no live data, rewrite mostly-dead ones, and report the space freed.

    Safe to interrupt at any point: a re-run finishes the work. Needs the repository alone (exclusive lock).
    """
    fraction = _percent(max_unused, "--max-unused")
    with open_repo(ctx, LockMode.EXCLUSIVE, lock_wait) as repo:
        report = prune(repo, fraction, dry_run=dry_run, progress=progress_sink())
    if json:
        print_json(_prune_json(report))
    else:
        _render_prune(report)


def _percent(text: str, option: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise UsageError(f"{option} must be a percentage like 5 or 5%, got {text!r}") from None
    if not 0 <= value <= 100:
        raise UsageError(f"{option} must be from 0 to 100, got {text!r}")
    return value / 100


def _plan_json(todo: ForgetPlan) -> list[dict[str, object]]:
    return [
        {
            "name": group,
            "keep": [{"id": d.item.hex_id, "time": d.item.time, "tags": d.item.tags, "reasons": list(d.reasons)}
                     for d in decisions if d.keep],
            "remove": [{"id": d.item.hex_id, "time": d.item.time, "tags": d.item.tags}
                       for d in decisions if not d.keep],
        }
        for group, decisions in todo.groups.items()
    ]


def _render_plan(todo: ForgetPlan, dry_run: bool, pruning: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for group, decisions in todo.groups.items():
        kept = [d for d in decisions if d.keep]
        gone = [d for d in decisions if not d.keep]
        stdout.print(Text(f"{group}: keep {len(kept)}, {verb} {len(gone)}", style="bold"))
        table = Table("", "id", "time", "tags", "reasons", box=None, header_style="bold")
        table.columns[2].no_wrap = True
        for d in decisions:
            cells = ("keep" if d.keep else verb, d.item.short_id, d.item.time, ",".join(d.item.tags),
                     ", ".join(d.reasons))
            table.add_row(*(Text(c) for c in cells))  # Text: "[tag]" in reasons is not rich markup
        stdout.print(table)
    total = sum(1 for ds in todo.groups.values() for d in ds if not d.keep)
    stdout.print(f"{verb} {total} snapshots" + ("" if dry_run or pruning else "; run prune to free their space"))


def _prune_json(r: PruneReport) -> dict[str, object]:
    doc: dict[str, object] = {
        "dry_run": r.dry_run,
        "max_unused": r.max_unused,
        "packs_to_delete": r.packs_to_delete,
        "packs_to_rewrite": r.packs_to_rewrite,
        "packs_keeping_garbage": r.packs_keeping_garbage,
        "bytes_to_copy": r.bytes_to_copy,
        "bytes_to_free": r.bytes_to_free,
        "chunks_dropped": r.chunks_dropped,
        "segments_dropped": r.segments_dropped,
        "records_dropped": r.records_dropped,
        "orphan_packs": r.orphan_packs,
        "tmp_files": r.tmp_files,
        "skipped": [str(p) for p in r.skipped],
    }
    if r.outcome is not None:
        doc.update(packs_deleted=r.outcome.packs_deleted, packs_rewritten=r.outcome.packs_rewritten,
                   packs_written=r.outcome.packs_written, bytes_freed=r.outcome.bytes_freed,
                   bytes_written=r.outcome.bytes_written)
    return doc


def _render_prune(r: PruneReport) -> None:
    plan = (f"{r.packs_to_delete} packs to delete, {r.packs_to_rewrite} to rewrite "
            f"({human_bytes(r.bytes_to_copy)} to copy); {r.chunks_dropped} chunks, {r.segments_dropped} "
            f"segments, {r.records_dropped} records dropped; {r.orphan_packs} orphan packs, {r.tmp_files} "
            f"temporary files")
    for p in r.skipped:  # Text: a path is not rich markup
        stdout.print(Text(f"skipped {p}: a directory, not a file dedupimg writes; left alone"), soft_wrap=True)
    if r.outcome is None:
        stdout.print(f"prune plan: {plan}; would free about {human_bytes(r.bytes_to_free)}")
    else:
        stdout.print(f"pruned: {plan}; freed {human_bytes(r.outcome.bytes_freed)}")
