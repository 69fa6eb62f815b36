"""Content-defined chunking: FastCDC 2020 through pyfastcdc, streamed over large buffers.

Chunk boundaries are part of the on-disk format (tests/core/test_chunker.py freezes them). FastCDC decides
each cut from the chunk's start and at most ``max_size`` bytes after it, so cutting a large buffer and
keeping every chunk but the last (which may have been cut by the buffer's end rather than by content) gives
exactly the cuts of one pass over the whole stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC

from dedupimg.core.buffers import BufferPool, Lease
from dedupimg.core.config import ChunkerParams

ReadInto = Callable[[memoryview], int]

DEFAULT_BUFFER = 8 << 20


@dataclass(frozen=True)
class Batch:
    """Chunks cut from one buffer fill: ``buf[start:end]`` for each ``(start, end)`` in ``cuts``.

    Each batch owns its buffer, so batches can be hashed and compressed on other threads while the next
    one is read and cut.
    """

    buf: bytearray
    cuts: list[tuple[int, int]]
    lease: Lease | None = None  # with a pool: release when done with ``buf``

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    @property
    def length(self) -> int:
        return self.cuts[-1][1] if self.cuts else 0


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

    def pool(self, count: int) -> BufferPool:
        return BufferPool(self.buffer_size, count)

    def batches(self, readinto: ReadInto, pool: BufferPool | None = None, holders: int = 1) -> Iterator[Batch]:
        """Cut the stream that ``readinto`` produces (it returns 0 at its end).

        With a ``pool``, buffers come from it and each batch carries a lease that its ``holders`` consumers
        release; without one, every fill gets a fresh buffer.
        """
        new_buffer = pool.get if pool is not None else lambda: bytearray(self.buffer_size)
        buf = new_buffer()
        filled = 0
        eof = False
        while True:
            view = memoryview(buf)
            while not eof and filled < len(buf):
                n = readinto(view[filled:])
                if n == 0:
                    eof = True
                filled += n
            if filled == 0:
                view.release()
                if pool is not None:
                    pool.put(buf)
                return
            cuts = [(c.offset, c.offset + c.length) for c in self._cdc.cut_buf(view[:filled])]
            if not eof:
                cuts.pop()  # may end at the buffer's end rather than at a content-defined cut
            consumed = cuts[-1][1] if cuts else 0
            tail = None
            if not eof:  # the uncut tail starts the next buffer; this one now belongs to the batch
                tail = new_buffer()
                tail[: filled - consumed] = view[consumed:filled]
            view.release()
            yield Batch(buf, cuts, Lease(buf, pool, holders) if pool is not None else None)
            if tail is None:
                return
            buf, filled = tail, filled - consumed

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
            base += batch.length
        return ends
