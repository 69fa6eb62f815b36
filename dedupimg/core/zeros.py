"""Zero runs: detected without hashing, and hashed into the image digest without allocating per run."""

from __future__ import annotations

import blake3

# calloc-backed: pages that are only read stay the shared zero page and cost no memory.
ZERO_BLOCK = bytes(16 << 20)
_ZERO_VIEW = memoryview(ZERO_BLOCK)


def is_zero(buf: bytes | bytearray, start: int, end: int) -> bool:
    """True when ``buf[start:end]`` is all zero bytes (memcmp speed; at most 16 MiB)."""
    return buf.startswith(_ZERO_VIEW[: end - start], start, end)


def hash_zeros(hasher: blake3.blake3, length: int) -> None:
    while length > 0:
        n = min(length, len(ZERO_BLOCK))
        hasher.update(_ZERO_VIEW[:n])
        length -= n
