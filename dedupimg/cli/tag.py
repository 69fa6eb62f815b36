"""`dedupimg tag SNAPSHOT... --add/--remove/--set`: change snapshots' tags (a new record replaces each,
crash-safe)."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import DryRunOption, JsonOption, LockWait, RepoOption, open_repo
from dedupimg.cli.render import JSON_VERSION, exit_codes_help, plural, print_json, record_json, stdout
from dedupimg.ops.tag import tag_refs
from dedupimg.store.lock import LockMode

TagsOption = typer.Option(metavar="TAG[,TAG...]")


def _split(values: list[str] | None) -> list[str]:
    return [t for v in values or [] for t in (p.strip() for p in v.split(",")) if t]


def tag(
    ctx: typer.Context,
    snapshot_refs: Annotated[
        list[str], typer.Argument(metavar="SNAPSHOT...", help="Snapshots (id, unique prefix, NAME@latest).")
    ],
    add: Annotated[list[str] | None, typer.Option("--add", metavar="TAG[,TAG...]", help="Add tags.")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", metavar="TAG[,TAG...]", help="Remove tags.")] = None,
    set_to: Annotated[
        list[str] | None, typer.Option("--set", metavar="TAG[,TAG...]", help="Replace every tag ('' : none).")
    ] = None,
    dry_run: DryRunOption = False,
    json: JsonOption = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Add, remove or set tags of snapshots.

    Each changed snapshot gets a new record (a new id; same image, name and time); the old record is
    tombstoned in the same step, so a crash leaves one of the two listed, never both or neither.
    """
    with open_repo(ctx, LockMode.EXCLUSIVE, lock_wait) as repo:
        changes = tag_refs(repo, snapshot_refs, _split(add), _split(remove),
                           None if set_to is None else _split(set_to), dry_run=dry_run)
    changed = [c for c in changes if c.new is not None]
    if json:
        print_json({"version": JSON_VERSION, "dry_run": dry_run,
                    "changed": [{"old_id": c.old.hex_id, **record_json(c.new)} for c in changed if c.new],
                    "unchanged": [c.old.hex_id for c in changes if c.new is None]})
        return
    for c in changes:
        if c.new is None:
            stdout.print(f"{c.old.short_id} unchanged: tags {','.join(c.old.tags) or '(none)'}", markup=False)
        else:
            stdout.print(f"{c.old.short_id} -> {c.new.short_id}: tags {','.join(c.new.tags) or '(none)'}",
                         markup=False)
    verb = "would change" if dry_run else "changed"
    stdout.print(f"{verb} {plural(len(changed), 'snapshot')}")


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 13, 14, 18))(tag)
