"""What several commands render alike: exit codes in help, sizes, JSON of records and prune reports, progress
bars on stderr. A command's own output stays in its module."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from dedupimg.core.errors import EXIT_CODES
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.progress import NoProgress
from dedupimg.core.progress import Progress as ProgressSink
from dedupimg.ops.prune import PruneReport

# No markup and no emoji codes: names, tags, paths and messages are user text, printed as given ("[bold]" or
# ":smile:" in an image name stays literal; "[/x]" would otherwise raise MarkupError after the work was done).
stdout = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
stderr = Console(stderr=True, highlight=False, markup=False, emoji=False)


# Codes every command can return (success, unexpected error, usage error, interrupted), and those of every
# command that opens a repository: none there, its config damaged or too new, a file of it not readable
# (permission denied), its index missing or damaged ("run repair index").
ANY_COMMAND_CODES = (0, 1, 2, 130)
OPENS_REPOSITORY_CODES = (10, 12, 16, 17, 22)


def exit_codes_help(*codes: int, opens_repository: bool = True) -> str:
    """The epilog of a command's help: ``codes`` plus those every command, and every command that opens a
    repository (unless ``opens_repository`` is False: init, repair), can return."""
    listed = (*ANY_COMMAND_CODES, *(OPENS_REPOSITORY_CODES if opens_repository else ()), *codes)
    return "Exit codes: " + "; ".join(f"{c} {EXIT_CODES[c]}" for c in sorted(set(listed))) + "."


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def record_json(rec: SnapshotRecord) -> dict[str, object]:
    """A snapshot record as ``snapshot``, ``snapshots`` and ``restore`` print it with ``--json``."""
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


def prune_json(r: PruneReport) -> dict[str, object]:
    """A prune report as ``prune --json`` prints it (and ``forget --prune --json`` under "prune")."""
    doc: dict[str, object] = {
        "dry_run": r.dry_run,
        "max_unused": r.max_unused,
        "packs_to_delete": r.packs_to_delete,
        "packs_to_rewrite": r.packs_to_rewrite,
        "packs_keeping_garbage": r.packs_keeping_garbage,
        "bytes_to_copy": r.bytes_to_copy,
        "bytes_to_free": r.bytes_to_free,
        "chunks_dropped": r.chunks_dropped,
        "segments_dropped": r.segments_dropped,
        "records_dropped": r.records_dropped,
        "orphan_packs": r.orphan_packs,
        "tmp_files": r.tmp_files,
        "skipped": [str(p) for p in r.skipped],
    }
    if r.outcome is not None:
        doc.update(packs_deleted=r.outcome.packs_deleted, packs_rewritten=r.outcome.packs_rewritten,
                   packs_written=r.outcome.packs_written, bytes_freed=r.outcome.bytes_freed,
                   bytes_written=r.outcome.bytes_written)
    return doc


def render_prune(r: PruneReport) -> None:
    """A prune report as ``prune`` (and ``forget --prune``) print it: the plan, and what was freed."""
    plan = (f"{r.packs_to_delete} packs to delete, {r.packs_to_rewrite} to rewrite "
            f"({human_bytes(r.bytes_to_copy)} to copy); {r.chunks_dropped} chunks, {r.segments_dropped} "
            f"segments, {r.records_dropped} records dropped; {r.orphan_packs} orphan packs, {r.tmp_files} "
            f"temporary files")
    for p in r.skipped:  # Text: a path is not rich markup
        stdout.print(Text(f"skipped {p}: a directory, not a file dedupimg writes; left alone"), soft_wrap=True)
    if r.outcome is None:
        stdout.print(f"prune plan: {plan}; would free about {human_bytes(r.bytes_to_free)}")
    else:
        stdout.print(f"pruned: {plan}; freed {human_bytes(r.outcome.bytes_freed)}")


class _ByUnit(ProgressColumn):
    """Renders a task with ``bytes`` or with ``items`` (its ``items`` field), as the task says."""

    def __init__(self, for_bytes: ProgressColumn, for_items: ProgressColumn) -> None:
        super().__init__()
        self._bytes = for_bytes
        self._items = for_items

    def render(self, task: Task) -> Text:
        column = self._items if task.fields.get("items") else self._bytes
        rendered = column.render(task)
        return rendered if isinstance(rendered, Text) else Text(str(rendered))


class BarProgress:
    """Draws one rich progress bar per task on stderr.

    Tasks count bytes, except those whose name starts with one of ``item_tasks``: those count items (blobs,
    packs) and show "done/total" instead of sizes and speeds.
    """

    def __init__(self, item_tasks: tuple[str, ...] = ()) -> None:
        self._item_tasks = item_tasks
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),  # the description holds the image name
            BarColumn(),
            _ByUnit(DownloadColumn(binary_units=True), MofNCompleteColumn()),
            _ByUnit(TransferSpeedColumn(), TextColumn("")),
            TimeRemainingColumn(),
            console=stderr,
            transient=False,
        )
        self._task: TaskID | None = None

    def start(self, task: str, total: int | None) -> None:
        self._progress.start()
        self._task = self._progress.add_task(task, total=total, items=task.startswith(self._item_tasks))

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def finish(self) -> None:
        self._progress.stop()

    def stop(self) -> None:
        self._progress.stop()


def progress_sink(item_tasks: tuple[str, ...] = ()) -> ProgressSink:
    """A bar when stderr is a terminal; silence otherwise (logs and pipes stay clean)."""
    return BarProgress(item_tasks) if sys.stderr.isatty() else NoProgress()
