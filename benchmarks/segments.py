"""Choose the manifest segment size from data: what each later version stores, by segment cut mask.

    .venv/bin/python benchmarks/segments.py SERIES_DIR [SERIES_DIR...] [--masks 0x3ff,0xff,0x7f,0x3f]

Each SERIES_DIR holds v1.img, v2.img, v3.img (benchmarks/run.sh leaves them in benchmarks/work/*/series/).
A snapshot's manifest is cut into content-defined segments (a segment ends after a chunk whose id matches the
mask: about 1 in mask+1 chunks); a later version stores every segment that holds a changed chunk again, in a
pack and as the index's copy. Smaller segments store less of the manifest again when changes are few or
clustered, and cost more index rows, record bytes and LMDB page slack when changes are everywhere. For every
mask a fresh unencrypted repository takes the three versions in order (in-process); the table gives the
repository growth per later version (every file, index included, as run.sh counts it) and its parts: chunk
blobs and segment blobs in packs (with their headers); the rest is the index, records and pack trailers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dedupimg.core.config import SegmentParams  # noqa: E402
from dedupimg.ops.snapshot import take_snapshot  # noqa: E402
from dedupimg.repo import pack  # noqa: E402
from dedupimg.repo.repository import Repository  # noqa: E402


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def pack_bytes_by_type(repo: Repository) -> dict[int, int]:
    out: dict[int, int] = {}
    for obj in pack.list_packs(repo.store):
        with repo.store.open(obj.name) as reader:
            for entry in pack.read_trailer(reader, repo.blobs):
                out[entry.type] = out.get(entry.type, 0) + pack.blob_span(entry.stored_len)
    return out


def measure(series: Path, mask: int, work: Path) -> dict[str, list[float]]:
    root = work / f"repo-{series.name}-{mask:x}"
    shutil.rmtree(root, ignore_errors=True)
    sizes, by_type, cpu = [], [], []
    with Repository.init(root) as repo:
        # The config is what cuts segments: this repository's alone, as `init` would write it.
        repo.config = replace(repo.config, segments=replace(SegmentParams(), cut_mask=mask))
        for v in (1, 2, 3):
            t = time.process_time()
            take_snapshot(repo, str(series / f"v{v}.img"), name="s",
                          when=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=v))
            cpu.append(time.process_time() - t)
            sizes.append(tree_bytes(root))
            by_type.append(pack_bytes_by_type(repo))
        index = tree_bytes(root / "index")
    shutil.rmtree(root)

    def growth(kind: int) -> list[float]:
        return [(by_type[i].get(kind, 0) - by_type[i - 1].get(kind, 0)) / 1e6 for i in (1, 2)]

    return {"v1": [sizes[0] / 1e6], "growth": [(b - a) / 1e6 for a, b in zip(sizes, sizes[1:], strict=False)],
            "chunks": growth(pack.CHUNK), "segments": growth(pack.SEGMENT), "index": [index / 1e6], "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", nargs="+", type=Path)
    parser.add_argument("--masks", default="0x3ff,0xff,0x7f,0x3f", help="segment cut masks, comma separated")
    parser.add_argument("--work", type=Path, default=None, help="where the repositories go (default: a temp dir)")
    args = parser.parse_args()
    masks = [int(m, 0) for m in args.masks.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="dedupimg-segments-"))
    print("MB; growth = the repository's bytes (index included) added by v2 / v3\n")
    print("| series | mask (chunks per segment) | repo after v1 | growth v2 / v3 | chunk blobs | segment blobs "
          "| index after v3 | snapshot CPU s v1 / v2 / v3 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for series in args.series:
        for mask in masks:
            m = measure(series, mask, work)
            pair = " / ".join
            print(f"| {series.name} | {mask:#x} ({mask + 1}) | {m['v1'][0]:,.1f} "
                  f"| {pair(f'{x:.2f}' for x in m['growth'])} | {pair(f'{x:.2f}' for x in m['chunks'])} "
                  f"| {pair(f'{x:.2f}' for x in m['segments'])} | {m['index'][0]:.1f} "
                  f"| {pair(f'{x:.1f}' for x in m['cpu'])} |", flush=True)


if __name__ == "__main__":
    main()
