"""A read-only NBD client: fixed newstyle handshake, structured replies, metadata contexts, pipelined reads.

It speaks the NBD protocol (NetworkBlockDevice/nbd doc/proto.md) as a client, for snapshot sources: exports of
``qemu-nbd``, QEMU's built-in NBD server (a running guest), nbdkit, or ``dedupimg serve``. It negotiates
NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT (``base:allocation`` and ``qemu:dirty-bitmap:NAME``) and
NBD_OPT_GO, then sends READ and BLOCK_STATUS requests. A read of a large buffer is split into requests that
are all in flight at once on the one connection (the server works on them in parallel) and whose data are
received straight into the caller's buffer. Addresses are the NBD URI standard's (doc/uri.md):
``nbd://HOST[:PORT]/EXPORT`` and ``nbd+unix:///EXPORT?socket=PATH``.

Every failure (refused, disconnected, an error reply) is a :class:`SourceError` with one clear line.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from dedupimg.core.errors import SourceError, UsageError
from dedupimg.core.nbdproto import (
    DEFAULT_PORT,
    IHAVEOPT,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_READ,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_EXPORT,
    NBD_OPT_GO,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR_BIT,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    REQUEST,
    SIMPLE_REPLY,
)

READ_PIECE = 2 << 20  # a large read is split into requests of this size, all in flight together
STATUS_SPAN = 1 << 30  # BLOCK_STATUS asks about this much at a time (servers may answer less)

_STRUCT_REST = struct.Struct(">HHQI")  # flags, type, handle, length (after the magic)


@dataclass(frozen=True)
class Address:
    """Where an NBD export is: a TCP host and port, or a unix socket; and the export's name."""

    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None

    def __str__(self) -> str:
        if self.socket_path is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def is_nbd_uri(spec: str) -> bool:
    return spec.startswith(("nbd://", "nbd+unix://"))


def parse_uri(uri: str) -> Address:
    """``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``; UsageError otherwise (TLS schemes,
    nbds://, are not supported)."""
    parts = urlsplit(uri)
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if parts.scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket")
        if parts.netloc or not sockets:
            raise UsageError(f"{uri}: an NBD unix socket address is nbd+unix:///EXPORT?socket=PATH")
        return Address(export, socket_path=sockets[0])
    if parts.scheme == "nbd":
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise UsageError(f"{uri}: the port is not a number from 0 to 65535") from None
        if not parts.hostname:
            raise UsageError(f"{uri}: an NBD address is nbd://HOST[:PORT]/EXPORT")
        return Address(export, host=parts.hostname, port=port)
    raise UsageError(f"{uri}: not an NBD address (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")


