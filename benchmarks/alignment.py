"""Chunk size and 4 KiB-aligned cut points against scattered small writes (issue 15, lever 4), measured.

    .venv/bin/python benchmarks/alignment.py SERIES_DIR [--sizes 8192,16384] [--align 4096]

SERIES_DIR holds v1.img, v2.img, v3.img (benchmarks/run.sh leaves them in benchmarks/work/*/series/). Disks
are written in 4 KiB blocks, so a scattered 4 KiB write dirties the ~20 KiB chunk around it, and, where cut
points fall inside blocks, sometimes the next chunk too. For each average chunk size this cuts every version
two ways and counts what a repository would store for versions 2 and 3 (chunks whose blake3 it has not seen;
all-zero chunks are never stored):

- ``fastcdc``: dedupimg's chunker (FastCDC through pyfastcdc, the repository's parameters) over the image;
- ``aligned``: the same FastCDC cut from each chunk's start, then moved forward to the next multiple of
  ``--align`` in the image, where the next chunk starts (so a cut never splits a block).

The aligned walk is a Python loop (one FastCDC call per chunk): only its dedup is measured, not its speed.
Images are read whole (holes as zeros), as one stream: dedupimg cuts each data region on its own, so the
absolute numbers differ a little from a repository's; the comparison between the ways is the point.
"""

from __future__ import annotations

import argparse
import mmap
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import zstandard
from pyfastcdc import FastCDC

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dedupimg.core.config import ChunkerParams  # noqa: E402

ZEROS = bytes(1 << 20)


def fastcdc(params: ChunkerParams) -> FastCDC:
    return FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size,
                   normalized_chunking=params.normalized_chunking)  # type: ignore[arg-type]


def plain_cuts(cdc: FastCDC, data: memoryview) -> Iterator[tuple[int, int]]:
    for c in cdc.cut_buf(data):
        yield c.offset, c.offset + c.length


def aligned_cuts(cdc: FastCDC, data: memoryview, max_size: int, align: int) -> Iterator[tuple[int, int]]:
    pos, n = 0, len(data)
    while pos < n:
        first = next(iter(cdc.cut_buf(data[pos : pos + max_size])))
        end = pos + first.length
        if end < n:
            end = min(n, -(-end // align) * align)
        yield pos, end
        pos = end


def stored(cuts: Iterator[tuple[int, int]], data: memoryview, seen: set[bytes],
           zstd: zstandard.ZstdCompressor) -> tuple[int, int, int]:
    """(raw bytes new, zstd-1 bytes new, chunks) of one version, adding its chunk ids to ``seen``."""
    raw = packed = chunks = 0
    for s, e in cuts:
        chunks += 1
        piece = data[s:e]
        if piece == ZEROS[: e - s]:
            continue
        id_ = blake3.blake3(piece).digest()
        if id_ in seen:
            continue
        seen.add(id_)
        raw += e - s
        packed += len(zstd.compress(piece))
    return raw, packed, chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("series", type=Path, nargs="+")
    ap.add_argument("--sizes", default="8192,16384")
    ap.add_argument("--align", type=int, default=4096)
    args = ap.parse_args()
    zstd = zstandard.ZstdCompressor(level=1)
    print("| series | avg chunk | cut points | chunks in v1 | stored v2 / v3 MB (raw) | stored v2 / v3 MB (zstd 1) "
          "| seconds |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for series in args.series:
        for avg in (int(x) for x in args.sizes.split(",")):
            params = ChunkerParams.for_average(avg)
            for way in ("fastcdc", "aligned"):
                started = time.monotonic()
                cdc = fastcdc(params)
                seen: set[bytes] = set()
                rows = []
                for v in (1, 2, 3):
                    with open(series / f"v{v}.img", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                        data = memoryview(m)
                        cuts = plain_cuts(cdc, data) if way == "fastcdc" else \
                            aligned_cuts(cdc, data, params.max_size, args.align)
                        rows.append(stored(cuts, data, seen, zstd))
                        data.release()
                (_, _, n1), (r2, p2, _), (r3, p3, _) = rows
                print(f"| {series.name} | {avg >> 10} KiB | {way} | {n1:,} | {r2 / 1e6:.1f} / {r3 / 1e6:.1f} "
                      f"| {p2 / 1e6:.1f} / {p3 / 1e6:.1f} | {time.monotonic() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
