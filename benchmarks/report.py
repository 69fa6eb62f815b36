"""Markdown tables and JSON from the results: per series a metric x tool table, then dedupimg's ratios."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from measure import MB
from results import SeriesResult, ToolRun
from series import Series
from tools import Tool

MiB = 1 << 20
DASH = "—"

CAVEATS = """\
- MB = 10^6 bytes. Throughput = the image's logical size (holes included) / wall seconds of the command.
- The page cache cannot be dropped reliably here: each image version is copied into place (untimed) right
  before the tools back it up, so it is in the page cache for every tool equally; `sync` runs before each
  timed command. Restores write into the page cache as well (then `sync` before the next command).
- Tools run interleaved (for each version: dedupimg, restic, borg), one at a time, on a shared machine: the
  numbers are noisy; compare ratios, and repeat runs before trusting small differences.
- CPU seconds are user + system of the command and its waited-for children; peak RSS is ru_maxrss, measured
  through a tiny launcher process so the harness's own memory does not leak into it.
- Repository bytes are the sum of st_size of the repository's files; caches (restic, borg) are excluded.
- restic 0.14 restores files without holes (no sparse restore); borg extracts with `--sparse`; dedupimg writes
  holes for zero extents. borg and restic read the holes of sparse images at backup; dedupimg skips them.
- bup (the peer for stored bytes per version: rolling-hash chunks of about 8 KiB, zlib) saves each version on
  its own branch (`bup index` + `bup save`, its index step timed with it) and restores with `--sparse`.
