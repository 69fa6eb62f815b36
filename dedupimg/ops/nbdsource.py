"""NBD sources: an export read through :mod:`dedupimg.core.nbdclient` as a snapshot source.

Regions come from the ``base:allocation`` metadata context: ranges the server reports as reading zeros
(NBD_STATE_ZERO: holes, qcow2 zero clusters, unallocated clusters without a backing file) are recorded as zero
extents and never read. With a dirty bitmap (``qemu:dirty-bitmap:NAME``) the source also lists the ranges that
changed since the bitmap was started, for an incremental snapshot (ops/changed.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from dedupimg.core.errors import SourceError
from dedupimg.core.nbdclient import Address, NbdClient
from dedupimg.core.nbdproto import BASE_ALLOCATION, NBD_STATE_DIRTY, NBD_STATE_ZERO
from dedupimg.ops.source import ReadCancelled, Region

DIRTY_BITMAP = "qemu:dirty-bitmap:"


class NbdSource:
    kind = "nbd"

    def __init__(self, address: Address, name: str, description: str, bitmap: str | None = None,
                 changes: Callable[[], str | None] | None = None,
                 on_close: Callable[[], None] | None = None, retry_while: Callable[[], bool] | None = None) -> None:
        """Connect to ``address``; ``on_close`` runs when the source is closed (not when this fails: the caller
        cleans up then)."""
        self.name = name
        self.description = description
        self.resolved = description
        self.bitmap = bitmap
        self._changes = changes
        self._on_close = on_close
        contexts = [BASE_ALLOCATION] + ([DIRTY_BITMAP + bitmap] if bitmap else [])
        self.client = NbdClient(address, contexts, retry_while=retry_while)
        self.size: int | None = self.client.size
        if bitmap and not self.client.has_context(DIRTY_BITMAP + bitmap):
            self.client.close()
            raise SourceError(f"the NBD export {address} has no dirty bitmap {bitmap!r} (qemu-nbd exports one "
                              f"with -B {bitmap}; QEMU's nbd-server-add with bitmap={bitmap})")
        self.bytes_read = 0

    def regions(self) -> Iterator[Region]:
        if not self.client.has_context(BASE_ALLOCATION):  # a server without block status: all data
            yield Region(0, self.client.size, True)
            return
        for offset, length, flags in self.client.extents(BASE_ALLOCATION):
            yield Region(offset, length, not flags & NBD_STATE_ZERO)

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every range the dirty bitmap marks as changed."""
        assert self.bitmap is not None
        return [(o, n) for o, n, f in self.client.extents(DIRTY_BITMAP + self.bitmap) if f & NBD_STATE_DIRTY]

    def reader(self, region: Region, stop: threading.Event | None = None) -> NbdReader:
        assert region.length is not None
        return NbdReader(self.client, region.offset, region.length, stop)

    def read_at(self, offset: int, out: memoryview) -> None:
        self.client.read_into(offset, out)

    def changes(self) -> str | None:
        return self._changes() if self._changes is not None else None

    def interrupt(self) -> None:
        self.client.interrupt()

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self._on_close is not None:
                self._on_close()
                self._on_close = None


READ_AHEAD = 4 << 20  # asked for before returning a buffer: less than any buffer the chunker passes next


class NbdReader:
    """Reads one region of an export: each call fills the buffer it is given with pipelined requests, and asks
    for the start of the next one before it returns, so the server reads it while the chunker cuts."""

    def __init__(self, client: NbdClient, offset: int, length: int, stop: threading.Event | None) -> None:
        self._client = client
        self._pos = offset
        self._left = length
        self._stop = stop
        self.bytes_read = 0

    def __call__(self, out: memoryview) -> int:
        if self._stop is not None and self._stop.is_set():
            raise ReadCancelled
        want = min(len(out), self._left)
        if want:
            self._client.read_into(self._pos, out[:want])
            self._pos += want
            self._left -= want
            self.bytes_read += want
            if self._left and len(out) > READ_AHEAD:
                self._client.send_reads(self._pos, min(self._left, READ_AHEAD))
        return want
