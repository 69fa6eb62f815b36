"""blake3 of a whole image on its own thread: one sequential pass that no other pipeline stage waits for."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

import blake3

from dedupimg.core.zeros import hash_zeros

Buffer = bytes | bytearray | memoryview


class ImageHasher:
    def __init__(self, backlog: int = 8) -> None:
        self._hasher = blake3.blake3()
        self._queue: queue.Queue[tuple[Sequence[Buffer] | int, Callable[[], None] | None] | None] = queue.Queue(
            backlog
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dedupimg-imagehash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                data, done = item
                if isinstance(data, int):
                    hash_zeros(self._hasher, data)
                else:
                    for piece in data:
                        self._hasher.update(piece)
                if done is not None:
                    done()
        except BaseException as exc:  # pragma: no cover - blake3 does not fail on bytes
            self._error = exc

    def add(self, data: Sequence[Buffer], done: Callable[[], None] | None = None) -> None:
        """Hash ``data`` next; ``done`` is called once it is hashed (to recycle its buffer)."""
        self._queue.put((data, done))

    def add_zeros(self, length: int) -> None:
        self._queue.put((length, None))

    def digest(self) -> bytes:
        self.close()
        if self._error is not None:
            raise self._error
        return self._hasher.digest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class NoImageHash(ImageHasher):
    """An ImageHasher's interface that hashes nothing: for a snapshot whose record holds no image hash to
    compare with (an incremental snapshot's hash is derived from its extents, checked apart)."""

    def __init__(self) -> None:  # no thread, no hasher
        pass

    def add(self, data: Sequence[Buffer], done: Callable[[], None] | None = None) -> None:
        if done is not None:
            done()

    def add_zeros(self, length: int) -> None:
        pass

    def digest(self) -> bytes:
        return b""

    def close(self) -> None:
        pass
