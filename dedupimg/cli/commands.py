"""The commands: each parses its options, calls one library function and renders the result."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from dedupimg.cli.main import LockWait, RepoOption, app, open_repo, repo_path
from dedupimg.cli.render import exit_codes_help, human_bytes, print_json, progress_sink, stdout
from dedupimg.core.config import DEFAULT_CHUNK_SIZE, ChunkerParams
from dedupimg.core.errors import SourceChanged, UsageError
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.ops.restore import restore as restore_snapshot
from dedupimg.ops.restore import verify as verify_snapshot
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.lock import LockMode
from dedupimg.repo.repository import Repository


@app.command(epilog=exit_codes_help(16, 18, 21, opens_repository=False))
def init(
    ctx: typer.Context,
    chunk_size: Annotated[
        int, typer.Option(help="Average chunk size in bytes (a power of two; min is 1/4, max 4x).")
    ] = DEFAULT_CHUNK_SIZE,
    compression_level: Annotated[
        int | None, typer.Option(help="zstd level for new chunks (-7 fastest .. 22 smallest).")
    ] = None,
    pack_size: Annotated[int | None, typer.Option(hidden=True, help="Target pack size (tests).")] = None,
    repo_dir: RepoOption = None,
) -> None:
    """Create a new repository (readable by its owner only)."""
    path = repo_path(ctx)
    repo = Repository.init(path, ChunkerParams.for_average(chunk_size), pack_size, compression_level)
    repo.close()
    stdout.print(f"created repository {repo.config.repo_id[:8]} at {path}")


def _record_json(rec: SnapshotRecord) -> dict[str, object]:
    return {
        "id": rec.hex_id,
        "short_id": rec.short_id,
        "name": rec.name,
        "time": rec.time,
        "size": rec.size,
        "tags": rec.tags,
        "host": rec.host,
        "source": rec.source,
        "blake3": rec.image_hash.hex(),
        "changed_during_read": rec.changed_during_read,
    }


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--time {value!r} is not an ISO 8601 time (like 2026-01-31T22:00:00+01:00)") from None


def split_tags(values: list[str] | None) -> list[str]:
    """``--tag a,b --tag c``: tags a, b and c (restic splits each value on commas); blanks are dropped."""
    return [t for v in values or [] for t in (part.strip() for part in v.split(",")) if t]


@app.command(epilog=exit_codes_help(3, 11, 18))
def snapshot(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Image file, sparse file, block device, or - for stdin.")],
    name: Annotated[str | None, typer.Option(help="Image name (default: the file's base name).")] = None,
    tag: Annotated[
        list[str] | None, typer.Option(metavar="TAG[,TAG...]", help="Tag the snapshot (repeatable; a,b is two tags).")
    ] = None,
    time: Annotated[str | None, typer.Option(help="Record this time (ISO 8601) instead of now.")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Take a snapshot of an image and print its id.

    A regular file that changes while it is read (size, mtime or ctime) is still stored, marked
    changed_during_read, with a warning and exit 3: snapshot a frozen filesystem or an LVM snapshot instead.
    """
    when = _parse_time(time)
    with open_repo(ctx, LockMode.SHARED, lock_wait) as repo:
        result = take_snapshot(repo, source, name=name, tags=split_tags(tag), when=when, progress=progress_sink())
    rec = result.record
    if json:
        doc = _record_json(rec)
        doc.update(
            bytes_read=result.bytes_read,
            bytes_new=result.bytes_new,
            bytes_stored=result.bytes_stored,
            chunks_new=result.chunks_new,
            seconds=round(result.seconds, 3),
        )
        print_json(doc)
    else:
        stdout.print(rec.hex_id)
    if result.changed_during_read:
        raise SourceChanged(f"snapshot {rec.short_id} stored, but {source} changed while it was read "
                            f"({result.changed_during_read} differ): it may match no moment of the disk; "
                            f"snapshot a frozen or LVM snapshot source (see README)")


