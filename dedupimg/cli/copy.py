"""`dedupimg copy`: copy snapshots from another repository into the one of ``-r``, sending only missing chunks."""

from __future__ import annotations

from typing import Annotated

import typer

from dedupimg.cli.app import FromPasswordFile, JsonOption, LockWait, RepoOption, open_repo, use_from_password_file
from dedupimg.cli.render import (
    JSON_VERSION,
    exit_codes_help,
    human_bytes,
    print_json,
    progress_sink,
    record_json,
    stdout,
)
from dedupimg.ops.copy import copy_snapshots, open_source
from dedupimg.store import normalize_location
from dedupimg.store.lock import LockMode


def copy(
    ctx: typer.Context,
    from_repo: Annotated[
        str,
        typer.Option("--from-repo", metavar="REPOSITORY", show_default=False,
                     help="The repository to copy from: a directory or s3:http(s)://HOST[:PORT]/BUCKET/PREFIX."),
    ],
    snapshots: Annotated[
        list[str] | None,
        typer.Argument(metavar="[SNAPSHOT]...", show_default=False,
                       help="Snapshot ids, unique id prefixes, 'latest' or NAME@latest in the source (default: "
                            "every snapshot of the source)."),
    ] = None,
    from_password_file: FromPasswordFile = None,
    json: JsonOption = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Copy snapshots from --from-repo into this repository, transferring only the chunks it lacks.

    A copied snapshot keeps its id; one the destination already holds is skipped (and said so).

    Interrupted, the snapshots copied so far stay, each whole, and a re-run skips them. Locks: shared, both.
    """
    use_from_password_file(from_password_file)
    with open_repo(ctx, LockMode.SHARED, lock_wait) as dst, \
            open_source(normalize_location(from_repo), dst, lock_wait, ctx.info_name or "") as src:
        result = copy_snapshots(src, dst, snapshots or None, progress=progress_sink())
    if json:
        docs = []
        for s in result.snapshots:
            doc = record_json(s.record)
            doc.update(copied=s.copied, skipped=s.skipped or None, chunks_new=s.chunks, bytes_new=s.bytes_copied,
                       bytes_stored=s.bytes_uploaded)
            docs.append(doc)
        print_json({"version": JSON_VERSION, "copied": len(result.copied), "skipped": len(result.skipped),
                    "chunks_new": result.chunks, "bytes_new": result.bytes_copied,
                    "bytes_stored": result.bytes_uploaded, "snapshots": docs})
        return
    for s in result.snapshots:
        label = f"{s.record.name}@{s.record.short_id}"
        if s.copied:
            stdout.print(f"copied {label} ({s.chunks} new chunks, {human_bytes(s.bytes_uploaded)} uploaded)")
        else:
            stdout.print(f"skipped {label}: {s.skipped}")
    if not result.snapshots:
        stdout.print("no snapshots to copy")


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(11, 13, 14, 18))(copy)
