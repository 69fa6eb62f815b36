"""Forget + prune speed: dedupimg against `restic forget --prune` on the same 30-version history.

    .venv/bin/python benchmarks/prune_bench.py [--size-mib 512] [--versions 30] [--repeat 1] [--work DIR]

Setup (untimed): a VM-like sparse image (series.vm_create) is aged version by version (series.vm_age: 1% of
the 4 KiB blocks rewritten in place, scattered, plus one clustered 64 MiB region per version); after each
version it is backed up into a dedupimg and a restic repository, with one snapshot time per day
(2026-01-01, 2026-01-02, ...) so retention rules see a real history.

Then two cases, each on a fresh copy (cp -a) of the repositories, per repeat:
- by id: forget the middle snapshot (#15 of 30) and prune. dedupimg as `forget ID` then `prune` (reported
  separately and summed) and as `forget ID --prune` (one command, one lock); restic as
  `restic forget ID --prune` (0.14 defaults: --max-unused 5%).
- by policy: `forget --keep-last 29 --prune` for both (forgets the oldest snapshot, which shares most data).
Each command is measured by measure.run_measured (wall, CPU, peak RSS). Repository size is the sum of the
files' sizes before and after. After each dedupimg prune (first repeat) the snapshot list is checked and
the snapshots next to the forgotten one and the newest are restored and compared by blake3 with the images.

Prints a Markdown table (medians when --repeat > 1) and writes it to benchmarks/results/prune.md; exits 1
if any command failed or a restore was not bit-exact (the report is written first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from measure import MB, Measurement, copy_sparse, file_hash, run_checked, run_measured, tree_bytes
from report import cpu_model, ram_bytes
from series import MiB, vm_age, vm_create
from tools import Dedupimg, Restic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIRST_DAY = datetime(2026, 1, 1, tzinfo=UTC)
RESTIC_TIME = "%Y-%m-%d %H:%M:%S"  # restic backup --time format (local time: TZ=UTC is set)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def snapshot_time(version: int) -> datetime:
    return FIRST_DAY + timedelta(days=version - 1)


# ---------------------------------------------------------------------------------------------------------- tools


class DedupimgRepo(Dedupimg):
    def cmd(self, *args: str, repo: Path | None = None) -> list[str]:
        return [self.binary, "-r", str(repo or self.repo), *args]

    def has_check(self) -> bool:
        return subprocess.run([self.binary, "check", "--help"], capture_output=True).returncode == 0

    def snapshot_ids(self, repo: Path | None = None) -> list[str]:
        """Snapshot ids, oldest first."""
        snaps = json.loads(run_checked(self.cmd("snapshots", "--json", repo=repo)))
        return [s["id"] for s in sorted(snaps, key=lambda s: s["time"])]


class ResticRepo(Restic):
    def env(self) -> dict[str, str]:
        return {**super().env(), "TZ": "UTC"}

    def env_for(self, home: Path) -> dict[str, str]:
        """The environment for a copy of this tool's home (its own cache next to the copied repository)."""
        return {**self.env(), "RESTIC_CACHE_DIR": str(home / "cache")}

    def cmd(self, *args: str, repo: Path | None = None) -> list[str]:
        return ["restic", "--repo", str(repo or self.repo), *args]

    def snapshot_ids(self, home: Path | None = None) -> list[str]:
        home = home or self.home
        out = run_checked(self.cmd("snapshots", "--json", repo=home / "repo"), env=self.env_for(home))
        return [s["id"] for s in sorted(json.loads(out), key=lambda s: s["time"])]


# ---------------------------------------------------------------------------------------------------------- setup


@dataclass
class History:
    size: int
    versions: int
    dedupimg_ids: list[str]  # index v-1 is version v
    restic_ids: list[str]
    hashes: dict[int, str]  # blake3 of the kept images, by version
    dedupimg_source: str

    def image(self, work: Path, version: int) -> Path:
        return work / "images" / f"v{version:02d}.img"


def kept_versions(versions: int) -> list[int]:
    """The versions whose images are kept to check restores: next to the forgotten ones, and the newest."""
    middle = versions // 2
    return sorted({v for v in (2, middle - 1, middle + 1, versions) if 1 <= v <= versions})


