"""`dedupimg forget`: remove snapshots by restic's keep rules (per image name) or by id; --prune then prunes."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from dedupimg.cli import render
from dedupimg.cli.app import (
    DryRunOption,
    HostFilterOption,
    JsonOption,
    LockWait,
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
    prune_json,
    render_prune,
    stdout,
    table,
    utc_time,
)
from dedupimg.core.errors import UsageError
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.retention import Policy, parse_duration, parse_tag_list
from dedupimg.ops.forget import ForgetPlan, forget_and_prune
from dedupimg.store.lock import LockMode


def _count(help_text: str) -> typer.models.OptionInfo:
    return typer.Option(metavar="N", help=help_text + " (-1: unlimited).")


def forget(
    ctx: typer.Context,
    snapshot_ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID]...", help="Remove exactly these snapshots (no keep rules).")
    ] = None,
    name: NameFilterOption = None,
    host: HostFilterOption = None,
    tag: TagFilterOption = None,
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
    dry_run: DryRunOption = False,
    and_prune: Annotated[bool, typer.Option("--prune", help="Run prune afterwards (same lock).")] = False,
    left_out: Annotated[bool, typer.Option(
        "--left-out", help="Remove every snapshot that 'repair index' left out (its data incomplete): prune keeps "
                           "what those still have until then.")] = False,
    json: JsonOption = False,
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
    if ids and (name or host or tag):
        raise UsageError("--name, --host and --tag select snapshots for keep rules; they do not apply to snapshot "
                         "ids")
    if left_out and (ids or not policy.empty() or name or host or tag):
        raise UsageError("--left-out removes every snapshot a repair left out; give no ids, keep rules or filters "
                         "with it")
    where = snapshot_filter(None, host, tag)
    with open_repo(ctx, LockMode.EXCLUSIVE, lock_wait) as repo:
        result = forget_and_prune(repo, ids, policy, name, dry_run=dry_run, and_prune=and_prune, where=where,
                                  left_out=left_out)
    todo, report = result.plan, result.prune
    if json:
        doc: dict[str, object] = {"version": JSON_VERSION, "dry_run": dry_run, "groups": _plan_json(todo)}
        if report is not None:
            prune_doc = prune_json(report)
            if dry_run:
                prune_doc["bytes_freed_by_forget"] = result.freed_by_forget
            doc["prune"] = prune_doc
        print_json(doc)
        return
    _render_plan(todo, dry_run, pruning=report is not None)
    if report is not None:
        render_prune(report)
    if result.freed_by_forget:
        stdout.print(f"and the snapshots it would remove would free about {human_bytes(result.freed_by_forget)} "
                     "more (that plan is of the repository as it is now)")


def _plan_json(todo: ForgetPlan) -> list[dict[str, object]]:
    return [
        {
            "name": group,
            "keep": [{**_item_json(d.item), "reasons": list(d.reasons)} for d in decisions if d.keep],
            "remove": [_item_json(d.item) for d in decisions if not d.keep],
        }
        for group, decisions in todo.groups.items()
    ]


def _item_json(rec: SnapshotRecord) -> dict[str, object]:
    return {"id": rec.hex_id, "time": rec.time, "time_utc": utc_time(rec.time), "host": rec.host, "tags": rec.tags}


def _render_plan(todo: ForgetPlan, dry_run: bool, pruning: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for group, decisions in todo.groups.items():
        kept = [d for d in decisions if d.keep]
        gone = [d for d in decisions if not d.keep]
        if render.verbosity >= 1:
            stdout.print(Text(f"{group}: keep {len(kept)}, {verb} {len(gone)}", style="bold"))
        rows = table("", "id", "time", "tags", "reasons", fixed=("", "id", "time"))
        for d in decisions:
            cells = ("keep" if d.keep else verb, d.item.short_id, local_time(d.item.time), ",".join(d.item.tags),
                     ", ".join(d.reasons))
            rows.add_row(*(Text(c) for c in cells))  # Text: "[tag]" in reasons is not rich markup
        stdout.print(rows)
    total = sum(1 for ds in todo.groups.values() for d in ds if not d.keep)
    if render.verbosity >= 1:
        stdout.print(f"{verb} {plural(total, 'snapshot')}"
                     + ("" if dry_run or pruning else "; run prune to free their space"))


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 13, 14, 18))(forget)
