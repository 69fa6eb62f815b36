"""What several commands render alike: exit codes in help, sizes, JSON of records and prune reports, progress
bars on stderr. A command's own output stays in its module."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
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
from rich.table import Table
from rich.text import Text

from dedupimg.core.errors import EXIT_CODES, OutputClosed
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.progress import NoProgress
from dedupimg.core.progress import Progress as ProgressSink
from dedupimg.ops.prune import PruneReport

# No markup and no emoji codes: names, tags, paths and messages are user text, printed as given ("[bold]" or
# ":smile:" in an image name stays literal; "[/x]" would otherwise raise MarkupError after the work was done).
# A pipe or a log gets whole lines (tables are not cut to 80 columns there); a terminal its own width.
_PIPE_WIDTH = None if (sys.stdout is not None and sys.stdout.isatty()) or os.environ.get("COLUMNS") else 250
class _Stdout(Console):
    """Standard output: a reader that went away (``| head -1``) raises OutputClosed, which main ends quietly
    with its code (rich's own handling exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # what is still buffered is dropped, not written again
        raise OutputClosed("standard output was closed by its reader")


stdout = _Stdout(highlight=False, soft_wrap=True, markup=False, emoji=False, width=_PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False, markup=False, emoji=False)


# Codes every command can return (success, unexpected error, usage error, interrupted, standard output closed),
# and those of every command that opens a repository: none there, its config damaged or too new, a file of it not
# readable (permission denied), its index missing or damaged ("run repair index").
ANY_COMMAND_CODES = (0, 1, 2, 130, 141)
OPENS_REPOSITORY_CODES = (10, 12, 16, 17, 22)


def exit_codes_help(*codes: int, opens_repository: bool = True) -> str:
    """The epilog of a command's help: ``codes`` plus those every command, and every command that opens a
    repository (unless ``opens_repository`` is False: init, repair), can return."""
    listed = (*ANY_COMMAND_CODES, *(OPENS_REPOSITORY_CODES if opens_repository else ()), *codes)
    return "Exit codes: " + "; ".join(f"{c} {EXIT_CODES[c]}" for c in sorted(set(listed))) + "."


# The version of every JSON document the commands print (a "version" key in each object): raised when a key
# changes meaning or goes; new keys do not raise it.
JSON_VERSION = 1

# -q (0), default (1), -v (2): set once by the root callback (cli/app.py).
verbosity = 1
# The command line holds --json: progress on a non-terminal is JSON status lines then (cli/main.py sets it).
json_status = False
PROGRESS_INTERVAL_ENV = "DEDUPIMG_PROGRESS_INTERVAL"
PROGRESS_INTERVAL = 10.0  # seconds between progress lines on a non-terminal (journald, cron mail)


def table(*columns: str, fixed: tuple[str, ...] = ("id", "time")) -> Table:
    """A table of plain columns; ``fixed`` ones (and sizes, numbers) never wrap, the others wrap within
    the column (long names, tags, sources fold onto more lines instead of being cut)."""
    out = Table(box=None, header_style="bold")
    for name in columns:
        keep = name in fixed
        out.add_column(name, no_wrap=keep, overflow="fold", justify="left")
    return out


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 snapshot``, ``2 snapshots``."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def local_time(iso: str) -> str:
    """A recorded time (ISO 8601 with its offset) in this machine's zone ($TZ), to the second."""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def utc_time(iso: str) -> str:
    """A recorded time in UTC, ISO 8601 (``2026-01-02T02:04:05Z``)."""
    t = datetime.fromisoformat(iso).astimezone(UTC)
    return t.isoformat(timespec="microseconds" if t.microsecond else "seconds").replace("+00:00", "Z")


def utc_offset(iso: str) -> str:
    """The offset the time was recorded with (``+01:00``)."""
    t = datetime.fromisoformat(iso)
    text = t.strftime("%z")  # +0100
    return f"{text[:3]}:{text[3:5]}" if text else "+00:00"


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
        "version": JSON_VERSION,
        "id": rec.hex_id,
        "short_id": rec.short_id,
        "name": rec.name,
        "time": rec.time,  # as recorded: ISO 8601 with its original offset
        "time_utc": utc_time(rec.time),
        "utc_offset": utc_offset(rec.time),
        "size": rec.size,
        "tags": rec.tags,
        "host": rec.host,
        "source": rec.source,
        # The image's blake3; null for an incremental snapshot, whose hash is of its extents (docs/vm-sources.md)
        "blake3": None if rec.hash_derived else rec.image_hash.hex(),
        "hash_of": rec.hash_of,
        "extents_blake3": rec.image_hash.hex() if rec.hash_derived else None,
        "changed_during_read": rec.changed_during_read,
    }