def build_history(work: Path, size: int, versions: int, dedupimg: DedupimgRepo, restic: ResticRepo) -> History:
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    for tool in (dedupimg, restic):
        tool.init()
    live = images / "vm.img"
    log(f"creating a {size / MiB:.0f} MiB VM-like image")
    vm_create(live, size)
    keep = kept_versions(versions)
    hashes: dict[int, str] = {}
    for v in range(1, versions + 1):
        started = time.monotonic()
        if v > 1:
            vm_age(live, v)
        aged = time.monotonic()
        when = snapshot_time(v)
        run_checked(dedupimg.cmd("snapshot", live.name, "--name", "vm", "--time", when.isoformat()), cwd=images)
        backed_d = time.monotonic()
        run_checked(restic.cmd("backup", "--host", "bench", "--time", when.strftime(RESTIC_TIME), live.name),
                    cwd=images, env=restic.env())
        backed_r = time.monotonic()
        if v in keep:
            copy_sparse(live, images / f"v{v:02d}.img")
            hashes[v] = file_hash(live)
        log(f"  v{v:02d} {when:%Y-%m-%d}: age {aged - started:5.1f} s, dedupimg snapshot {backed_d - aged:5.1f} s, "
            f"restic backup {backed_r - backed_d:5.1f} s; repos {tree_bytes(dedupimg.repo)[0] / MB:7.1f} MB / "
            f"{tree_bytes(restic.repo)[0] / MB:7.1f} MB")
    live.unlink()
    history = History(size, versions, dedupimg.snapshot_ids(), restic.snapshot_ids(), hashes,
                      dedupimg.version())
    for tool, ids in (("dedupimg", history.dedupimg_ids), ("restic", history.restic_ids)):
        if len(ids) != versions:
            raise RuntimeError(f"{tool} lists {len(ids)} snapshots after {versions} backups")
    (work / "history.json").write_text(json.dumps(history.__dict__, indent=2) + "\n")
    return history


def load_history(work: Path, size: int, versions: int) -> History | None:
    try:
        doc = json.loads((work / "history.json").read_text())
    except (OSError, ValueError):
        return None
    doc["hashes"] = {int(k): v for k, v in doc["hashes"].items()}
    history = History(**doc)
    if history.size != size or history.versions != versions:
        return None
    if not all(history.image(work, v).exists() for v in history.hashes):
        return None
    return history


# ---------------------------------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One measured command (or a sum of them) with the repository size before and after."""

    wall_s: float
    cpu_s: float
    peak_rss: int
    before: int
    after: int
    ok: bool = True


@dataclass
class Row:
    case: str
    tool: str
    label: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)


@dataclass
class Case:
    key: str
    title: str
    forgotten: int  # the version the case forgets
    dedupimg_args: list[str]
    restic_args: list[str]
    notes: list[str] = field(default_factory=list)  # what the tools printed about the prune (first repeat)


