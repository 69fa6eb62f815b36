"""Delta compression of a new chunk against the parent version's chunk at the same place, measured.

    .venv/bin/python benchmarks/delta.py SERIES_DIR... [--level 1] [--peers benchmarks/results/latest.json]

Not built; this measures whether it would pay (issue 15's "stored per later version <= bup's" target). A
scattered 4 KiB write into a disk image makes the ~20 KiB chunk around it new, and dedupimg stores that whole
chunk again (zstd of 20 KiB). Compressed with the parent version's chunk at the same image offset as a zstd
raw-content dictionary, the new chunk costs about the changed block. For each later version (v2 against v1,
v3 against v2) of each SERIES_DIR (v1.img, v2.img, v3.img, as benchmarks/run.sh leaves them in
benchmarks/work/*/series/):

- every version is cut with dedupimg's chunker (the repository's default parameters) as one stream;
- a chunk is *new* if its blake3 was not seen in an earlier version (all-zero chunks are never stored);
- ``plain``: each new chunk compressed alone at ``--level`` (what the repository stores today);
- ``delta``: each new chunk compressed with a *base* as dictionary, and the smaller of that and ``plain``
  kept: the base is the parent version's chunk overlapping the new one most; if that chunk was itself stored
  as a delta, its own base instead, so a reader never needs more than one base (chains stay one deep).

It prints per version the bytes of both, the chunks stored as deltas (each one an extra base read for a
restore, mount or NBD read of it), and the CPU of delta encoding and decoding (one thread). With ``--peers``,
the stored-per-version of the other tools in that benchmark report (same scale's series) is printed beside.
Chunk data only: a repository adds index rows and blob headers (a delta row would also name its base).
"""

from __future__ import annotations

import argparse
import bisect
import json
import mmap
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dedupimg.core.chunker import Chunker  # noqa: E402
from dedupimg.core.config import ChunkerParams  # noqa: E402


@dataclass
class Version:
    data: mmap.mmap
    cuts: list[tuple[int, int]]
    starts: list[int] = field(default_factory=list)
    # where each chunk of this version is stored as a delta: its chunk index -> the base's (start, end) in
    # the version that holds the base's bytes (kept as (version, start, end))
    bases: dict[int, tuple[Version, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.starts = [s for s, _ in self.cuts]


@dataclass
class Tally:
    new_chunks: int = 0
    plain: int = 0
    delta: int = 0
    delta_chunks: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0


def cut(path: Path) -> Version:
    with path.open("rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # slices copy only themselves
    ends = Chunker(ChunkerParams()).cut_points(data)  # type: ignore[arg-type]
    return Version(data, list(zip([0, *ends[:-1]], ends, strict=True)))


def best_overlap(parent: Version, start: int, end: int) -> int | None:
    """Index of the parent's chunk that overlaps [start, end) most."""
    i = max(bisect.bisect_right(parent.starts, start) - 1, 0)
    best, most = None, 0
    while i < len(parent.cuts) and parent.cuts[i][0] < end:
        s, e = parent.cuts[i]
        overlap = min(end, e) - max(start, s)
        if overlap > most:
            best, most = i, overlap
        i += 1
    return best


def measure(parent: Version, child: Version, seen: set[bytes], level: int, shifted: bool = False) -> Tally:
    tally = Tally()
    plain = zstandard.ZstdCompressor(level=level)
    # --base shifted: where the parent held the last chunk both versions share, by content; a new chunk's base
    # is then sought at its offset minus that shift (bytes inserted or removed before it move it).
    where: dict[bytes, int] = {}
    if shifted:
        for s, e in parent.cuts:
            where.setdefault(blake3.blake3(parent.data[s:e]).digest(), s)
    shift = 0
    for index, (start, end) in enumerate(child.cuts):
        chunk = child.data[start:end]
        if not chunk.strip(b"\0"):
            continue
        digest = blake3.blake3(chunk).digest()
        if shifted and digest in where:
            shift = start - where[digest]
        if digest in seen:
            continue
        seen.add(digest)
        tally.new_chunks += 1
        alone = len(plain.compress(chunk))
        tally.plain += alone
        near = best_overlap(parent, start - shift, end - shift) if start >= shift else None
        if near is None:
            tally.delta += alone
            continue
        holder, bs, be = parent.bases.get(near, (parent, *parent.cuts[near]))
        base = holder.data[bs:be]
        t0 = time.process_time()
        dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        packed = zstandard.ZstdCompressor(level=level, dict_data=dictionary).compress(chunk)
        tally.encode_s += time.process_time() - t0
        if len(packed) < alone:
            t0 = time.process_time()
            again = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(packed)
            tally.decode_s += time.process_time() - t0
            assert again == chunk
            tally.delta += len(packed)
            tally.delta_chunks += 1
            child.bases[index] = (holder, bs, be)
        else:
            tally.delta += alone
    return tally


def peer_growth(report: Path, series: Path) -> dict[str, list[float]]:
    """Stored per later version (MB) of each tool in a bench.py JSON report, for the series at ``series``."""
    doc = json.loads(report.read_text())
    out: dict[str, list[float]] = {}
    for entry in doc["series"]:
        if Path(entry["versions"][0]["path"]).parent.resolve() != series.resolve():
            continue
        for tool, result in entry["tools"].items():
            sizes = [b["repo_bytes"] for b in result["backups"]]
            out[tool] = [(b - a) / 1e6 for a, b in zip(sizes, sizes[1:], strict=False)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", nargs="+", type=Path)
    parser.add_argument("--level", type=int, default=1, help="zstd level (the repository's default: 1)")
    parser.add_argument("--peers", type=Path, help="a bench.py JSON report of the same series")
    parser.add_argument("--base", choices=["offset", "shifted"], default="offset",
                        help="offset: the parent's chunk at the same image offset (what snapshots do); shifted: "
                             "at the offset moved by the shift of the last chunk both versions share")
    args = parser.parse_args()
    print(f"zstd level {args.level}; MB of chunk data stored per later version; CPU-s on one thread\n")
    print("| series | version | new chunks | plain MB | delta MB | delta/plain | as deltas | encode s | decode s "
          "| peers (repository growth, MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for directory in args.series:
        peers = peer_growth(args.peers, directory) if args.peers else {}
        versions = sorted(directory.glob("v*.img"))
        seen: set[bytes] = set()
        parent = cut(versions[0])
        for start, end in parent.cuts:
            seen.add(blake3.blake3(parent.data[start:end]).digest())
        for number, path in enumerate(versions[1:], start=2):
            child = cut(path)
            t = measure(parent, child, seen, args.level, args.base == "shifted")
            peer_text = ", ".join(f"{tool} {growth[number - 2]:.1f}" for tool, growth in peers.items()
                                  if len(growth) >= number - 1)
            print(f"| {directory.name} | v{number} | {t.new_chunks:,} | {t.plain / 1e6:.1f} | {t.delta / 1e6:.1f} "
                  f"| {t.delta / max(t.plain, 1):.2f} | {t.delta_chunks:,} | {t.encode_s:.2f} | {t.decode_s:.2f} "
                  f"| {peer_text} |", flush=True)
            parent = child


if __name__ == "__main__":
    main()
