"""Content-defined chunking: FastCDC 2020 through pyfastcdc, streamed over a reusable buffer.

Chunk boundaries are part of the on-disk format (tests/unit/test_chunker.py freezes them). FastCDC decides
each cut from the chunk's start and at most ``max_size`` bytes after it, so cutting a large buffer and
keeping every chunk but the last (which may have been cut by the buffer's end rather than by content) gives
exactly the cuts of one pass over the whole stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC

from dedupimg.config import ChunkerParams

ReadInto = Callable[[memoryview], int]

DEFAULT_BUFFER = 8 << 20


@dataclass(frozen=True)
class Batch:
    """Chunks cut from one buffer fill: ``buf[start:end]`` for each ``(start, end)`` in ``cuts``.

    ``buf`` is reused by the next fill: a consumer must be done with it before asking for the next batch.
    """

    buf: bytearray
    cuts: list[tuple[int, int]]


class Chunker:
    def __init__(self, params: ChunkerParams, buffer_size: int = DEFAULT_BUFFER) -> None:
        self.params = params
        self._cdc = FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalized_chunking,  # type: ignore[arg-type]
            seed=params.seed,
        )
        # Two max-size chunks always fit, so every fill before EOF yields at least one chunk.
        self.buffer_size = max(buffer_size, 2 * params.max_size)

    def batches(self, readinto: ReadInto) -> Iterator[Batch]:
        """Cut the stream that ``readinto`` produces (it returns 0 at its end)."""
        buf = bytearray(self.buffer_size)
        view = memoryview(buf)
        filled = 0
        eof = False
        while True:
            while not eof and filled < len(buf):
                n = readinto(view[filled:])
                if n == 0:
                    eof = True
                filled += n
            if filled == 0:
                return
            cuts = [(c.offset, c.offset + c.length) for c in self._cdc.cut_buf(view[:filled])]
            if not eof:
                cuts.pop()  # may end at the buffer's end rather than at a content-defined cut
            yield Batch(buf, cuts)
            consumed = cuts[-1][1] if cuts else 0
            if eof and consumed >= filled:
                return
            buf[: filled - consumed] = buf[consumed:filled]
            filled -= consumed

    def cut_points(self, data: bytes) -> list[int]:
        """End offsets of the chunks of ``data`` as one stream (used by tests and tools)."""
        pos = 0

        def readinto(out: memoryview) -> int:
            nonlocal pos
            n = min(len(out), len(data) - pos)
            out[:n] = data[pos : pos + n]
            pos += n
            return n

        ends: list[int] = []
        base = 0
        for batch in self.batches(readinto):
            ends.extend(base + end for _, end in batch.cuts)
            base = ends[-1] if ends else base
        return ends