class Bench:
    def __init__(self, work: Path, history: History, dedupimg: DedupimgRepo, restic: ResticRepo) -> None:
        self.work = work
        self.history = history
        self.dedupimg = dedupimg
        self.restic = restic
        self.rows: dict[tuple[str, str], Row] = {}
        self.problems: list[str] = []
        self.has_check = dedupimg.has_check()
        self.checks = 0  # dedupimg check runs that passed

    def check(self, repo: Path, what: str) -> None:
        """`dedupimg check` (structure), if this dedupimg has it; it must exit 0."""
        if not self.has_check:
            return
        cmd = self.dedupimg.cmd("check", repo=repo)
        m = run_measured(cmd, cwd=self.work)
        log(f"    dedupimg check {what}: {m.wall_s:.1f} s, {'ok' if m.ok else f'FAILED (exit {m.exit_code})'}")
        if m.ok:
            self.checks += 1
        else:
            output = (m.stdout.strip()[-2000:] + "\n" + m.stderr.strip()[-2000:]).strip()
            self.problems.append(f"{what}: `{' '.join(cmd)}` exited {m.exit_code}:\n\n```\n{output}\n```")

    def row(self, case: Case, label: str, tool: str) -> Row:
        return self.rows.setdefault((case.key, label), Row(case.title, tool, label))

    def fresh_copy(self, home: Path, name: str) -> Path:
        """A copy of a tool's home (repository, and restic's cache) to run one destructive command on."""
        copy = self.work / "run" / name
        shutil.rmtree(copy, ignore_errors=True)
        copy.parent.mkdir(parents=True, exist_ok=True)
        need = tree_bytes(home)[1]
        free = shutil.disk_usage(copy.parent).free
        if free < need + 2 * 10**9:
            raise RuntimeError(f"not enough space to copy {home} ({need / 1e9:.1f} GB, {free / 1e9:.1f} GB free)")
        run_checked(["cp", "-a", "--reflink=auto", str(home), str(copy)])
        return copy

    def measured(self, cmd: list[str], env: dict[str, str] | None = None) -> Measurement:
        m = run_measured(cmd, cwd=self.work, env=env)
        status = "ok" if m.ok else f"FAILED (exit {m.exit_code})"
        log(f"    {cmd[0].rsplit('/', 1)[-1]} {' '.join(cmd[3:])}: {m.wall_s:.2f} s wall, {m.cpu_s:.2f} s CPU,"
            f" {m.peak_rss / MB:.0f} MB peak RSS  {status}")
        if not m.ok:
            self.problems.append(f"`{' '.join(cmd)}` exited {m.exit_code}:\n\n```\n{m.stderr.strip()[-3000:]}\n```")
        return m

    # -- dedupimg

    def dedupimg_split(self, case: Case, verify: bool) -> None:
        home = self.fresh_copy(self.dedupimg.home, "dedupimg")
        repo = home / "repo"
        before = tree_bytes(repo)[0]
        f = self.measured(self.dedupimg.cmd("forget", *case.dedupimg_args, repo=repo))
        middle = tree_bytes(repo)[0]
        p = self.measured(self.dedupimg.cmd("prune", repo=repo)) if f.ok else None
        after = tree_bytes(repo)[0]
        self.row(case, "dedupimg forget", "dedupimg").runs.append(run_of(f, before, middle))
        if p is not None:
            self.row(case, "dedupimg prune", "dedupimg").runs.append(run_of(p, middle, after))
            both = Run(f.wall_s + p.wall_s, f.cpu_s + p.cpu_s, max(f.peak_rss, p.peak_rss), before, after,
                       f.ok and p.ok)
            self.row(case, "dedupimg forget, then prune (sum)", "dedupimg").runs.append(both)
            if verify and p.ok:
                case.notes.append(f"dedupimg prune: {last_line(p.stdout)}")
                self.verify(case, repo, "forget, then prune")
        shutil.rmtree(home)

    def dedupimg_one(self, case: Case, verify: bool) -> None:
        home = self.fresh_copy(self.dedupimg.home, "dedupimg")
        repo = home / "repo"
        before = tree_bytes(repo)[0]
        m = self.measured(self.dedupimg.cmd("forget", *case.dedupimg_args, "--prune", repo=repo))
        after = tree_bytes(repo)[0]
        self.row(case, "dedupimg forget --prune (one command)", "dedupimg").runs.append(run_of(m, before, after))
        if verify and m.ok:
            self.verify(case, repo, "forget --prune")
        shutil.rmtree(home)

    def verify(self, case: Case, repo: Path, how: str) -> None:
        """The forgotten snapshot is gone, the others listed; kept images restore bit-exact."""
        h = self.history
        expected = [i for v, i in enumerate(h.dedupimg_ids, start=1) if v != case.forgotten]
        self.check(repo, f"after dedupimg {how} ({case.title})")
        listed = self.dedupimg.snapshot_ids(repo)
        if listed != expected:
            self.problems.append(f"{case.title}, dedupimg {how}: snapshot list after it is not the {h.versions} "
                                 f"minus #{case.forgotten} (listed {len(listed)})")
        out = self.work / "restored.img"
        for v in sorted(set(h.hashes) - {case.forgotten}):
            out.unlink(missing_ok=True)
            cmd = self.dedupimg.cmd("restore", h.dedupimg_ids[v - 1], str(out), repo=repo)
            m = run_measured(cmd, cwd=self.work)
            if not m.ok:
                status = f"FAILED (exit {m.exit_code})"
                self.problems.append(f"{case.title}, after dedupimg {how}: `{' '.join(cmd)}` exited {m.exit_code}:"
                                     f"\n\n```\n{m.stderr.strip()[-3000:]}\n```")
            elif file_hash(out) != h.hashes[v]:
                status = "DIFFERS from the image"
                self.problems.append(f"{case.title}, after dedupimg {how}: restore of #{v} differs from the image")
            else:
                status = "bit-exact"
            log(f"    restore #{v} after {how}: {m.wall_s:.1f} s, {status}")
        out.unlink(missing_ok=True)

    # -- restic

    def restic_prune(self, case: Case, verify: bool) -> None:
        home = self.fresh_copy(self.restic.home, "restic")
        repo = home / "repo"
        before = tree_bytes(repo)[0]
        m = self.measured(self.restic.cmd("forget", *case.restic_args, "--prune", repo=repo), self.restic.env_for(home))
        after = tree_bytes(repo)[0]
        self.row(case, "restic forget --prune", "restic").runs.append(run_of(m, before, after))
        if verify and m.ok:
            keys = ("to repack", "this removes", "to delete", "total prune", "remaining:", "unused size")
            wanted = [line.strip() for line in m.stdout.splitlines() if line.strip().startswith(keys)]
            case.notes.append("restic prune: " + "; ".join(" ".join(w.split()) for w in wanted))
            listed = self.restic.snapshot_ids(home)
            expected = [i for v, i in enumerate(self.history.restic_ids, start=1) if v != case.forgotten]
            if listed != expected:
                self.problems.append(f"{case.title}, restic: snapshot list after prune is not the expected one")
        shutil.rmtree(home)


