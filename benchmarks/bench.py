"""Benchmark dedupimg against restic and borg on three image series (vm, ext4, tar), three versions each.

    python benchmarks/bench.py [--scale small|full] [--series vm,ext4,tar] [--tools dedupimg,restic,borg,bup]

Per series: every tool backs up version 1, 2 and 3 of the same image path (interleaved: for each version,
each tool), then restores the last version and version 1 into empty directories, each checked bit-exact
against the source; dedupimg also restores the last version onto a copy of the previous one (--delta).
Writes benchmarks/results/latest.md and latest.json and prints the tables. Run it as root (loop mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from measure import Measurement, copy_sparse, file_hash, run_measured, tree_bytes
from report import render_json, render_markdown, system_info
from results import DeltaRun, RestoreRun, SeriesResult, ToolRun
from series import SPECS, MiB, Series, build_series, ensure_tools
from tools import TOOL_NAMES, Dedupimg, Tool, make_tool, parse_json_output

HERE = Path(__file__).resolve().parent
USAGE_ERROR = 2  # dedupimg's exit code for bad arguments (an unknown option such as --delta)


@dataclass(frozen=True)
class Scale:
    name: str
    sizes: dict[str, int]  # series name -> image bytes


SCALES = {
    "small": Scale("small", {"vm": 512 * MiB, "ext4": 256 * MiB, "tar": 128 * MiB}),
    "full": Scale("full", {"vm": 4096 * MiB, "ext4": 2048 * MiB, "tar": 1024 * MiB}),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- running


def back_up_all_versions(series: Series, tools: list[Tool], image: Path, runs: dict[str, ToolRun]) -> None:
    """For each version: put it in place at the same path (untimed), then let each tool back it up."""
    for version in series.versions:
        copy_sparse(version.path, image)  # same path and inode, new bytes and mtime
        for tool in tools:
            b = tool.backup(image, version.number)
            runs[tool.name].backups.append(b)
            status = "ok" if b.measurement.ok else f"FAILED: {b.measurement.error_line()}"
            log(f"  {series.name} v{version.number} {tool.name:9s} backup {b.measurement.wall_s:7.2f} s, "
                f"repo {b.repo_bytes / MiB:8.1f} MiB  {status}")


def restore_and_check(tool: Tool, run: ToolRun, series: Series, number: int, image: Path, out: Path) -> RestoreRun:
    """Restore version `number` into an empty directory and compare it with the source image's blake3."""
    backup = run.backup(number)
    if backup is None or backup.snapshot_id is None:
        return RestoreRun(number, None, False, "its backup failed")
    m, restored = tool.restore(backup.snapshot_id, image, out)
    if not m.ok:
        result = RestoreRun(number, m, False, m.error_line())
    elif not restored.is_file():
        result = RestoreRun(number, m, False, f"restored file not found at {restored}")
    else:
        same = file_hash(restored) == series.versions[number - 1].blake3
        result = RestoreRun(number, m, same, "" if same else "restored bytes differ from the source")
    shutil.rmtree(out, ignore_errors=True)
    status = "bit-exact" if result.bit_exact else f"FAILED: {result.note}"
    log(f"  {series.name} v{number} {tool.name:9s} restore {m.wall_s:7.2f} s  {status}")
    return result


def delta_restore(tool: Dedupimg, run: ToolRun, series: Series, out: Path) -> DeltaRun:
    """Restore the last version with --delta onto a copy of the version before it."""
    last, previous = series.versions[-1], series.versions[-2]
    backup = run.backup(last.number)
    if backup is None or backup.snapshot_id is None:
        return DeltaRun(True, note="its backup failed")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    target = out / f"{series.name}.img"
    copy_sparse(previous.path, target)
    m = run_measured(tool.delta_restore_cmd(backup.snapshot_id, target), cwd=out, env=tool.env())
    result = delta_result(m, target, last.blake3)
    shutil.rmtree(out, ignore_errors=True)
    status = "n/a" if not result.available else "bit-exact" if result.bit_exact else f"FAILED: {result.note}"
    log(f"  {series.name} v{previous.number}->v{last.number} {tool.name} delta restore {m.wall_s:7.2f} s  {status}")
    return result


