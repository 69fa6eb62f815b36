"""`dedupimg restore`: write a snapshot's image bit-exact to a file, a block device or stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import LatestNameOption, LockWait, RepoOption, SnapshotArgument, open_repo
from dedupimg.cli.render import exit_codes_help, human_bytes, print_json, progress_sink, record_json, stdout
from dedupimg.ops.restore import restore as restore_snapshot
from dedupimg.store.lock import LockMode


def restore(
    ctx: typer.Context,
    snapshot: SnapshotArgument,
    target: Annotated[
        str, typer.Argument(help="File path, block device (not mounted or in use), or - for stdout; a symlink is "
                                 "followed.")
    ],
    force: Annotated[
        bool, typer.Option(help="Replace an existing file (its owner and mode are kept) or a dangling symlink's "
                                "target, or overwrite a block device.")
    ] = False,
    name: LatestNameOption = None,
    delta: Annotated[
        bool, typer.Option("--delta", help="Update an existing target in place: write only chunks that differ "
                                           "(if interrupted, the same command finishes it).")
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object (not with target -).")] = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Restore a snapshot bit-exact (verified against its recorded blake3)."""
    with open_repo(ctx, LockMode.SHARED, lock_wait) as repo:
        result = restore_snapshot(
            repo, snapshot, target, force=force, name=name, delta=delta, progress=progress_sink()
        )
    rec = result.record
    if target == "-":
        return
    if json:
        doc = record_json(rec)
        doc.update(target=target, delta=delta, bytes_read=result.bytes_read, bytes_written=result.bytes_written,
                   seconds=round(result.seconds, 3))
        print_json(doc)
    elif delta:
        stdout.print(f"updated {target} to {rec.short_id}: read {human_bytes(result.bytes_read)}, "
                     f"wrote {human_bytes(result.bytes_written)}")
    else:
        stdout.print(f"restored {rec.short_id} ({human_bytes(rec.size)}) to {target}")


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 13, 14, 15, 18))(restore)
