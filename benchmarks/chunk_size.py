"""Choose the default chunk size from data: dedup, speed and metadata for each average size.

    .venv/bin/python benchmarks/chunk_size.py SERIES_DIR [SERIES_DIR...] [--sizes 8192,16384,32768,65536]

Each SERIES_DIR holds v1.img, v2.img, v3.img (benchmarks/run.sh leaves them in benchmarks/work/*/series/).
For every average chunk size, a fresh repository takes the three versions in order; the table gives the
repository growth per version, the index (LMDB) size, chunk counts and snapshot throughput (median of
versions 2 and 3, in-process, so CLI start-up does not count).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dedupimg.core.config import ChunkerParams  # noqa: E402
from dedupimg.ops.snapshot import take_snapshot  # noqa: E402
from dedupimg.repo.repository import Repository  # noqa: E402


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(series: Path, avg: int, work: Path) -> dict[str, float]:
    repo_dir = work / f"repo-{series.name}-{avg}"
    shutil.rmtree(repo_dir, ignore_errors=True)
    images = [series / f"v{i}.img" for i in (1, 2, 3)]
    sizes, speeds = [], []
    with Repository.init(repo_dir, ChunkerParams.for_average(avg)) as repo:
        for img in images:
            t = time.perf_counter()
            take_snapshot(repo, str(img))
            speeds.append(img.stat().st_size / (time.perf_counter() - t) / 1e6)
            sizes.append(tree_bytes(repo_dir))
        chunks = repo.stats().chunks
    index = tree_bytes(repo_dir / "index")
    shutil.rmtree(repo_dir)
    return {
        "v1_mb": sizes[0] / 1e6,
        "per_version_mb": (sizes[2] - sizes[0]) / 2 / 1e6,
        "index_mb": index / 1e6,
        "chunks": chunks,
        "v1_mbs": speeds[0],
        "later_mbs": statistics.median(speeds[1:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("series", nargs="+", type=Path)
    ap.add_argument("--sizes", default="8192,16384,32768,65536")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("| series | avg chunk | v1 stored MB | stored per new version MB | index MB | chunks | "
          "v1 MB/s | v2/v3 MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.series[0].parent) as tmp:
        for series in args.series:
            for avg in sizes:
                m = measure(series, avg, Path(tmp))
                print(f"| {series.name} | {avg // 1024} KiB | {m['v1_mb']:.1f} | {m['per_version_mb']:.1f} | "
                      f"{m['index_mb']:.1f} | {m['chunks']:.0f} | {m['v1_mbs']:.0f} | {m['later_mbs']:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
