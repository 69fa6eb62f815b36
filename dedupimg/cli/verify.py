"""`dedupimg verify`: read a snapshot's whole image and check it, writing nothing."""

from __future__ import annotations

import typer

from dedupimg.cli.app import LatestNameOption, LockWait, RepoOption, SnapshotArgument, open_repo
from dedupimg.cli.render import exit_codes_help, human_bytes, progress_sink, stdout
from dedupimg.ops.restore import verify as verify_snapshot
from dedupimg.store.lock import LockMode


def verify(
    ctx: typer.Context,
    snapshot: SnapshotArgument,
    name: LatestNameOption = None,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Read a snapshot's whole image and check every chunk and the image's blake3 (writes nothing)."""
    with open_repo(ctx, LockMode.SHARED, lock_wait) as repo:
        result = verify_snapshot(repo, snapshot, name=name, progress=progress_sink())
    rec = result.record
    what = "extents blake3 (an incremental snapshot's; every chunk checked)" if rec.hash_derived else "blake3"
    stdout.print(f"snapshot {rec.short_id} ({human_bytes(rec.size)}) verified: {what} {rec.image_hash.hex()[:16]}... "
                 f"matches, in {result.seconds:.1f} s")


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 13, 14))(verify)