class NbdClient:
    """One connection to one export, used by one thread at a time."""

    def __init__(self, address: Address, contexts: list[str] | None = None, timeout: float = 60.0,
                 retry_while: Callable[[], bool] | None = None) -> None:
        """Connect and negotiate; a refused or missing socket is tried again every 10 ms while ``retry_while()``
        (a server being started)."""
        self.address = address
        self.size = 0
        self.flags = 0
        self.contexts: dict[int, str] = {}  # context id -> name, as the server agreed
        self._handle = 0
        self._inflight: dict[int, tuple[int, int]] = {}  # READs sent ahead: handle -> (offset, length)
        self._interrupted = False
        self._where = str(address)
        while True:
            try:
                self._sock = self._connect(timeout)
                break
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                if retry_while is None or not retry_while():
                    raise SourceError(f"cannot connect to the NBD server at {self._where}: {exc.strerror}") from None
                time.sleep(0.01)
            except OSError as exc:
                raise SourceError(f"cannot connect to the NBD server at {self._where}: "
                                  f"{exc.strerror or exc}") from None
        try:
            self._handshake(contexts or [])
        except BaseException:
            self._sock.close()
            raise

    def _connect(self, timeout: float) -> socket.socket:
        address = self.address
        if address.socket_path is None:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- handshake --------------------------------------------------------------------------------------------

    def _handshake(self, contexts: list[str]) -> None:
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not hflags & NBD_FLAG_FIXED_NEWSTYLE:
            raise SourceError(f"{self._where} is not an NBD server speaking the fixed newstyle protocol")
        self._no_zeroes = bool(hflags & NBD_FLAG_NO_ZEROES)
        self._sock.sendall(struct.pack(">I", NBD_FLAG_FIXED_NEWSTYLE | (NBD_FLAG_NO_ZEROES if self._no_zeroes else 0)))
        self.structured = self._simple_option(NBD_OPT_STRUCTURED_REPLY, b"")
        if contexts and self.structured:  # (the caller sees which contexts it got in ``contexts``)
            self._set_meta_context(contexts)
        name = self.address.export.encode()
        self._send_option(NBD_OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            rtype, data = self._option_reply(NBD_OPT_GO)
            if rtype == NBD_REP_ACK:
                break
            if rtype == NBD_REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == NBD_INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", data[2:12])
            elif rtype & NBD_REP_FLAG_ERROR:
                raise SourceError(f"the NBD server at {self._where} refused export "
                                  f"{self.address.export!r}: {_reply_text(rtype, data)}")
        self._sock.settimeout(None)

    def _set_meta_context(self, contexts: list[str]) -> None:
        name = self.address.export.encode()
        body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
        for c in contexts:
            body += struct.pack(">I", len(c.encode())) + c.encode()
        self._send_option(NBD_OPT_SET_META_CONTEXT, body)
        while True:
            rtype, data = self._option_reply(NBD_OPT_SET_META_CONTEXT)
            if rtype == NBD_REP_ACK:
                break
            if rtype == NBD_REP_META_CONTEXT and len(data) >= 4:
                self.contexts[struct.unpack(">I", data[:4])[0]] = data[4:].decode(errors="replace")
            elif rtype & NBD_REP_FLAG_ERROR:
                raise SourceError(f"the NBD server at {self._where} refused metadata contexts "
                                  f"{', '.join(contexts)}: {_reply_text(rtype, data)}")

    def _simple_option(self, option: int, body: bytes) -> bool:
        self._send_option(option, body)
        rtype, _ = self._option_reply(option)
        return rtype == NBD_REP_ACK

    def _send_option(self, option: int, body: bytes) -> None:
        self._sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(body)) + body)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self._recv_exact(20))
        if magic != NBD_REP_MAGIC or opt != option or length > 1 << 20:
            raise SourceError(f"the NBD server at {self._where} sent a malformed option reply")
        return rtype, self._recv_exact(length)

    # -- transmission -----------------------------------------------------------------------------------------

    def has_context(self, name: str) -> bool:
        return name in self.contexts.values()

    def _request(self, cmd: int, offset: int, length: int) -> int:
        self._handle += 1
        self._send(REQUEST.pack(NBD_REQUEST_MAGIC, 0, cmd, self._handle, offset, length))
        return self._handle

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise SourceError(f"the NBD server at {self._where} went away: {exc.strerror or exc}") from None

    def send_reads(self, offset: int, length: int) -> None:
        """Ask for ``length`` bytes at ``offset`` (requests of READ_PIECE bytes) without waiting for them: the
        server reads them while the caller works; :meth:`read_into` then receives them."""
        end = offset + length
        while offset < end:
            n = min(READ_PIECE, end - offset)
            self._inflight[self._request(NBD_CMD_READ, offset, n)] = (offset, n)
            offset += n

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the export's bytes at ``offset``: the reads sent ahead (all of them must lie in
        ``out``) and requests for the rest, all in flight at once, received straight into ``out``."""
        asked = offset
        for start, n in self._inflight.values():
            if not offset <= start <= start + n <= offset + len(out):
                raise AssertionError("reads sent ahead must lie in the buffer they are received into")
            asked = max(asked, start + n)
        self.send_reads(asked, offset + len(out) - asked)
        pending = {h: (start, out[start - offset : start - offset + n]) for h, (start, n) in self._inflight.items()}
        self._inflight.clear()
        while pending:
            self._read_reply(pending)

    def _read_reply(self, pending: dict[int, tuple[int, memoryview]]) -> None:
        magic = struct.unpack(">I", self._recv_exact(4))[0]
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            _, error, handle = SIMPLE_REPLY.unpack(struct.pack(">I", magic) + self._recv_exact(12))
            start, view = self._pending(pending, handle)
            if error:
                del pending[handle]
                raise SourceError(f"the NBD server at {self._where} failed a read at offset {start}: "
                                  f"error {error}")
            self._recv_into(view)
            del pending[handle]
            return
        if magic != NBD_STRUCTURED_REPLY_MAGIC:
            raise SourceError(f"the NBD server at {self._where} sent a malformed reply")
        flags, rtype, handle, length = _STRUCT_REST.unpack(self._recv_exact(16))
        start, view = self._pending(pending, handle)
        if rtype == NBD_REPLY_TYPE_OFFSET_DATA:
            at = struct.unpack(">Q", self._recv_exact(8))[0] - start
            if at < 0 or at + length - 8 > len(view):
                raise SourceError(f"the NBD server at {self._where} sent data outside the range asked for")
            self._recv_into(view[at : at + length - 8])
        elif rtype == NBD_REPLY_TYPE_OFFSET_HOLE:
            hole_at, hole_len = struct.unpack(">QI", self._recv_exact(12))
            at = hole_at - start
            if at < 0 or at + hole_len > len(view):
                raise SourceError(f"the NBD server at {self._where} sent a hole outside the range asked for")
            view[at : at + hole_len] = bytes(hole_len)
        elif rtype & NBD_REPLY_TYPE_ERROR_BIT:
            raise SourceError(f"the NBD server at {self._where} failed a read at offset {start}: "
                              f"{_error_text(self._recv_exact(length))}")
        else:
            self._recv_exact(length)
        if flags & NBD_REPLY_FLAG_DONE:
            del pending[handle]

    def _pending(self, pending: dict[int, tuple[int, memoryview]], handle: int) -> tuple[int, memoryview]:
        if handle not in pending:
            raise SourceError(f"the NBD server at {self._where} answered a request never made")
        return pending[handle]

    def block_status(self, offset: int, length: int) -> dict[str, list[tuple[int, int]]]:
        """``{context name: [(length, flags), ...]}`` from ``offset``, covering at most ``length`` bytes (a
        server may answer for less; each context's list starts at ``offset``)."""
        assert not self._inflight, "block status with reads in flight"
        handle = self._request(NBD_CMD_BLOCK_STATUS, offset, min(length, 0xFFFFFFFF))
        out: dict[str, list[tuple[int, int]]] = {}
        while True:
            magic = struct.unpack(">I", self._recv_exact(4))[0]
            if magic == NBD_SIMPLE_REPLY_MAGIC:
                _, error, _ = SIMPLE_REPLY.unpack(struct.pack(">I", magic) + self._recv_exact(12))
                raise SourceError(f"the NBD server at {self._where} failed a block status request at offset "
                                  f"{offset}: error {error}")
            if magic != NBD_STRUCTURED_REPLY_MAGIC:
                raise SourceError(f"the NBD server at {self._where} sent a malformed reply")
            flags, rtype, got, n = _STRUCT_REST.unpack(self._recv_exact(16))
            data = self._recv_exact(n)
            if got != handle:
                raise SourceError(f"the NBD server at {self._where} answered a request never made")
            if rtype == NBD_REPLY_TYPE_BLOCK_STATUS and n >= 4:
                cid = struct.unpack(">I", data[:4])[0]
                out[self.contexts.get(cid, str(cid))] = [
                    struct.unpack(">II", data[i : i + 8]) for i in range(4, n - 7, 8)]
            elif rtype & NBD_REPLY_TYPE_ERROR_BIT:
                raise SourceError(f"the NBD server at {self._where} failed a block status request at offset "
                                  f"{offset}: {_error_text(data)}")
            if flags & NBD_REPLY_FLAG_DONE:
                return out

    def extents(self, context: str, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """``(offset, length, flags)`` of ``context`` over ``[offset, end)``, merged where flags repeat."""
        end = self.size if end is None else end
        pos = offset
        last: tuple[int, int, int] | None = None
        while pos < end:
            got = self.block_status(pos, min(STATUS_SPAN, end - pos)).get(context)
            if not got:
                raise SourceError(f"the NBD server at {self._where} reported no {context} at offset {pos}")
            for length, flags in got:
                length = min(length, end - pos)
                if length <= 0:
                    break
                if last is not None and last[2] == flags:
                    last = (last[0], last[1] + length, flags)
                else:
                    if last is not None:
                        yield last
                    last = (pos, length, flags)
                pos += length
                if pos >= end:
                    break
        if last is not None:
            yield last

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = self._sock.recv_into(view[got:])
            except TimeoutError:
                raise SourceError(f"the NBD server at {self._where} did not answer in time") from None
            except OSError as exc:
                raise SourceError(f"the NBD server at {self._where} went away: {exc.strerror or exc}") from None
            if n == 0:
                raise SourceError(f"the NBD server at {self._where} closed the connection")
            got += n

    def interrupt(self) -> None:
        """Make a request waiting on the server fail at once (from another thread): the connection is shut."""
        self._interrupted = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        if self._interrupted:
            self._sock.close()
            return
        try:
            self._sock.sendall(REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self._sock.close()


def _reply_text(rtype: int, data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text or f"error {rtype & ~NBD_REP_FLAG_ERROR}"


def _error_text(data: bytes) -> str:
    if len(data) >= 6:
        errno_, mlen = struct.unpack(">IH", data[:6])
        msg = data[6 : 6 + mlen].decode(errors="replace").strip()
        return msg or f"error {errno_}"
    return "error"
