"""A pool of large reusable buffers, so that a pipeline does not page-fault fresh memory for every fill.

Fresh 8 MiB buffers cost more in page faults and zeroing than reading and cutting them; recycling a fixed
set also bounds the pipeline's memory: a producer that finds the pool empty waits for a consumer.
"""

from __future__ import annotations

import functools
import queue
import threading

from dedupimg.core.parallel import Countdown


class PoolClosed(Exception):
    """The pool was closed while a producer waited for a buffer."""


class BufferPool:
    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._free: queue.LifoQueue[bytearray] = queue.LifoQueue()
        self._left = count  # buffers that may still be allocated
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def get(self) -> bytearray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._left > 0:
                self._left -= 1
                return bytearray(self.size)
        while not self._closed.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise PoolClosed

    def put(self, buf: bytearray) -> None:
        if len(buf) == self.size:
            self._free.put(buf)

    def close(self) -> None:
        self._closed.set()


class Lease(Countdown):
    """A buffer shared by ``holders`` parties; the last to call ``release`` returns it to the pool."""

    __slots__ = ("buf",)

    def __init__(self, buf: bytearray, pool: BufferPool, holders: int) -> None:
        self.buf = buf
        super().__init__(holders, functools.partial(pool.put, buf))

    release = Countdown.done
