"""Worker processes that read, decompress and verify runs of blobs into shared memory, for mount and serve.

Why processes: a FUSE or NBD server spends most of its time per MiB in zstd and blake3, and threads do not
overlap that here: both release the GIL, yet two threads decompressing and hashing 16-64 KiB chunks ran
1.0-1.3x one thread on this 2-core machine (each short call hands the GIL back and forth), where two
processes ran 1.9x. So the serving process keeps the cheap work (mapping offsets, the index, the FUSE or
socket traffic) and gives each run of adjacent blobs to a worker, which verifies every blob against its
id and writes the raw bytes into a slot of an arena shared with the server (a memfd both map). Nothing
crosses a pipe but a short request and answer; the server copies from the arena straight into the FUSE
buffer or the socket buffer.

The arena is also the cache: a slot keeps its run until it is needed for another one, least recently used
first. A reader *pins* the slots it copies from, so a slot is never refilled under a copy; slots are only
pinned while copying, never while waiting for a fetch, so fetches always find a slot eventually.

Protocol, over each worker's stdin and stdout (trusted: the worker is our own child). A worker gets the store's
description (``Store.spec()``, as JSON on its command line) and opens packs there by name, never by path; it
is first sent how to read blobs (``[nil]``, or ``[keys]`` of an encrypted repository: never on its command line),
starts by sending ``u32 n`` + msgpack ``["ready"]``, then answers requests in order:
request  ``u32 n`` + msgpack ``[task, slot, [[pack name, start, length, [[offset, id, type, stored length], ...],
         where], ...], base runs, [[delta id, base id], ...]]``: one or more runs of blobs, each read with one
         pread, their raw bytes back to back in the slot (several short runs share a slot: a later version's
         chunks alternate between packs, and a slot per 100 KiB run left most of the arena empty and starved a
         restore of slots); the DELTA chunks among them are decoded with the raw bytes of their bases, which
         the base runs (read first, same form, never put in the slot) hold
answer   ``u32 n`` + msgpack ``[task, True, [raw lengths]]`` (the bytes are in the slot, in the order asked)
      or ``u32 n`` + msgpack ``[task, False, message]`` when a blob is damaged (IntegrityError in the caller).
A worker that dies fails its outstanding tasks (ReadPoolError, exit code 17 like damage: the read fails,
never returns wrong bytes); later tasks go to the other workers, or run in the caller when none is left.
Workers exit when their stdin closes, so they never outlive the server.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import msgpack

from dedupimg.core.crypto import Aead
from dedupimg.core.envints import env_int
from dedupimg.core.errors import IntegrityError
from dedupimg.core.parallel import worker_count
from dedupimg.repo import pack
from dedupimg.store import StoreSpec, open_store
from dedupimg.store.base import ObjectReader

LENGTH = struct.Struct("<I")
# DEDUPIMG_READ_WORKERS=0 reads in the serving process itself (as before the pool; for comparisons).
WORKERS = env_int("DEDUPIMG_READ_WORKERS", worker_count(least=1), 0, 64)
# A worker allocates and frees a pread buffer of about a MiB per run; glibc would hand it back to the kernel
# every time (brk and page faults were a fifth of a worker's time). These keep it in the heap.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
CACHE_BYTES = 64 << 20  # the shared cache of decompressed chunks, for all snapshots being read
WORKER_PACKS = 64  # open pack files a worker keeps
READY = "ready"  # a worker's first message
START_TIMEOUT = 30.0


class ReadPoolError(IntegrityError):
    """A read worker died with the task in flight."""


class PackRun(NamedTuple):
    """Blobs that lie back to back in the pack named ``name``, within [start, start+length); ``where`` names
    the pack in messages."""

    name: str
    start: int
    length: int
    blobs: list[pack.RunBlob]
    where: str


class Landed(NamedTuple):
    """A run's verified blobs: views into arena slot ``slot`` (valid while it holds generation ``gen``), or,
    read without a pool, plain bytes (``slot`` None: always valid). A named tuple: a read of cached chunks
    builds one per chunk."""

    slot: int | None
    gen: int
    blobs: list[bytes] | list[memoryview]


# -- pipes ------------------------------------------------------------------------------------------------------


def _read_exact(fd: int, n: int) -> bytes | None:
    """``n`` bytes from ``fd``; None at end of file before the first byte."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = os.read(fd, n - got)
        if not part:
            if got == 0:
                return None
            raise EOFError("pipe closed in the middle of a message")
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _send(fd: int, obj: object) -> None:
    body = msgpack.packb(obj)
    data = memoryview(LENGTH.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data) :]


