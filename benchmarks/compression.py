"""Compressed size and CPU of ways to compress an image's chunks: the trade-off behind the tar-series gap.

Usage: .venv/bin/python benchmarks/compression.py IMAGE [IMAGE...] [--stored] [--frames 256K,1M] [--levels 1,3]
                                                      [--no-dictionary]

For each image: cut with dedupimg's default chunker parameters, then compress (one thread, in process)
every chunk on its own at zstd levels 1 and 3 (what dedupimg does: level 1), with a zstd dictionary trained
on a sample of the chunks, and as frames of consecutive chunks (by default 256 KiB and 1 MiB at the levels
given, the way borg's 2 MiB chunks are compressed). ``--stored`` keeps only what a first snapshot stores: each
distinct chunk once, in image order, and no all-zero chunk. Prints a Markdown table of stored MB (a chunk or
frame never stores more than its raw size) and compression CPU seconds.

Issue 15's lever 2 at full scale (docs/performance.md):
    .venv/bin/python benchmarks/compression.py benchmarks/work/full/series/{vm,ext4,tar}/v1.img --stored \
        --frames 1M,2M,4M --levels 3,6 --no-dictionary
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import zstandard
from pyfastcdc.cy import FastCDC

from dedupimg.core.config import ChunkerParams

MB = 1_000_000


def cut(data: bytes, stored: bool = False) -> list[bytes]:
    """The image's chunks in order; ``stored``: each distinct one once and no all-zero chunk, as a first
    snapshot stores them."""
    p = ChunkerParams()
    cdc = FastCDC(avg_size=p.avg_size, min_size=p.min_size, max_size=p.max_size)
    chunks = [data[c.offset : c.offset + c.length] for c in cdc.cut_buf(data)]
    if not stored:
        return chunks
    seen: set[bytes] = set()
    out = []
    for c in chunks:
        if c.count(0) == len(c):
            continue
        h = blake3.blake3(c).digest()
        if h not in seen:
            seen.add(h)
            out.append(c)
    return out


def per_chunk(chunks: list[bytes], level: int, dictionary: zstandard.ZstdCompressionDict | None = None) -> int:
    comp = zstandard.ZstdCompressor(level=level, dict_data=dictionary)
    return sum(min(len(comp.compress(c)), len(c)) for c in chunks)


def framed(chunks: list[bytes], frame: int, level: int) -> int:
    comp = zstandard.ZstdCompressor(level=level)
    total, pending, size = 0, [], 0
    for c in chunks:
        pending.append(c)
        size += len(c)
        if size >= frame:
            joined = b"".join(pending)
            total += min(len(comp.compress(joined)), len(joined))
            pending, size = [], 0
    if pending:
        joined = b"".join(pending)
        total += min(len(comp.compress(joined)), len(joined))
    return total


def trained(chunks: list[bytes], samples: int = 500) -> zstandard.ZstdCompressionDict:
    step = max(1, len(chunks) // samples)
    picked: list[bytes | bytearray | memoryview] = list(chunks[::step][:samples])
    return zstandard.train_dictionary(112 * 1024, picked, level=1, threads=1)


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    started = time.process_time()
    value = fn()
    return value, time.process_time() - started


def size_label(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def rows_for(image: Path, args: argparse.Namespace) -> list[list[str]]:
    data = image.read_bytes()
    chunks = cut(data, args.stored)
    ways: list[tuple[str, Callable[[], int]]] = [
        ("each chunk, zstd 1 (dedupimg)", lambda: per_chunk(chunks, 1)),
        ("each chunk, zstd 3", lambda: per_chunk(chunks, 3)),
    ]
    if not args.no_dictionary:
        dictionary = trained(chunks)
        ways += [
            ("each chunk, zstd 1 + trained dictionary", lambda: per_chunk(chunks, 1, dictionary)),
            ("each chunk, zstd 3 + trained dictionary", lambda: per_chunk(chunks, 3, dictionary)),
        ]
    for frame in args.frames:
        for level in args.levels:
            ways.append((f"{size_label(frame)} frames, zstd {level}",
                         lambda frame=frame, level=level: framed(chunks, frame, level)))  # type: ignore[misc]
    rows = []
    for label, fn in ways:
        stored, cpu = timed(fn)
        name = f"{image.parent.name}/{image.name}"
        rows.append([name, label, f"{stored / MB:,.1f}", f"{len(data) / stored:.2f}", f"{cpu:.2f}"])
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--stored", action="store_true", help="distinct non-zero chunks only, as a first snapshot")
    ap.add_argument("--frames", type=lambda t: [parse_size(x) for x in t.split(",")], default=[256 << 10, 1 << 20])
    ap.add_argument("--levels", type=lambda t: [int(x) for x in t.split(",")], default=[1, 3])
    ap.add_argument("--no-dictionary", action="store_true")
    args = ap.parse_args(argv)
    header = ["image", "compression", "stored MB", "ratio", "CPU s"]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---:|---:|---:|")
    for image in args.images:
        for row in rows_for(image, args):
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