- Delta restore: dedupimg restores the last version onto a copy of the previous one (`restore --delta`);
  "n/a" when this dedupimg has no such option."""


# ---------------------------------------------------------------------------------------------------------- system


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def disk_write_mbps(directory: Path, nbytes: int = 1 << 30) -> float:
    """Sequential write of non-zero data then fdatasync, as a restore timed to ``sync`` does: the ceiling
    that any tool's restore speed meets on this disk (holes in sparse images are not written, so a
    restore of a sparse image can show more logical MB/s than this)."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(8 << 20)
    path = directory / "disk-ceiling.tmp"
    started = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(nbytes // len(block)):
            os.write(fd, block)
        os.fdatasync(fd)
    finally:
        os.close(fd)
        elapsed = time.monotonic() - started
        path.unlink()
    return nbytes / MB / elapsed


def system_info(tools: list[Tool], scale: str, work: Path) -> dict[str, object]:
    return {
        "disk_write_mbps": round(disk_write_mbps(work), 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "scale": scale,
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "ram_gib": round(ram_bytes() / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "tools": {t.name: t.version() for t in tools},
    }


# ---------------------------------------------------------------------------------------------------------- numbers


def mbps(nbytes: int, seconds: float) -> float | None:
    return nbytes / MB / seconds if seconds > 0 else None


def fmt(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class ToolNumbers:
    """The derived numbers of one tool on one series (None where the operation failed or did not run)."""

    run: ToolRun
    series: Series

    def size(self, version: int) -> int:
        return self.series.versions[version - 1].size

    def snapshot_mbps(self, version: int) -> float | None:
        b = self.run.backup(version)
        return mbps(self.size(version), b.measurement.wall_s) if b and b.measurement.ok else None

    def later_snapshot_seconds(self) -> float | None:
        later = [b for b in self.run.backups if b.version > 1]
        if not later or not all(b.measurement.ok for b in later):
            return None
        return sum(b.measurement.wall_s for b in later)

    def snapshot_cpu(self, version: int) -> float | None:
        b = self.run.backup(version)
        return b.measurement.cpu_s if b and b.measurement.ok else None

    def snapshot_peak_rss(self) -> int | None:
        ok = [b.measurement.peak_rss for b in self.run.backups if b.measurement.ok]
        return max(ok) if ok else None

    def repo_bytes(self, version: int) -> int | None:
        b = self.run.backup(version)
        return b.repo_bytes if b and b.measurement.ok else None

    def growth(self, version: int) -> int | None:
        now, before = self.repo_bytes(version), self.repo_bytes(version - 1)
        return now - before if now is not None and before is not None else None

    def later_growth(self) -> int | None:
        growths = [self.growth(b.version) for b in self.run.backups if b.version > 1]
        return sum(g for g in growths if g is not None) if growths and None not in growths else None

    def restore_mbps(self, version: int) -> float | None:
        r = self.run.restore(version)
        return mbps(self.size(version), r.measurement.wall_s) if r and r.measurement and r.bit_exact else None

    def restore_cpu(self, version: int) -> float | None:
        r = self.run.restore(version)
        return r.measurement.cpu_s if r and r.measurement and r.measurement.ok else None

    def restore_peak_rss(self) -> int | None:
        ok = [r.measurement.peak_rss for r in self.run.restores if r.measurement and r.measurement.ok]
        return max(ok) if ok else None


# ---------------------------------------------------------------------------------------------------------- tables


def md_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mb(nbytes: int | None) -> str:
    return fmt(None if nbytes is None else nbytes / MB)


def joined(values: list[str]) -> str:
    return " / ".join(values)


def cell_text(text: str, limit: int = 90) -> str:
    """Text fit for a table cell: one line, no pipes, at most limit characters."""
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def verdict(run: ToolRun) -> str:
    """'yes (v3, v1, delta)' when every restore was bit-exact, else FAILED with the reasons."""
    if not run.restores:
        return DASH
    problems = [f"v{r.version}: {cell_text(r.note or 'not bit-exact')}" for r in run.restores if not r.bit_exact]
    if run.delta and run.delta.failed:
        problems.append(f"delta: {cell_text(run.delta.note or 'not bit-exact')}")
    if problems:
        return "**FAILED** " + "; ".join(problems)
    checked = [f"v{r.version}" for r in run.restores] + (["delta"] if delta_ok(run) else [])
    return "yes (" + ", ".join(checked) + ")"


def delta_ok(run: ToolRun) -> bool:
    return bool(run.delta and run.delta.available and run.delta.bit_exact)


def delta_cells(run: ToolRun, image_bytes: int) -> tuple[str, str]:
    """(MB/s, MB read / written) of the delta restore, 'n/a' without the option, a dash for other tools."""
    d = run.delta
    if d is None:
        return DASH, DASH
    if not d.available:
        return "n/a", "n/a"
    if not d.bit_exact or d.measurement is None:
        return "**FAILED**", DASH
    speed = fmt(mbps(image_bytes, d.measurement.wall_s))
    return speed, f"{mb(d.bytes_read)} / {mb(d.bytes_written)}"


def series_rows(result: SeriesResult) -> tuple[list[str], list[list[str]]]:
    versions = [v.number for v in result.series.versions]
    image_bytes = result.series.size
    nums = {name: ToolNumbers(run, result.series) for name, run in result.runs.items()}

    def row(label: str, cell: Callable[[ToolNumbers], str]) -> list[str]:
        return [label, *(cell(n) for n in nums.values())]

    def speed(v: int) -> Callable[[ToolNumbers], str]:
        return lambda n: fmt(n.snapshot_mbps(v))

    rows = [row(f"snapshot v{v} MB/s", speed(v)) for v in versions]
    rows += [
        row("snapshot CPU s (" + joined([f"v{v}" for v in versions]) + ")",
            lambda n: joined([fmt(n.snapshot_cpu(v)) for v in versions])),
        row("snapshot peak RSS MB", lambda n: mb(n.snapshot_peak_rss())),
        row("repo MB after " + joined([f"v{v}" for v in versions]),
            lambda n: joined([mb(n.repo_bytes(v)) for v in versions])),
        row("stored per new version MB (" + joined([f"v{v}" for v in versions[1:]]) + ")",
            lambda n: joined([mb(n.growth(v)) for v in versions[1:]])),
        row(f"restore v{versions[-1]} MB/s", lambda n: fmt(n.restore_mbps(versions[-1]))),
        row(f"restore v{versions[0]} MB/s", lambda n: fmt(n.restore_mbps(versions[0]))),
        row(f"restore CPU s (v{versions[-1]} / v{versions[0]})",
            lambda n: joined([fmt(n.restore_cpu(versions[-1])), fmt(n.restore_cpu(versions[0]))])),
        row("restore peak RSS MB", lambda n: mb(n.restore_peak_rss())),
        row(f"delta restore v{versions[-2]}->v{versions[-1]} MB/s", lambda n: delta_cells(n.run, image_bytes)[0]),
        row("delta restore MB read / written", lambda n: delta_cells(n.run, image_bytes)[1]),
        row("restore bit-exact", lambda n: verdict(n.run)),
    ]
    return ["metric", *nums], rows


def ratio_rows(results: list[SeriesResult], baseline: str = "dedupimg") -> list[list[str]]:
    """Per series and other tool: dedupimg's speed / theirs, and their stored bytes per version / dedupimg's."""
    rows = []
    for result in results:
        if baseline not in result.runs:
            continue
        ours = ToolNumbers(result.runs[baseline], result.series)
        last = result.series.versions[-1].number
        for name, run in result.runs.items():
            if name == baseline:
                continue
            theirs = ToolNumbers(run, result.series)
            rows.append([
                result.series.name,
                f"{baseline}/{name}",
                fmt_ratio(ratio(ours.snapshot_mbps(1), theirs.snapshot_mbps(1))),
                fmt_ratio(ratio(theirs.later_snapshot_seconds(), ours.later_snapshot_seconds())),
                fmt_ratio(ratio(ours.restore_mbps(last), theirs.restore_mbps(last))),
                fmt_ratio(ratio(theirs.later_growth(), ours.later_growth())),
            ])
    return rows


RATIO_HEADER = ["series", "ratio", "snapshot v1 speed", "later snapshots speed", "restore speed",
                "stored per version (theirs/ours)"]


def series_section(result: SeriesResult) -> str:
    s = result.series
    first, last = s.versions[0], s.versions[-1]
    head = (f"### {s.name}: {s.description}\n\n"
            f"Image {last.size / MiB:,.0f} MiB logical ({last.size / MB:,.1f} MB); allocated "
            f"v{first.number} {first.allocated / MiB:,.0f} MiB, v{last.number} {last.allocated / MiB:,.0f} MiB.\n")
    header, rows = series_rows(result)
    return head + "\n" + md_table(header, rows) + "\n"


def render_markdown(info: dict[str, object], results: list[SeriesResult], elapsed: float) -> str:
    tools = info["tools"]
    assert isinstance(tools, dict)
    parts = [
        "# dedupimg benchmark: dedupimg vs restic vs borg",
        "",
        f"- date: {info['date']}; scale: **{info['scale']}**; whole run {elapsed / 60:.1f} min",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM, Linux {info['kernel']}, "
        f"load average at start {info['loadavg_at_start']}",
        f"- disk: sequential write + fdatasync of 1 GiB in the work directory {info['disk_write_mbps']} MB/s "
        "(the ceiling for every tool's restore of allocated bytes)",
        "- tools: " + "; ".join(str(v) for v in tools.values()) + f"; Python {info['python']}",
        *(f"- **warning**: {w}" for w in info.get("warnings", [])),  # type: ignore[attr-defined]
        "",
        "## Results",
        "",
    ]
    parts += [series_section(r) for r in results]
    parts += [
        "## Ratios",
        "",
        "Speed ratios are dedupimg's MB/s over the other tool's (above 1: dedupimg is faster; later snapshots: "
        "v2 and v3 together); stored per version is the other tool's repository growth over dedupimg's for v2 "
        "and v3 together (above 1: dedupimg stores less).",
        "",
        md_table(RATIO_HEADER, ratio_rows(results)),
        "",
        "## Caveats",
        "",
        CAVEATS,
        "",
    ]
    return "\n".join(parts)


def render_json(info: dict[str, object], results: list[SeriesResult], elapsed: float) -> dict[str, object]:
    return {
        "system": info,
        "elapsed_s": round(elapsed, 1),
        "series": [r.to_json() for r in results],
        "ratios": [dict(zip(RATIO_HEADER, row, strict=True)) for row in ratio_rows(results)],
    }