def _receive(fd: int) -> list[object] | None:
    head = _read_exact(fd, LENGTH.size)
    if head is None:
        return None
    body = _read_exact(fd, LENGTH.unpack(head)[0])
    if body is None:
        raise EOFError("pipe closed in the middle of a message")
    msg = msgpack.unpackb(body)
    if not isinstance(msg, list):
        raise ValueError("malformed read pool message")
    return msg


# -- the worker side --------------------------------------------------------------------------------------------


def worker_main(arena_fd: int, slot_bytes: int, slots: int, spec: StoreSpec, inp: int = 0, out: int = 1,
                threads: int = 1) -> None:
    """Serve requests from ``inp`` until it closes, writing each run's raw bytes into its slot.

    With ``threads`` > 1 (an object store, where each read is a request that waits on the network) several
    requests are worked on at once and answered as they finish; the server matches answers by task."""
    arena = memoryview(mmap.mmap(arena_fd, slot_bytes * slots))
    first = _receive(inp)  # the first message: how to read blobs (an encrypted repository's keys)
    fmt = blob_format_of(first[0] if first else None)
    store = open_store(spec)
    readers: OrderedDict[str, ObjectReader] = OrderedDict()
    lock = threading.Lock()  # readers, and the answer pipe
    _send(out, [READY])

    def reader_of(name: str, where: str) -> ObjectReader:
        with lock:
            reader = readers.get(name)
            if reader is not None:
                readers.move_to_end(name)
                return reader
        reader = store.open(name, where)  # IntegrityError: missing, not a file; PermissionDenied
        with lock:
            readers[name] = reader  # (a reader of another thread's open of the same pack is dropped)
            if len(readers) > WORKER_PACKS:
                readers.popitem(last=False)[1].close()
        return reader

    def read_runs(runs: list[list[object]], bases: pack.Bases | None) -> Iterator[tuple[list[pack.RunBlob],
                                                                                      list[bytes], str, int]]:
        for name, start, length, blobs, where in runs:
            assert isinstance(name, str) and isinstance(where, str) and isinstance(blobs, list)
            assert isinstance(start, int) and isinstance(length, int)
            run = [tuple(b) for b in blobs]
            yield run, pack.read_blob_run(reader_of(name, where), start, length, run, where,
                                          fmt, bases), where, start

    def serve(msg: list[object]) -> None:
        task, slot, runs, base_runs, links = msg
        assert isinstance(slot, int) and isinstance(runs, list) and isinstance(base_runs, list)
        assert isinstance(links, list)
        try:
            bases: dict[bytes, bytes] | None = None
            if links:
                base_raws = {b[1]: raw for blobs, raws, _w, _s in read_runs(base_runs, None)
                             for b, raw in zip(blobs, raws, strict=True)}
                bases = {delta: base_raws[base] for delta, base in links if base in base_raws}
            raws: list[bytes] = []
            for _blobs, run_raws, where, start in read_runs(runs, bases):
                raws += run_raws
                if sum(len(r) for r in raws) > slot_bytes:
                    raise IntegrityError(f"{where}: the blobs at {start} are larger than the index says")
        except IntegrityError as exc:
            answer: list[object] = [task, False, str(exc)]
        except Exception as exc:  # noqa: BLE001  (the worker has no stderr: the server reports it)
            answer = [task, False, f"read worker failed: {type(exc).__name__}: {exc}"]
        else:
            pos = slot * slot_bytes
            for raw in raws:
                arena[pos : pos + len(raw)] = raw
                pos += len(raw)
            answer = [task, True, [len(r) for r in raws]]
        with lock:
            _send(out, answer)

    if threads <= 1:
        while (msg := _receive(inp)) is not None:
            serve(msg)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="dedupimg-readworker") as pool:
        while (msg := _receive(inp)) is not None:
            pool.submit(serve, msg)


