"""What several whole-system tests share: a FUSE mount of the CLI, an in-process NBD server, a raw NBD client."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dedupimg.core.manifest import SnapshotRecord
from dedupimg.repo.repository import Repository
from dedupimg.serve import nbd
from dedupimg.serve.reader import SnapshotReader
from tests.helpers import wait_for, write_sparse
from tests.packfiles import pack_files, trailer

# -- FUSE -------------------------------------------------------------------------------------------------------


def unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)


@contextmanager
def mounted(repo: Path, mnt: Path, log: Path) -> Iterator[subprocess.Popen]:
    """``dedupimg mount --foreground`` in a subprocess, up; always unmounted and reaped afterwards."""
    mnt.mkdir(exist_ok=True)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dedupimg", "-r", str(repo), "mount", str(mnt), "--foreground"],
            stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        wait_for(lambda: os.path.ismount(mnt), "the mount", proc)
        yield proc
    finally:
        unmount(mnt)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()


# -- damage ---------------------------------------------------------------------------------------------------


def flip_byte_in_chunk(repo: Repository, rec: SnapshotRecord, offset: int):  # -> the reader's Extent
    """Flips one byte in the middle of the stored data of the chunk that holds image ``offset``; returns that
    chunk's extent."""
    extent = next(e for e in SnapshotReader(repo, rec).extents(offset, 1) if e.id is not None)
    for path in pack_files(repo):
        entry = next((e for e in trailer(path) if e.id == extent.id), None)
        if entry is not None:
            break
    assert entry is not None
    with open(path, "r+b") as f:
        f.seek(entry.data_offset + entry.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    return extent


# -- NBD --------------------------------------------------------------------------------------------------------


def build(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> bytes:
    write_sparse(path, size, pieces)
    return path.read_bytes()


@dataclass
class Running:
    server: nbd.NbdServer
    port: int
    thread: threading.Thread


def start(repo: Repository, refs: list[str] | None = None) -> Running:
    server = nbd.NbdServer(repo, refs or [], "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return Running(server, server.address[1], thread)


def stop(running: Running) -> None:
    running.server.shutdown()
    running.thread.join(10)
    assert not running.thread.is_alive()


class RawClient:
    """Just enough of an NBD client to send what real clients never would."""

    def __init__(self, port: int, flags: int = nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        magic, opt_magic, server_flags = nbd.GREETING.unpack(self.recv(nbd.GREETING.size))
        assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        assert server_flags == nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES
        self.sock.sendall(struct.pack(">I", flags))

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            part = self.sock.recv(n - len(out))
            if not part:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += part
        return out

    def closed(self) -> bool:
        """True when the server hangs up on us (within the socket timeout)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(nbd.OPTION.pack(nbd.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply_type, length = nbd.OPTION_REPLY.unpack(self.recv(nbd.OPTION_REPLY.size))
        assert magic == nbd.NBD_REP_MAGIC
        return option, reply_type, self.recv(length)

    def go(self, name: str, structured: bool = False) -> int:
        """Negotiate and enter transmission; returns the export size."""
        if structured:
            self.option(nbd.NBD_OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == nbd.NBD_REP_ACK
        raw = name.encode()
        self.option(nbd.NBD_OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = -1
        while True:
            option, reply_type, data = self.option_reply()
            assert option == nbd.NBD_OPT_GO
            if reply_type == nbd.NBD_REP_ACK:
                return size
            assert reply_type == nbd.NBD_REP_INFO, (reply_type, data)
            if struct.unpack_from(">H", data)[0] == nbd.NBD_INFO_EXPORT:
                size = struct.unpack_from(">Q", data, 2)[0]

    def request(self, command: int, offset: int, length: int, handle: int, payload: bytes = b"") -> None:
        self.sock.sendall(nbd.REQUEST.pack(nbd.NBD_REQUEST_MAGIC, 0, command, handle, offset, length) + payload)

    def simple_reply(self, handle: int, length: int = 0) -> tuple[int, bytes]:
        magic, error, got = nbd.SIMPLE_REPLY.unpack(self.recv(nbd.SIMPLE_REPLY.size))
        assert (magic, got) == (nbd.NBD_SIMPLE_REPLY_MAGIC, handle)
        return error, self.recv(length) if error == 0 else b""

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, reply_type, handle, length = nbd.CHUNK.unpack(self.recv(nbd.CHUNK.size))
        assert magic == nbd.NBD_STRUCTURED_REPLY_MAGIC
        return flags, reply_type, handle, self.recv(length)

    def close(self) -> None:
        self.sock.close()
