"""`dedupimg mount`: every snapshot as a read-only image file (FUSE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dedupimg.cli.app import LockWait, RepoOption, repo_location
from dedupimg.cli.render import exit_codes_help, stdout
from dedupimg.serve.mount import mount as mount_snapshots


def mount(
    ctx: typer.Context,
    mountpoint: Annotated[Path, typer.Argument(help="An empty directory.")],
    foreground: Annotated[
        bool, typer.Option("--foreground", "-f", help="Serve in this process until unmounted (Ctrl-C unmounts).")
    ] = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Mount every snapshot read-only: NAME/TIME_ID.img, NAME/latest and by-id/ID.img.

    Returns once the mount is up; a background process serves it until 'fusermount3 -u MOUNTPOINT'.
    Loop-mount an image file (mount -o loop,ro IMAGE DIR) to browse the files inside it.
    """
    path = repo_location(ctx)

    def ready() -> None:
        how = "Ctrl-C or " if foreground else ""
        stdout.print(f"mounted {path} at {mountpoint}; unmount with {how}fusermount3 -u {mountpoint}", markup=False)

    mount_snapshots(path, mountpoint, foreground=foreground, ready=ready, lock_wait=lock_wait)


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 20))(mount)