def blob_format_of(doc: object) -> pack.BlobFormat:
    """The blob format a worker was sent: plain (None), or sealed with the keys in ``doc``."""
    if doc is None:
        return pack.PLAIN
    assert isinstance(doc, dict)
    return pack.SealedFormat(Aead(doc["aead"], doc["enc"]), doc["id"], doc["padding"])


# -- the serving side -------------------------------------------------------------------------------------------


class _Worker:
    """One worker process and the thread that takes its answers."""

    def __init__(self, pool: ReadPool, arena_fd: int) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        # No password in a worker's environment: it gets the keys it needs through its pipe.
        env = {**{k: v for k, v in os.environ.items() if "PASSWORD" not in k}, **WORKER_MALLOC,
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        args = [str(arena_fd), str(pool.slot_bytes), str(pool.slots), json.dumps(pool.store_spec), str(pool.threads)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dedupimg.repo.readpool", *args],
            # No stderr: a background mount's caller waits for the end of the server's stderr, which a
            # worker holding it open would postpone forever. Failures come back as answers instead.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, pass_fds=(arena_fd,),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.inp, self.out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        try:
            _send(self.inp, [pool.blob_format])  # (keys through the pipe: never on a command line)
        except OSError:
            pass  # a worker dead at birth: its answer thread finds the pipe closed
        self.pending: dict[int, tuple[Future[Landed], int]] = {}  # task -> (its future, its slot)
        self.alive = True
        self.ready = threading.Event()
        self.write_lock = threading.Lock()
        self._pool = pool
        self._thread = threading.Thread(target=self._answers, name="dedupimg-readpool", daemon=True)
        self._thread.start()

    def _answers(self) -> None:
        pool = self._pool
        try:
            if _receive(self.out) == [READY]:
                self.ready.set()
            while (msg := _receive(self.out)) is not None:
                task, ok, info = msg
                with pool.lock:
                    future, slot = self.pending.pop(task)  # type: ignore[call-overload]
                    gen = pool.landed(slot, bool(ok))
                if ok:
                    assert isinstance(info, list)
                    views: list[memoryview] = []
                    pos = slot * pool.slot_bytes
                    for n in info:
                        views.append(pool.arena[pos : pos + n])
                        pos += n
                    future.set_result(Landed(slot, gen, views))
                else:
                    future.set_exception(IntegrityError(str(info)))
        except (OSError, EOFError, ValueError, TypeError, KeyError, AssertionError):
            pass  # a dead or confused worker: fail what it had
        self.ready.set()  # (dead, if it never said so)
        with pool.lock:
            self.alive = False
            orphans = list(self.pending.values())
            self.pending.clear()
            for _, slot in orphans:
                pool.landed(slot, False)
        for future, _ in orphans:
            if not future.done():
                future.set_exception(ReadPoolError("a read worker process died"))

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=5)
        self.proc.stdout.close()  # type: ignore[union-attr]


class ReadPool:
    """``workers`` processes filling an arena of ``slots`` slots of ``slot_bytes``.

    :meth:`submit` takes the least recently used free slot (waiting while every slot is in flight or
    pinned) and returns a future of the run's :class:`Landed` blobs. :meth:`pin` keeps landed slots from
    being refilled until :meth:`unpin`.
    """

    def __init__(self, workers: int, slot_bytes: int, slots: int, store_spec: StoreSpec, threads: int = 1,
                 blob_format: dict[str, object] | None = None) -> None:
        self.store_spec = store_spec  # what the workers open packs from
        self.blob_format = blob_format  # what they read blobs with (Repository.blob_format_doc)
        self.threads = threads  # runs each worker reads at once
        self.lock = threading.Lock()
        self._slot_free = threading.Condition(self.lock)
        self.slot_bytes, self.slots = slot_bytes, slots
        self._gen = [0] * slots  # bumped each time a slot is given to a new run
        self._pins = [0] * slots
        self._idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(slots))  # not in flight, LRU first
        self._tasks = itertools.count()
        arena_fd = os.memfd_create("dedupimg-readpool")
        try:
            os.ftruncate(arena_fd, slot_bytes * slots)
            self._map = mmap.mmap(arena_fd, slot_bytes * slots)
            self.arena = memoryview(self._map)
            self._workers: list[_Worker] = []
            try:
                for _ in range(workers):
                    self._workers.append(_Worker(self, arena_fd))
            except OSError:  # a worker cannot be started: no pool (the caller reads in its own process)
                self.close()
                raise
        finally:
            os.close(arena_fd)  # the mapping and the workers keep the memory
        # Wait until they have started (about 0.15 s of imports each), so that the first reads of a new mount
        # do not share the CPU with them; one that does not start is treated as dead.
        for worker in self._workers:
            worker.ready.wait(START_TIMEOUT)

    # -- slots (callers hold self.lock) ---------------------------------------------------------------------

    def _take_slot(self) -> int | None:
        """The least recently used slot that is neither in flight nor pinned; None while there is none."""
        for slot in self._idle:
            if not self._pins[slot]:
                del self._idle[slot]
                self._gen[slot] += 1
                return slot
        return None

    def landed(self, slot: int, ok: bool) -> int:
        """A run's answer came (or failed): the slot is idle again, most recently used if it holds data."""
        self._idle[slot] = None
        if not ok:
            self._gen[slot] += 1  # nothing valid in it
            self._idle.move_to_end(slot, last=False)
        self._slot_free.notify()
        return self._gen[slot]

    def pin(self, runs: list[Landed]) -> bool:
        """Pin the slots of ``runs``; False (and nothing pinned) if any was given to another run since."""
        pooled = [r for r in runs if r.slot is not None]
        with self.lock:
            if any(self._gen[r.slot] != r.gen for r in pooled):  # type: ignore[index]
                return False
            for r in pooled:
                self._pins[r.slot] += 1  # type: ignore[index]
                self._idle.move_to_end(r.slot)  # type: ignore[arg-type]
            return True

    def unpin(self, runs: list[Landed]) -> None:
        with self.lock:
            for r in runs:
                if r.slot is not None:
                    self._pins[r.slot] -= 1
            self._slot_free.notify_all()

    # -- work -----------------------------------------------------------------------------------------------

    def submit(self, runs: list[PackRun], base_runs: list[PackRun] | None = None,
               links: list[tuple[bytes, bytes]] | None = None) -> Future[Landed] | None:
        """The future of the blobs of ``runs`` (together at most a slot of raw bytes), in order; None when no
        worker is left to take them (the caller reads them itself). DELTA chunks among them need ``links``
        (delta id, base id) and ``base_runs`` that hold those bases."""
        future: Future[Landed] = Future()
        task = next(self._tasks)
        with self.lock:
            while True:
                live = [w for w in self._workers if w.alive]
                slot = self._take_slot() if live else None
                if slot is not None or not live:
                    break
                self._slot_free.wait()
            worker = min(live, key=lambda w: len(w.pending)) if slot is not None else None
            if worker is not None and slot is not None:
                worker.pending[task] = (future, slot)
        if worker is None or slot is None:
            return None
        try:
            with worker.write_lock:  # requests from several threads must not interleave in the pipe
                _send(worker.inp, [task, slot, _runs_message(runs), _runs_message(base_runs or []),
                                   [list(link) for link in links or []]])
        except OSError:
            with self.lock:
                worker.alive = False
                if worker.pending.pop(task, None) is None:
                    return future  # its answer thread has failed it already
                self.landed(slot, False)
            return None
        return future

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        try:
            self.arena.release()
            self._map.close()
        except BufferError:
            pass  # views still held by callers: the mapping goes with them


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]),
                threads=int(sys.argv[5]) if len(sys.argv) > 5 else 1)


def _runs_message(runs: list[PackRun]) -> list[list[object]]:
    return [[r.name, r.start, r.length, [list(b) for b in r.blobs], r.where] for r in runs]
