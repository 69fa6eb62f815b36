"""Compare dedupimg's numbers between two builds, each benchmarked several times (medians), e.g. before and
after a refactor that must not change speed or size:

    python benchmarks/bench.py --tools dedupimg --dedupimg OLD_VENV/bin/dedupimg --results /tmp/old1   # x3,
    python benchmarks/bench.py --tools dedupimg --results /tmp/new1                                     # interleaved
    python benchmarks/compare_runs.py --before /tmp/old1 /tmp/old2 /tmp/old3 --after /tmp/new1 /tmp/new2 /tmp/new3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(dirs: list[Path]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for d in dirs:
        doc = json.loads((d / "latest.json").read_text())
        for s in doc["series"]:
            t = s["tools"]["dedupimg"]
            for b in t["backups"]:
                out.setdefault((s["name"], f"snapshot v{b['version']} s"), []).append(b["wall_s"])
                out.setdefault((s["name"], f"snapshot v{b['version']} cpu s"), []).append(b["cpu_s"])
                out.setdefault((s["name"], f"repo after v{b['version']} MB"), []).append(b["repo_bytes"] / 1e6)
            for r in t["restores"]:
                out.setdefault((s["name"], f"restore v{r['version']} s"), []).append(r["wall_s"])
            out.setdefault((s["name"], "delta restore s"), []).append(t["delta_restore"]["wall_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, nargs="+", required=True)
    ap.add_argument("--after", type=Path, nargs="+", required=True)
    args = ap.parse_args()
    before, after = load(args.before), load(args.after)
    print(f"| series | metric | before (median of {len(args.before)}) | after (median of {len(args.after)}) "
          "| after/before |")
    print("|---|---|---:|---:|---:|")
    for key, values in before.items():
        a, b = statistics.median(values), statistics.median(after[key])
        print(f"| {key[0]} | {key[1]} | {a:.3f} | {b:.3f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
