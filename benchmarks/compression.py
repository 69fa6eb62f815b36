"""Compressed size and CPU of ways to compress an image's chunks: the trade-off behind the tar-series gap.

Usage: .venv/bin/python benchmarks/compression.py IMAGE [IMAGE...]

For each image: cut with dedupimg's default chunker parameters, then compress (one thread, in process)
every chunk on its own at zstd levels 1 and 3 (what dedupimg does: level 1), with a zstd dictionary trained
on a sample of the chunks, and as frames of consecutive chunks (256 KiB and 1 MiB, the way borg's 2 MiB
chunks are compressed). Prints a Markdown table of stored MB (a chunk never stores more than its raw size)
and compression CPU seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import zstandard
from pyfastcdc.cy import FastCDC

from dedupimg.core.config import ChunkerParams

MB = 1_000_000


def cut(data: bytes) -> list[bytes]:
    p = ChunkerParams()
    cdc = FastCDC(avg_size=p.avg_size, min_size=p.min_size, max_size=p.max_size)
    return [data[c.offset : c.offset + c.length] for c in cdc.cut_buf(data)]


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
            total += len(comp.compress(b"".join(pending)))
            pending, size = [], 0
    if pending:
        total += len(comp.compress(b"".join(pending)))
    return total


def trained(chunks: list[bytes], samples: int = 500) -> zstandard.ZstdCompressionDict:
    step = max(1, len(chunks) // samples)
    return zstandard.train_dictionary(112 * 1024, chunks[::step][:samples], level=1, threads=1)


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    started = time.process_time()
    value = fn()
    return value, time.process_time() - started


def rows_for(image: Path) -> list[list[str]]:
    data = image.read_bytes()
    chunks = cut(data)
    dictionary = trained(chunks)
    ways: list[tuple[str, Callable[[], int]]] = [
        ("each chunk, zstd 1 (dedupimg)", lambda: per_chunk(chunks, 1)),
        ("each chunk, zstd 3", lambda: per_chunk(chunks, 3)),
        ("each chunk, zstd 1 + trained dictionary", lambda: per_chunk(chunks, 1, dictionary)),
        ("each chunk, zstd 3 + trained dictionary", lambda: per_chunk(chunks, 3, dictionary)),
        ("256 KiB frames, zstd 1", lambda: framed(chunks, 256 << 10, 1)),
        ("256 KiB frames, zstd 3", lambda: framed(chunks, 256 << 10, 3)),
        ("1 MiB frames, zstd 1", lambda: framed(chunks, 1 << 20, 1)),
        ("1 MiB frames, zstd 3", lambda: framed(chunks, 1 << 20, 3)),
    ]
    rows = []
    for label, fn in ways:
        stored, cpu = timed(fn)
        name = f"{image.parent.name}/{image.name}"
        rows.append([name, label, f"{stored / MB:,.1f}", f"{len(data) / stored:.2f}", f"{cpu:.2f}"])
    return rows


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    header = ["image", "compression", "stored MB", "ratio", "CPU s"]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---:|---:|---:|")
    for image in argv:
        for row in rows_for(Path(image)):
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
