"""What worker processes could give a snapshot on this machine (issue 15, lever 1), measured without building them.

    .venv/bin/python benchmarks/process_ceiling.py IMAGE [--bytes 1G] [--repeat 3]

A snapshot's CPU work on new data is FastCDC cutting, blake3 per chunk, and zstd 1 of each chunk; on known data
(a later snapshot) it is cutting and blake3. This script does exactly that work on the first ``--bytes`` of an
image held in memory (no I/O, no index, no packs: the ceiling, not the pipeline), split into two halves:

- ``1 thread``: both halves, one after the other, on one thread: the single-core rate;
- ``2 threads``: one half per thread in one process (pyfastcdc, blake3 and zstd release the GIL);
- ``2 processes``: one half per forked process: the most that worker processes could reach.

The ratio "2 processes / 1 thread" is the machine's ceiling for this work; compare it with the snapshot
pipeline's own CPU seconds per wall second (``dedupimg snapshot`` under ``/usr/bin/time``): when the pipeline
already runs at that many cores, moving stages into processes cannot make it faster here.
Prints a Markdown table of medians (MB = 10^6 bytes of image per wall second).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time
from pathlib import Path

import blake3
import zstandard
from pyfastcdc import FastCDC
from s3 import parse_size


def work(data: bytes, compress: bool) -> int:
    """Cut, hash and (optionally) compress ``data`` as a snapshot of new data would; returns stored bytes."""
    cdc = FastCDC(16384, min_size=4096, max_size=65536, normalized_chunking=2)
    view = memoryview(data)
    zc = zstandard.ZstdCompressor(level=1)
    stored = 0
    for c in cdc.cut_buf(view):
        piece = view[c.offset : c.offset + c.length]
        blake3.blake3(piece).digest()
        if compress:
            stored += len(zc.compress(piece))
    return stored


def one_thread(halves: list[bytes], compress: bool) -> None:
    for h in halves:
        work(h, compress)


def two_threads(halves: list[bytes], compress: bool) -> None:
    threads = [threading.Thread(target=work, args=(h, compress)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def two_processes(halves: list[bytes], compress: bool) -> None:
    ctx = multiprocessing.get_context("fork")  # the halves are inherited, not pickled
    procs = [ctx.Process(target=work, args=(h, compress)) for h in halves]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"worker failed with exit code {p.exitcode}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", type=Path)
    ap.add_argument("--bytes", type=parse_size, default=1 << 30)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with args.image.open("rb") as f:
        data = f.read(args.bytes)
    half = len(data) // 2
    halves = [data[:half], data[half:]]
    ways = {"1 thread": one_thread, "2 threads": two_threads, "2 processes": two_processes}
    print(f"# process ceiling: {args.image} first {len(data) / 1e6:.0f} MB, {args.repeat} repeat(s), medians\n")
    print("| work | 1 thread MB/s | 2 threads | 2 processes | threads / 1 | processes / 1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for compress, label in ((True, "cut + blake3 + zstd 1 (new data)"), (False, "cut + blake3 (known data)")):
        rates: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.repeat):
            for name, way in ways.items():  # interleaved, so drift on a shared machine hits all alike
                t = time.perf_counter()
                way(halves, compress)
                rates[name].append(len(data) / (time.perf_counter() - t) / 1e6)
        m = {k: statistics.median(v) for k, v in rates.items()}
        one = m["1 thread"]
        print(f"| {label} | {one:.0f} | {m['2 threads']:.0f} | {m['2 processes']:.0f} | "
              f"{m['2 threads'] / one:.2f}x | {m['2 processes'] / one:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