def delta_result(m: Measurement, target: Path, expected_hash: str) -> DeltaRun:
    if m.exit_code == USAGE_ERROR:
        return DeltaRun(False, m, note=f"n/a: {m.error_line()}")
    if not m.ok:
        return DeltaRun(True, m, note=m.error_line())
    try:
        doc = parse_json_output(m.stdout)
        read, written = int(doc["bytes_read"]), int(doc["bytes_written"])  # type: ignore[call-overload]
    except (ValueError, KeyError, TypeError) as exc:
        return DeltaRun(True, m, note=f"unexpected output: {exc}")
    same = file_hash(target) == expected_hash
    return DeltaRun(True, m, read, written, same, "" if same else "restored bytes differ from the source")


def bench_series(series: Series, tool_names: list[str], work: Path, dedupimg: Path) -> SeriesResult:
    image = work / "live" / series.name / f"{series.name}.img"
    image.parent.mkdir(parents=True, exist_ok=True)
    tools = [make_tool(name, work / "repos" / series.name / name, dedupimg) for name in tool_names]
    for tool in tools:
        tool.init()
    runs = {tool.name: ToolRun(tool.name) for tool in tools}
    back_up_all_versions(series, tools, image, runs)
    out = work / "restore"
    for tool in tools:
        run = runs[tool.name]
        for number in (series.versions[-1].number, series.versions[0].number):
            run.restores.append(restore_and_check(tool, run, series, number, image, out))
        if isinstance(tool, Dedupimg):
            run.delta = delta_restore(tool, run, series, out)
    shutil.rmtree(work / "repos" / series.name, ignore_errors=True)
    shutil.rmtree(image.parent, ignore_errors=True)
    return SeriesResult(series, runs)


# ---------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="small")
    ap.add_argument("--series", default=",".join(SPECS), help="comma-separated subset of vm,ext4,tar")
    ap.add_argument("--tools", default=",".join(TOOL_NAMES), help="comma-separated subset of dedupimg,restic,borg,bup")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="work directory (default benchmarks/work)")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where latest.md/json go")
    ap.add_argument("--dedupimg", type=Path, default=HERE.parent / ".venv" / "bin" / "dedupimg")
    ap.add_argument("--clean", action="store_true",
                    help="remove the generated image series at the end (by default they stay in WORK/SCALE/series "
                         "for the next run and for chunk_size.py; repositories and restores are always removed)")
    args = ap.parse_args(argv)
    args.series = split_choices(ap, "--series", args.series, list(SPECS))
    args.tools = split_choices(ap, "--tools", args.tools, TOOL_NAMES)
    return args


def split_choices(ap: argparse.ArgumentParser, option: str, value: str, allowed: list[str]) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        ap.error(f"{option}: choose from {','.join(allowed)} (got {value!r})")
    return [v for v in allowed if v in chosen]  # canonical order


def write_reports(results_dir: Path, markdown: str, doc: dict[str, object]) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "latest.md").write_text(markdown)
    (results_dir / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")


def source_change_warnings(info: dict[str, object], args: argparse.Namespace) -> list[str]:
    """A warning if dedupimg's source changed while the benchmark ran (it is measured from the working tree)."""
    if "dedupimg" not in args.tools:
        return []
    before = info["tools"]["dedupimg"]  # type: ignore[index]
    after = make_tool("dedupimg", args.work, args.dedupimg).version()
    if before == after:
        return []
    message = f"dedupimg's source changed during the run ({before} -> {after}): results may mix versions"
    log(f"warning: {message}")
    return [message]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("warning: not root; the ext4 series needs loop mounts")
    ensure_tools()
    scale = SCALES[args.scale]
    work = args.work.resolve() / scale.name
    started = time.monotonic()
    info = system_info([make_tool(n, work, args.dedupimg) for n in args.tools], scale.name, work)
    log(f"scale {scale.name}, series {','.join(args.series)}, tools {','.join(args.tools)}, work {work}")
    results = []
    for name in args.series:
        series = build_series(name, scale.sizes[name], work / "series", log)
        results.append(bench_series(series, args.tools, work, args.dedupimg))
    elapsed = time.monotonic() - started
    info["warnings"] = source_change_warnings(info, args)
    markdown = render_markdown(info, results, elapsed)
    write_reports(args.results, markdown, render_json(info, results, elapsed))
    print(markdown)
    shutil.rmtree(work / "restore", ignore_errors=True)
    shutil.rmtree(work / "live", ignore_errors=True)
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"image series kept in {work / 'series'} ({tree_bytes(work / 'series')[1] / 1e9:.1f} GB on disk; "
            "--clean removes them)")
    failures = [f"{r.series.name}/{run.tool}: {f}" for r in results for run in r.runs.values() for f in run.failures()]
    for failure in failures:
        log(f"FAILED {failure}")
    log(f"done in {elapsed / 60:.1f} min; report in {args.results / 'latest.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