def prune_json(r: PruneReport) -> dict[str, object]:
    """A prune report as ``prune --json`` prints it (and ``forget --prune --json`` under "prune")."""
    doc: dict[str, object] = {
        "version": JSON_VERSION,
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
        "salvaged_packs": r.salvaged_packs,
        "held_rows": r.held_rows,
        "chunks_kept_for_left_out": r.chunks_kept_for_left_out,
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
    if r.salvaged_packs:
        plan += f"; {r.salvaged_packs} salvaged damaged packs among them"
    if r.held_rows:
        kept = "no unreferenced chunk freed while" if r.chunks_kept_for_left_out else "kept for"
        plan += (f"; {r.held_rows} blobs {kept} snapshots 'repair index' left out lack data (put the lost packs "
                 "back and run 'repair index', or give them up with 'forget --left-out')")
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


class LineProgress:
    """On a non-terminal (journald, cron, a pipe): a line on stderr every ``interval`` seconds while a task
    runs, and one when it ends if any was printed; with ``as_json``, JSON status lines as restic prints them."""

    def __init__(self, interval: float, as_json: bool, item_tasks: tuple[str, ...] = ()) -> None:
        self._interval = interval
        self._json = as_json
        self._item_tasks = item_tasks
        self._task: str | None = None
        self._total: int | None = None
        self._done = 0
        self._started = self._last = 0.0
        self._printed = False

    def start(self, task: str, total: int | None) -> None:
        self._task, self._total, self._done, self._printed = task, total, 0, False
        self._started = self._last = time.monotonic()

    def advance(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if self._task is not None and now - self._last >= self._interval:
            self._last = now
            self._emit(now, "status")

    def finish(self) -> None:
        if self._task is not None and self._printed:
            self._emit(time.monotonic(), "done")
        self._task = None

    stop = finish

    def _emit(self, now: float, kind: str) -> None:
        assert self._task is not None
        self._printed = True
        seconds = now - self._started
        share = self._done / self._total if self._total else None
        if self._json:
            doc: dict[str, object] = {"message_type": kind, "task": self._task, "done": self._done,
                                      "total": self._total, "seconds_elapsed": round(seconds, 1)}
            if share is not None:
                doc["percent_done"] = round(100 * share, 1)
            line = json.dumps(doc)
        else:
            items = self._task.startswith(self._item_tasks) if self._item_tasks else False
            amount = (f"{self._done}" if items else human_bytes(self._done)) + (
                "" if self._total is None else f" of {self._total if items else human_bytes(self._total)}")
            pct = "" if share is None else f" ({100 * share:.0f}%)"
            line = f"{self._task}: {'done, ' if kind == 'done' else ''}{amount}{pct} in {seconds:.0f} s"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_INTERVAL_ENV, PROGRESS_INTERVAL)))
    except ValueError:
        return PROGRESS_INTERVAL


def progress_sink(item_tasks: tuple[str, ...] = ()) -> ProgressSink:
    """A bar when stderr is a terminal; otherwise a progress line every few seconds (JSON status lines with
    --json), so that journald and cron logs show a long command's progress; nothing with -q."""
    if verbosity == 0:
        return NoProgress()
    if sys.stderr.isatty():
        return BarProgress(item_tasks)
    return LineProgress(progress_interval(), json_status, item_tasks)