@app.command(epilog=exit_codes_help())
def snapshots(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="Only snapshots of this image name.")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    repo_dir: RepoOption = None,
) -> None:
    """List snapshots, oldest first."""
    with open_repo(ctx) as repo:
        records = repo.snapshots(name)
    if json:
        print_json([_record_json(r) for r in records])
        return
    noted = any(r.changed_during_read for r in records)
    table = Table("id", "name", "time", "size", "tags", *(["note"] if noted else []), box=None, header_style="bold")
    for r in records:
        note = ["changed during read" if r.changed_during_read else ""] if noted else []
        table.add_row(r.short_id, r.name, r.time, human_bytes(r.size), ",".join(r.tags), *note)
    stdout.print(table)
    stdout.print(f"{len(records)} snapshots")


@app.command(epilog=exit_codes_help(11, 13, 14, 15, 18))
def restore(
    ctx: typer.Context,
    snapshot: Annotated[str, typer.Argument(help="Snapshot id, unique id prefix, 'latest' or NAME@latest.")],
    target: Annotated[
        str, typer.Argument(help="File path, block device (not mounted or in use), or - for stdout; a symlink is "
                                 "followed.")
    ],
    force: Annotated[
        bool, typer.Option(help="Replace an existing file (its owner and mode are kept) or a dangling symlink's "
                                "target, or overwrite a block device.")
    ] = False,
    name: Annotated[str | None, typer.Option(help="With 'latest': the newest snapshot of this name.")] = None,
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
        doc = _record_json(rec)
        doc.update(target=target, delta=delta, bytes_read=result.bytes_read, bytes_written=result.bytes_written,
                   seconds=round(result.seconds, 3))
        print_json(doc)
    elif delta:
        stdout.print(f"updated {target} to {rec.short_id}: read {human_bytes(result.bytes_read)}, "
                     f"wrote {human_bytes(result.bytes_written)}")
    else:
        stdout.print(f"restored {rec.short_id} ({human_bytes(rec.size)}) to {target}")


@app.command(epilog=exit_codes_help(11, 13, 14))
def verify(
    ctx: typer.Context,
    snapshot: Annotated[str, typer.Argument(help="Snapshot id, unique id prefix, 'latest' or NAME@latest.")],
    name: Annotated[str | None, typer.Option(help="With 'latest': the newest snapshot of this name.")] = None,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Read a snapshot's whole image and check every chunk and the image's blake3 (writes nothing)."""
    with open_repo(ctx, LockMode.SHARED, lock_wait) as repo:
        result = verify_snapshot(repo, snapshot, name=name, progress=progress_sink())
    rec = result.record
    stdout.print(f"snapshot {rec.short_id} ({human_bytes(rec.size)}) verified: blake3 {rec.image_hash.hex()[:16]}... "
                 f"matches, in {result.seconds:.1f} s")


@app.command(epilog=exit_codes_help())
def info(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    repo_dir: RepoOption = None,
) -> None:
    """Repository size, deduplication and compression."""
    with open_repo(ctx) as repo:
        stats = repo.stats()
        config = repo.config
    dedup = stats.logical_bytes / stats.unique_bytes if stats.unique_bytes else 0.0
    compression = stats.unique_bytes / stats.chunk_stored_bytes if stats.chunk_stored_bytes else 0.0
    doc = {
        "repo_id": config.repo_id,
        "path": str(repo_path(ctx)),
        "snapshots": stats.snapshots,
        "logical_bytes": stats.logical_bytes,
        "unique_bytes": stats.unique_bytes,
        "stored_bytes": stats.pack_bytes,
        "packs": stats.packs,
        "chunks": stats.chunks,
        "dedup_ratio": round(dedup, 3),
        "compression_ratio": round(compression, 3),
        "chunk_size": config.chunker.avg_size,
    }
    if json:
        print_json(doc)
        return
    stdout.print(f"repository   {config.repo_id} at {doc['path']}")
    stdout.print(f"snapshots    {stats.snapshots}")
    stdout.print(f"logical      {human_bytes(stats.logical_bytes)}")
    stdout.print(f"unique data  {human_bytes(stats.unique_bytes)} in {stats.chunks} chunks")
    stdout.print(f"stored       {human_bytes(stats.pack_bytes)} in {stats.packs} packs")
    stdout.print(f"dedup ratio  {dedup:.2f}x   compression ratio {compression:.2f}x")
