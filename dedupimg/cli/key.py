"""`dedupimg key list / add / remove / passwd`: an encrypted repository's keys (one per password), as restic's."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from dedupimg.cli.app import LockWait, RepoOption, command_group, open_repo, repo_location
from dedupimg.cli.render import JSON_VERSION, exit_codes_help, print_json, stdout
from dedupimg.core.password import NEW_PREFIX, prefer_file
from dedupimg.ops import keys
from dedupimg.repo.repository import Repository
from dedupimg.store.lock import LockMode

T = TypeVar("T")

key_app = command_group("List, add and remove the passwords (keys) of an encrypted repository.")

NewPasswordFile = Annotated[
    Path | None,
    typer.Option("--new-password-file", dir_okay=False, metavar="FILE",
                 help="Read the new password from the first line of this file (else $DEDUPIMG_NEW_PASSWORD, "
                      "$DEDUPIMG_NEW_PASSWORD_FILE, $DEDUPIMG_NEW_PASSWORD_COMMAND, or asked twice on the "
                      "terminal)."),
]

# Changing keys: 11 another command holds the repository, 18 no space for the new key object.
CHANGES = exit_codes_help(11, 18)


def _change(ctx: typer.Context, lock_wait: float, work: Callable[[Repository], T],
            new_password_file: Path | None = None) -> T:
    """``work`` on the repository held alone (restic's key commands lock exclusively), named "key add" etc. in
    lock messages; ``new_password_file``: where the new password comes from."""
    if new_password_file is not None:  # read through $DEDUPIMG_NEW_PASSWORD_FILE; given, it beats the others
        prefer_file(NEW_PREFIX, os.path.abspath(new_password_file))
    with Repository.open(repo_location(ctx), LockMode.EXCLUSIVE, lock_wait, f"key {ctx.info_name}") as repo:
        return work(repo)


@key_app.command("list", epilog=exit_codes_help())
def list_(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    repo_dir: RepoOption = None,
) -> None:
    """List the keys: id, the one this password opened (*), and the user, host and time that made each."""
    with open_repo(ctx) as repo:
        found = keys.list_keys(repo)
    if json:
        print_json([{"version": JSON_VERSION, "id": keys.key_id(k.name), "short_id": k.short_id, "current": k.current,
                     **{f: k.info.get(f, "") for f in ("user", "host", "created")},
                     **({"error": k.info["error"]} if "error" in k.info else {})} for k in found])
        return
    noted = any("error" in k.info for k in found)
    table = Table(" ", "id", "user", "host", "created", *(["note"] if noted else []), box=None,
                  header_style="bold")
    for k in found:
        info = [str(k.info.get(f, "")) for f in ("user", "host", "created", *(["error"] if noted else []))]
        table.add_row("*" if k.current else "", k.short_id, *info)
    stdout.print(table)
    stdout.print(f"{len(found)} key{'' if len(found) == 1 else 's'}")


@key_app.command("add", epilog=CHANGES)
def add(
    ctx: typer.Context,
    new_password_file: NewPasswordFile = None,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Add a key for a new password; prints its id. Every key opens the whole repository."""
    stdout.print(keys.short_id(_change(ctx, lock_wait, keys.add_key, new_password_file)))


@key_app.command("remove", epilog=CHANGES)
def remove(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="ID", help="Key id or unique id prefix (see 'key list').")],
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Remove a key: its key object is deleted, so its password no longer opens the repository.

    Refused for the last key, and for the key this command was opened with (open with another password). Not a
    revocation: a copy of the old key object (a backup, or storage that puts it back) still opens it with the
    old password; the master keys do not change (docs/security.md).
    """
    removed = _change(ctx, lock_wait, lambda repo: keys.remove_key(repo, key_id))
    stdout.print(f"removed key {keys.short_id(removed)}")


@key_app.command("passwd", epilog=CHANGES)
def passwd(
    ctx: typer.Context,
    new_password_file: NewPasswordFile = None,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Change the password: add a key for the new one, then remove the key of the current one."""
    added, removed = _change(ctx, lock_wait, keys.change_password, new_password_file)
    stdout.print(f"changed the password: added key {keys.short_id(added)}, removed key {keys.short_id(removed)}")


def register(app: typer.Typer) -> None:
    app.add_typer(key_app, name="key")
