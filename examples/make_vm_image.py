"""Make or age a VM-like disk image: sparse holes, text-like and random regions, nightly churn.

    python examples/make_vm_image.py IMAGE [--size-mib N] [--night K]

Night 0 creates the image; night K > 0 rewrites 1% of its 4 KiB blocks in place and one clustered 4 MiB
region, as a day of use would. Deterministic: the same night gives the same bytes.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import blake3

BLOCK = 4096


def rand_bytes(seed: int, n: int) -> bytes:
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


def text_bytes(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    words = [w.encode() for w in "the quick brown fox jumps over lazy dog kernel module config log entry".split()]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:n])


def create(path: Path, size: int) -> None:
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)  # everything not written below stays a hole
        for i, off in enumerate(range(0, size, 8 * mib)):
            kind = i % 4
            if kind == 0:
                f.seek(off)
                f.write(rand_bytes(i, 4 * mib))
            elif kind == 1:
                f.seek(off)
                f.write(text_bytes(i, 6 * mib))
            elif kind == 2:
                f.seek(off)
                f.write(bytes(2 * mib) + text_bytes(i, mib))  # written zeros, then text
            # kind 3: a hole


def age(path: Path, night: int) -> None:
    size = path.stat().st_size
    rng = random.Random(night)
    blocks = size // BLOCK
    with open(path, "r+b") as f:
        for j in range(max(1, blocks // 100)):
            f.seek(rng.randrange(blocks) * BLOCK)
            f.write(rand_bytes(night * 1_000_000 + j, BLOCK) if j % 2 else text_bytes(night * 1_000_000 + j, BLOCK))
        f.seek(rng.randrange(max(1, blocks - 1024)) * BLOCK)
        f.write(rand_bytes(night, min(4 << 20, size)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("image", type=Path)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--night", type=int, default=0)
    args = ap.parse_args()
    if args.night == 0:
        create(args.image, args.size_mib << 20)
    else:
        age(args.image, args.night)


if __name__ == "__main__":
    main()