def run_of(m: Measurement, before: int, after: int) -> Run:
    return Run(m.wall_s, m.cpu_s, m.peak_rss, before, after, m.ok)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# ---------------------------------------------------------------------------------------------------------- report


def mb_delta(nbytes: float) -> str:
    text = f"{nbytes / MB:,.1f}"
    return "0.0" if text in ("-0.0", "0.0") else text

RSS_TARGET = 300 * MB
SPEED_TARGET = 5.0


def render(bench: Bench, cases: list[Case], args: argparse.Namespace, info: dict[str, str]) -> str:
    h = bench.history
    lines = [
        "# Forget + prune: dedupimg vs restic",
        "",
        f"- date: {info['date']}; machine: {os.cpu_count()} CPUs ({cpu_model()}), "
        f"{ram_bytes() / (1 << 30):.1f} GiB RAM, Linux {platform.release()}",
        f"- tools: {info['dedupimg']}; {info['restic']}",
        f"- history: VM-like image of {h.size / MiB:.0f} MiB ({h.size / MB:.1f} MB logical), {h.versions} versions "
        f"(each: 1% of 4 KiB blocks rewritten, scattered, plus one {min(64 * MiB, h.size // 2) / MiB:.0f} MiB "
        "region), one snapshot per day in each "
        f"tool; every case runs on a fresh copy of the repositories",
        f"- {args.repeat} repeat(s){', medians' if args.repeat > 1 else ''}; MB = 10^6 bytes; repo size = sum of "
        "file sizes (restic's cache not counted); ratio = restic wall / row wall",
        "",
        "| case | tool / command | wall s | CPU s | peak RSS MB | repo MB before | repo MB after | freed MB "
        "| restic wall / wall |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for case in cases:
        title = case.title
        restic = bench.rows.get((case.key, "restic forget --prune"))
        restic_wall = restic.median("wall_s") if restic and restic.ok else None
        for (key, _), row in bench.rows.items():
            if key != case.key:
                continue
            if not row.runs:
                continue
            wall = row.median("wall_s")
            before, after = row.median("before"), row.median("after")
            ratio = f"{restic_wall / wall:.1f}x" if restic_wall and wall > 0 and row.tool == "dedupimg" else "—"
            failed = "" if row.ok else " **FAILED**"
            lines.append(
                f"| {title} | {row.label}{failed} | {wall:.2f} | {row.median('cpu_s'):.2f} | "
                f"{row.median('peak_rss') / MB:.0f} | {before / MB:,.1f} | {after / MB:,.1f} | "
                f"{mb_delta(before - after)} | {ratio} |"
            )
            title = ""  # the case is named on its first row only
        one = bench.rows.get((case.key, "dedupimg forget --prune (one command)"))
        if one and one.ok and restic_wall:
            speed = restic_wall / one.median("wall_s")
            rss = max(r.peak_rss for r in one.runs)
            split = [bench.rows.get((case.key, k)) for k in ("dedupimg forget", "dedupimg prune")]
            rss = max([rss, *(max(r.peak_rss for r in s.runs) for s in split if s and s.runs)])
            verdicts.append(
                f"- {case.title}: `forget --prune` {speed:.1f}x restic's wall time "
                f"({'meets' if speed >= SPEED_TARGET else 'MISSES'} the {SPEED_TARGET:.0f}x target); "
                f"dedupimg peak RSS {rss / MB:.0f} MB ({'under' if rss < RSS_TARGET else 'NOT under'} 300 MB)"
            )
    lines += ["", "Targets (issue 6, item 6: at least 5x faster than restic, peak RSS under 300 MB):", "", *verdicts]
    lines += ["", "Commands:", ""]
    for case in cases:
        lines.append(f"- {case.title}: `dedupimg -r R forget {' '.join(case.dedupimg_args)}` then "
                     f"`dedupimg -r R prune`; `dedupimg -r R forget {' '.join(case.dedupimg_args)} --prune`; "
                     f"`restic -r R forget {' '.join(case.restic_args)} --prune`")
    notes = [f"- {case.title}: {note}" for case in cases for note in case.notes]
    if notes:
        lines += ["", "What the prunes reported (first repeat):", "", *notes]
    lines += ["", f"For scale: {info['floor']}."]
    checked = ", ".join(f"#{v}" for v in sorted(h.hashes))
    check = (f"`dedupimg check` exited 0 on the repository before any forget and after every dedupimg prune "
             f"({bench.checks} runs)" if bench.has_check and not bench.problems else
             "`dedupimg check` was run on the repository before any forget and after every dedupimg prune"
             if bench.has_check else "`dedupimg check` does not exist in this version")
    lines += ["", f"Correctness (first repeat): after each dedupimg prune the snapshot list is the {h.versions} minus "
              f"the forgotten one, and snapshots {checked} (except the forgotten one) restore bit-exact (blake3 "
              f"against the images; restore also verifies every chunk and the image hash). {check}. restic's "
              "snapshot list is checked the same way."]
    if bench.problems:
        lines += ["", "## Problems", "", *(f"- {p}" for p in bench.problems)]
    else:
        lines += ["", "No command failed and every restore was bit-exact."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--versions", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "prune")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where prune.md goes")
    ap.add_argument("--keep", action="store_true", help="keep the images and repositories in --work afterwards")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the history a run with --keep left in --work (same size and versions)")
    args = ap.parse_args(argv)
    if args.versions < 3 or args.repeat < 1:
        ap.error("--versions must be at least 3 and --repeat at least 1")
    started = time.monotonic()
    work = args.work.resolve()
    size = args.size_mib * MiB
    dedupimg = DedupimgRepo(work / "dedupimg", ROOT / ".venv" / "bin" / "dedupimg")
    restic = ResticRepo(work / "restic")
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "dedupimg": dedupimg.version(),
        "restic": restic.version(),
    }
    history = load_history(work, size, args.versions) if args.reuse else None
    if history is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log(f"building the history: {args.size_mib} MiB x {args.versions} versions in {work}")
        history = build_history(work, size, args.versions, dedupimg, restic)
    else:
        log(f"reusing the history in {work} (made with {history.dedupimg_source})")
    shutil.rmtree(work / "run", ignore_errors=True)

    middle = args.versions // 2
    d_id, r_id = history.dedupimg_ids[middle - 1], history.restic_ids[middle - 1]
    keep = str(args.versions - 1)
    cases = [
        Case("id", f"forget 1 of {args.versions} by id (#{middle}) + prune", middle, [d_id], [r_id]),
        Case("policy", f"forget oldest by policy (--keep-last {keep}) + prune", 1, ["--keep-last", keep],
             ["--keep-last", keep]),
    ]
    bench = Bench(work, history, dedupimg, restic)
    bench.check(dedupimg.repo, "the repository before any forget")
    floor = run_measured(dedupimg.cmd("snapshots"), cwd=work)
    info["floor"] = (f"`dedupimg -r R snapshots` (interpreter start, repository open, list) takes {floor.wall_s:.2f} s "
                     f"wall, {floor.cpu_s:.2f} s CPU, {floor.peak_rss / MB:.0f} MB peak RSS on this repository")
    log(info["floor"])
    for rep in range(args.repeat):
        for case in cases:
            log(f"repeat {rep + 1}/{args.repeat}: {case.title}")
            bench.dedupimg_split(case, verify=rep == 0)
            bench.dedupimg_one(case, verify=rep == 0)
            bench.restic_prune(case, verify=rep == 0)

    after = dedupimg.version()
    if after != info["dedupimg"]:
        bench.problems.append(f"dedupimg's source changed during the run ({info['dedupimg']} -> {after})")
    report = render(bench, cases, args, info)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "prune.md").write_text(report)
    print(report)
    shutil.rmtree(work / "run", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min; report in {args.results / 'prune.md'}")
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
