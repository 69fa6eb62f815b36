"""`dedupimg snapshot`: store an image (file, sparse file, block device, stdin, qcow2/vmdk/..., NBD) as a new
snapshot, in full or (``--parent``) reading only what changed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from dedupimg.cli import render
from dedupimg.cli.app import JsonOption, LockWait, RepoOption, open_repo
from dedupimg.cli.render import exit_codes_help, human_bytes, print_json, progress_sink, record_json, stderr, stdout
from dedupimg.core.errors import SourceChanged, UsageError
from dedupimg.ops.snapshot import Changes, SnapshotResult, take_snapshot
from dedupimg.store.lock import LockMode


def snapshot(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Image file (raw, qcow2, vmdk, vdi, vhdx, ...), block device, "
                                                "nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, "
                                                "or - for stdin.")],
    name: Annotated[str | None, typer.Option(help="Image name (default: the file's base name).")] = None,
    tag: Annotated[
        list[str] | None, typer.Option(metavar="TAG[,TAG...]", help="Tag the snapshot (repeatable; a,b is two tags).")
    ] = None,
    time: Annotated[str | None, typer.Option(help="Record this time (ISO 8601) instead of now.")] = None,
    source_format: Annotated[str, typer.Option(
        help="Image format of a file source: auto (qemu-img's magic), raw, qcow2, vmdk, vdi, vhdx, vpc, qed, "
             "parallels, qcow.")] = "auto",
    parent: Annotated[str | None, typer.Option(
        help="Incremental: the snapshot the changes are relative to; unchanged ranges are taken from it.")] = None,
    dirty_bitmap: Annotated[str | None, typer.Option(
        metavar="NAME", help="With --parent: read only the ranges the NBD export's qemu:dirty-bitmap:NAME marks.")
    ] = None,
    changed_ranges: Annotated[str | None, typer.Option(
        metavar="FILE", help="With --parent: read only these ranges (JSON list of {offset, length}).")] = None,
    verify_unchanged: Annotated[float, typer.Option(
        metavar="PERCENT", help="With --parent: re-read this share of the unchanged ranges and compare them with "
                                "the parent (exit 23 on a difference).")] = 0.0,
    json: JsonOption = False,
    lock_wait: LockWait = 0.0,
    repo_dir: RepoOption = None,
) -> None:
    """Take a snapshot of an image and print its id (and, on stderr, a line of what it read and stored).

    A regular file that changes while it is read (size, mtime or ctime) is still stored, marked
    changed_during_read, with a warning and exit 3: snapshot a frozen filesystem or an LVM snapshot instead.
    qcow2, vmdk and other images are read through a private qemu-nbd (the guest-visible disk, backing chain
    included). With --parent and --dirty-bitmap or --changed-ranges only the changed ranges are read; the
    result is the same snapshot a full one would be (docs/vm-sources.md).
    """
    when = _parse_time(time)
    if parent is None and (dirty_bitmap or changed_ranges or verify_unchanged):
        raise UsageError("--dirty-bitmap, --changed-ranges and --verify-unchanged need --parent SNAPSHOT")
    changes = Changes(parent, dirty_bitmap, changed_ranges, verify_unchanged) if parent is not None else None
    with open_repo(ctx, LockMode.SHARED, lock_wait) as repo:
        result = take_snapshot(repo, source, name=name, tags=split_tags(tag), when=when, progress=progress_sink(),
                               source_format=source_format, changes=changes)
    rec = result.record
    if json:
        doc = record_json(rec)
        doc.update(
            bytes_read=result.bytes_read,
            bytes_new=result.bytes_new,
            bytes_stored=result.bytes_stored,
            chunks_new=result.chunks_new,
            seconds=round(result.seconds, 3),
        )
        if result.parent:
            doc.update(parent=result.parent, bytes_verified=result.bytes_verified)
        print_json(doc)
    else:
        stdout.print(rec.hex_id)  # alone on stdout: ID=$(dedupimg snapshot ...) in scripts
        if render.verbosity >= 1:
            stderr.print(summary_line(result), soft_wrap=True)
    if result.changed_during_read:
        raise SourceChanged(f"snapshot {rec.short_id} stored, but {source} changed while it was read "
                            f"({result.changed_during_read} differ): it may match no moment of the disk; "
                            f"snapshot a frozen or LVM snapshot source (see README)")


def summary_line(result: SnapshotResult) -> str:
    """What restic's "Added to the repository" line says, on one line: id, name, read, new, stored, time."""
    rec = result.record
    return (f"snapshot {rec.short_id} of {rec.name} saved: {human_bytes(result.bytes_read)} read, "
            f"{human_bytes(result.bytes_new)} new, {human_bytes(result.bytes_stored)} added to the repository, "
            f"in {result.seconds:.1f} s")


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


def register(app: typer.Typer) -> None:
    app.command(epilog=exit_codes_help(3, 11, 18, 23))(snapshot)
