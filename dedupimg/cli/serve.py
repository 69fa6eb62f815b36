"""`dedupimg serve`: export snapshots read-only over NBD until a signal."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from dedupimg.cli.app import LockWait, RepoOption, open_repo
from dedupimg.cli.render import exit_codes_help, stderr
from dedupimg.serve.nbd import DEFAULT_HOST, DEFAULT_PORT, NbdServer, parse_listen
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
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Serve snapshots read-only over NBD until Ctrl-C or SIGTERM (which exit 0)."""
    host, port = parse_listen(listen)
    with open_repo(ctx, LockMode.SHARED, lock_wait) as repo:
        serve_snapshots(repo, snapshots or [], host, port, ready=_announce)


def _announce(server: NbdServer) -> None:
    stderr.print(f"serving {len(server.records())} exports on {server.url}", soft_wrap=True)
    if not _loopback(server.address[0]):
        stderr.print(f"warning: NBD exports are unauthenticated and unencrypted: anyone who can reach "
                     f"{server.url} can read every exported snapshot", soft_wrap=True)


def _loopback(host: str) -> bool:
    """Whether the bound address ``host`` (an IP address) is reachable from this machine only."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 13, 14, 19))(serve)
