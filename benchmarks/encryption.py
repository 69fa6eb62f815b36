"""Encrypted against unencrypted dedupimg, side by side in one run (issue 14, "Speed").

    .venv/bin/python benchmarks/encryption.py [--image-size 1G] [--repeat 3] [--keep]

Kinds, interleaved in every round (fresh repositories each round, each round starting with the next kind), on
local directory repositories:
- ``none``: ``init --encryption none`` (format 1);
- ``aes-256-gcm`` and ``chacha20-poly1305``: encrypted (format 2), blob spans padded to 64 B (the default);
- ``aes-256-gcm, no padding``: ``--padding 1``, to show what the padding costs in repository size.
Per kind: snapshot of v1 and v2 of the vm series (benchmarks/series.py), restore of v2 (checked bit-exact), and
a sequential read of v2 through ``dedupimg mount``. Every command of an encrypted repository derives its key
with argon2id first (0.14-0.45 s with the defaults: t=6, 64 MiB, p=2): the report gives that time on its own,
and each operation's rate with and without it. As root the page cache is dropped before each timed operation;
each restore starts after ``--settle`` seconds (default 10) without writes.
Prints Markdown tables (medians; MB = 10^6 bytes of the image's logical size per wall second) and writes them
to benchmarks/results/encryption.md. Exits 1 if any operation failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from argon2.low_level import Type, hash_secret_raw
from measure import MB, file_hash, tree_bytes
from report import cpu_model, disk_write_mbps
from s3 import Results, Sample, drop_caches, log, mount_read, parse_size, snapshot_versions, unmount, vm_series
from series import MiB, Series
from tools import Dedupimg, Tool, source_fingerprint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from dedupimg.core import crypto  # noqa: E402

KINDS = {  # label -> init options
    "none": ["--encryption", "none"],
    "aes-256-gcm": ["--encryption", "aes-256-gcm"],
    "chacha20-poly1305": ["--encryption", "chacha20-poly1305"],
    "aes-256-gcm, no padding": ["--encryption", "aes-256-gcm", "--padding", "1"],
}
SNAP1, SNAP2, RESTORE, MOUNT = "snapshot v1", "snapshot v2", "restore v2", "mount read v2"
OPS = [SNAP1, SNAP2, RESTORE, MOUNT]
TIMED_KINDS = ["none", "aes-256-gcm", "chacha20-poly1305"]  # the padding variant only adds a size


class Kind(Dedupimg):
    def __init__(self, home: Path, binary: Path, options: list[str]) -> None:
        super().__init__(home, binary)
        self.options = options

    def init_cmd(self) -> list[str]:
        return [*super().init_cmd(), *self.options]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPIMG_")}
        return {**env, "DEDUPIMG_PASSWORD": "benchmark password"}  # argon2id with its defaults


def kdf_seconds() -> float:
    """What opening an encrypted repository costs before any work: argon2id with the default parameters."""
    p = crypto.KdfParams()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        hash_secret_raw(b"benchmark password", b"s" * 16, p.time_cost, p.memory_kib, p.parallelism, 32, Type.ID)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def one_round(rep: int, series: Series, work: Path, binary: Path, results: Results, settle: float) -> None:
    # Each round starts with another kind: the command that runs right after another one's writes (and the
    # page cache drop) was measured slower here whatever it was, so no kind may always come first.
    labels = list(KINDS)
    labels = labels[rep % len(labels):] + labels[:rep % len(labels)]
    tools: dict[str, Tool] = {label: Kind(work / "repos" / label.replace(" ", "").replace(",", "-"), binary,
                                          KINDS[label]) for label in labels}
    for tool in tools.values():
        tool.init()
    image = work / "live" / "vm.img"
    ids = snapshot_versions(tools, series, image, results, lambda tool: tree_bytes(tool.repo)[0])
    # Every restore of the round writes its own target, and all are removed after the round (this disk is mounted
    # with online discard); and each restore starts after ``settle`` seconds of quiet: a restore right after
    # another one's 1.5 GB of writes ran up to 35% slower, whatever its kind (21:28-21:42 UTC: unencrypted 2.9-3.3 s
    # first in a round, 3.8-4.3 s after another restore), as if the host were still flushing the previous one.
    restores = work / "restore"
    for label in [k for k in labels if k in TIMED_KINDS]:
        tool = tools[label]
        assert isinstance(tool, Dedupimg)
        if ids[label] is None:
            continue
        out = restores / label
        drop_caches()
        time.sleep(settle)
        m, restored = tool.restore(str(ids[label]), image, out)
        note = m.error_line() if not m.ok else ""
        if m.ok and (not restored.is_file() or file_hash(restored) != series.versions[1].blake3):
            note = "restored bytes differ from the source"
        results.add(label, RESTORE, Sample(m.wall_s, series.versions[1].size, m.peak_rss, not note, note))
        results.add(label, MOUNT, mount_read(tool, series, work))
    os.system(f"rm -rf {shlex.quote(str(restores))}")


def render(args: argparse.Namespace, r: Results, series: Series, kdf: float, info: dict[str, str]) -> str:
    v1, v2 = series.versions[:2]
    lines = [
        "# dedupimg: encrypted against unencrypted repositories",
        "",
        f"- date: {info['date']}; command: `{info['command']}`",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}); local disk sequential write {info['disk']} MB/s; "
        f"load average at start {info['load']}",
        f"- dedupimg (source {info['source']}); image: vm series, v1 {v1.size / MB:.0f} MB logical, v2 "
        f"{v2.size / MB:.0f} MB; {args.repeat} repeat(s), medians; page cache dropped before each timed operation; "
        f"each restore after {args.settle:g} s without writes",
        f"- every command of an encrypted repository first derives its key: argon2id (t=6, 64 MiB, p=2) took "
        f"**{kdf:.2f} s** here; 'without KDF' subtracts it from each encrypted operation's wall time",
        "",
        "| operation, MB/s | " + " | ".join(TIMED_KINDS) + " | AES / none | AES / none without KDF | "
        "ChaCha / none |",
        "|---|" + "---:|" * (len(TIMED_KINDS) + 3),
    ]
    for op in OPS:
        rates = {k: r.mbps(k, op) for k in TIMED_KINDS}
        secs = {k: statistics.median([s.seconds for s in r.samples.get((k, op), []) if s.ok] or [0]) for k in
                TIMED_KINDS}
        size = v1.size if op == SNAP1 else v2.size

        def ratio(a: float | None, b: float | None) -> str:
            return f"{100 * a / b:.0f}%" if a and b else "–"

        no_kdf = size / MB / (secs["aes-256-gcm"] - kdf) if secs["aes-256-gcm"] > kdf else None
        cells = [f"{rates[k]:.0f}" if rates[k] else "–" for k in TIMED_KINDS]
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {ratio(rates['aes-256-gcm'], rates['none'])} | "
                     f"{ratio(no_kdf, rates['none'])} | {ratio(rates['chacha20-poly1305'], rates['none'])} |")
    lines += ["", "| repository size, MB | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
    for version in (1, 2):
        cells = []
        for label in KINDS:
            got = r.repo_bytes.get((label, version))
            cells.append(f"{statistics.median(got) / MB:.1f}" if got else "–")
        lines.append(f"| after v{version} | " + " | ".join(cells) + " |")
    pad, nopad = r.repo_bytes.get(("aes-256-gcm", 2)), r.repo_bytes.get(("aes-256-gcm, no padding", 2))
    plain = r.repo_bytes.get(("none", 2))
    if pad and nopad and plain:
        padded, unpadded, unencrypted = (statistics.median(x) for x in (pad, nopad, plain))
        lines += ["", f"Padding blob spans to 64 B costs {100 * (padded / unpadded - 1):.2f}% of the repository; an "
                  f"encrypted repository (padded) is {100 * (padded / unencrypted - 1):+.2f}% against an unencrypted "
                  "one."]
    lines += ["", "| peak RSS, MB | " + " | ".join(TIMED_KINDS) + " |", "|---|" + "---:|" * len(TIMED_KINDS)]
    for op in OPS:
        lines.append(f"| {op} | " + " | ".join(f"{(r.rss(k, op) or 0) / MB:.0f}" for k in TIMED_KINDS) + " |")
    if r.failures:
        lines += ["", "Failures:", *[f"- {f}" for f in r.failures]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=parse_size, default=1 << 30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "encryption")
    ap.add_argument("--dedupimg", type=Path, default=ROOT / ".venv" / "bin" / "dedupimg")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "encryption.md")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="seconds of quiet before each timed restore (the disk's writeback of the last one)")
    args = ap.parse_args(argv)
    if args.image_size < 64 * MiB or args.repeat < 1:
        ap.error("--image-size at least 64M, --repeat at least 1")
    work = args.work.resolve()
    run_dir = work / "run"
    os.system(f"rm -rf {shlex.quote(str(run_dir))}")
    run_dir.mkdir(parents=True)
    series = vm_series(args.image_size, work)
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": shlex.join(["python", *sys.argv]),
            "disk": f"{disk_write_mbps(run_dir):.0f}", "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "source": source_fingerprint()}
    kdf = kdf_seconds()
    log(f"argon2id with the default parameters: {kdf:.2f} s")
    results = Results()
    try:
        for rep in range(1, args.repeat + 1):
            log(f"round {rep} of {args.repeat}")
            one_round(rep, series, run_dir / f"round-{rep}", args.dedupimg, results, args.settle)
    finally:
        for mnt in run_dir.glob("round-*/mnt"):
            unmount(mnt)
        if not args.keep:
            os.system(f"rm -rf {shlex.quote(str(run_dir))}")
    report = render(args, results, series, kdf, info)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report)
    print(report)
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
