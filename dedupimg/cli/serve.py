"""`dedupimg serve`: export snapshots read-only over NBD until a signal."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import LockWait, RepoOption, open_repo
from dedupimg.cli.render import exit_codes_help, local_time, plural, stderr
from dedupimg.core.errors import UsageError
from dedupimg.serve.nbd import DEFAULT_HOST, DEFAULT_PORT, NbdServer, is_loopback, parse_listen
from dedupimg.serve.nbd import serve as serve_snapshots
from dedupimg.store.lock import LockMode


def serve(
    ctx: typer.Context,
    snapshots: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SNAPSHOT", help="Snapshots to export (id, unique prefix, latest, NAME@latest); default: all."
        ),
    ] = None,
    listen: Annotated[
        str, typer.Option("--listen", metavar="HOST:PORT", help="Address to listen on (port 0: any free port).")
    ] = f"{DEFAULT_HOST}:{DEFAULT_PORT}",
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Allow a --listen address other than loopback: exports have no authentication or encryption.",
        ),
    ] = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Serve snapshots read-only over NBD until Ctrl-C or SIGTERM (which exit 0)."""
    host, port = parse_listen(listen)
    if not allow_remote and not is_loopback(host):
        raise UsageError(
            f"--listen {listen} is not a loopback address (127.0.0.0/8, ::1, localhost): exports have no "
            "authentication or encryption, so serving beyond this machine needs --allow-remote"
        )
    with open_repo(ctx, LockMode.SHARED, lock_wait) as repo:
        serve_snapshots(repo, snapshots or [], host, port, ready=lambda server: _announce(server, bool(snapshots)))


def _announce(server: NbdServer, fixed: bool) -> None:
    records = server.records()
    stderr.print(f"serving {plural(len(records), 'export')} on {server.url}", soft_wrap=True)
    if fixed:
        # Names (NAME@latest, latest) were resolved once, now: these ids are what the exports stay, so a qcow2
        # overlay can name its backing export by id and it never changes under a running VM.
        for rec in records:
            stderr.print(f"export {rec.hex_id} {rec.name} {local_time(rec.time)}", soft_wrap=True, markup=False)
    if not is_loopback(server.address[0]):  # only with --allow-remote
        stderr.print(
            f"warning: NBD exports are unauthenticated and unencrypted: anyone who can reach {server.url} can "
            f"read every exported snapshot; to reach them from another host, use an SSH tunnel or stunnel",
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 13, 14, 19))(serve)
