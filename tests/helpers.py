"""Shared test helpers: deterministic data, the CLI in a subprocess, small repositories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blake3

from dedupimg.core.config import ChunkerParams
from dedupimg.repo.repository import Repository

ROOT = Path(__file__).resolve().parent.parent


def det_bytes(seed: int, n: int) -> bytes:
    """``n`` pseudo-random bytes that are the same on every machine (blake3 XOF)."""
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


def text_bytes(seed: int, n: int) -> bytes:
    """Compressible, text-like bytes with some variety."""
    words = [w.encode() for w in det_bytes(seed, 4096).hex().split("a") if w]
    out = bytearray()
    i = 0
    while len(out) < n:
        out += words[i % len(words)] + (b"\n" if i % 11 == 0 else b" ")
        i += 7
    return bytes(out[:n])


def small_repo(path: Path, avg: int = 1024) -> Repository:
    """Small chunks and 64 KiB packs, so that every test crosses many packs and segments."""
    return Repository.init(path, ChunkerParams.for_average(avg), pack_size=1 << 16)


def run_cli(*args: str | os.PathLike[str], input: bytes | None = None, env: dict[str, str] | None = None,
            **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    full_env = dict(os.environ)
    full_env.pop("DEDUPIMG_REPO", None)
    full_env.pop("DEDUPIMG_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dedupimg", *map(str, args)],
        input=input,
        capture_output=True,
        env=full_env,
        timeout=600,
        **kwargs,  # type: ignore[arg-type]
    )


def write_sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    """A sparse file of ``size`` bytes with data ``pieces`` at their offsets and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)


def blocks_allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512
