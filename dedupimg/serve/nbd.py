"""A read-only NBD server for snapshots: ``dedupimg serve``.

It speaks the fixed newstyle handshake of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md; constants
below are named as there): NBD_OPT_EXPORT_NAME, LIST, INFO, GO, ABORT, STRUCTURED_REPLY and the
``base:allocation`` metadata context, so that clients (qemu, nbdcopy, nbdinfo) see zero extents as holes.
In transmission it answers READ, FLUSH, BLOCK_STATUS and DISC; writes, trims and write-zeroes get EPERM.

Each export is a snapshot, named by anything :meth:`Repository.resolve` accepts. Data comes from one
:class:`SnapshotReader` per snapshot, shared by every connection; it verifies each chunk, so a damaged chunk
becomes an EIO reply, never wrong bytes. One thread serves each connection; a client that breaks the
protocol loses its own connection and nothing else. At most MAX_CONNECTIONS are open at once (one more is
closed before the greeting), and each has NEGOTIATION_SECONDS in all to reach transmission.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from dedupimg.core.envints import env_int
from dedupimg.core.errors import DedupimgError, IntegrityError, Interrupted, ListenError, SnapshotNotFound, UsageError
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.nbdproto import (
    BASE_ALLOCATION,
    CHUNK,
    DEFAULT_PORT,
    GREETING,
    IHAVEOPT,
    MAX_REQUEST,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_EPERM,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    REQUEST,
    SIMPLE_REPLY,
)
from dedupimg.repo.repository import Repository
from dedupimg.serve.reader import SnapshotReader

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"

# -- limits: what a client may ask of us before it is refused -----------------------------------------------
MAX_OPTION_DATA = 64 << 10  # an option carries at most a few 4 KiB strings; more is garbage or an attack
SEND_PIECES = 512  # buffers per sendmsg, under Linux's IOV_MAX of 1024
# A READ is read and sent in pieces of at most READ_PIECE bytes, each in a buffer lent for that request from
# a pool of REPLY_BUFFERS shared by every connection: reply memory is at most 1 MiB per connection and 32 MiB
# in all, however many clients connect and however large their reads (an idle client holds none).
READ_PIECE = 1 << 20
REPLY_BUFFERS = 32
MAX_STRING = 4096  # proto.md: names, descriptions and messages are at most 4096 bytes (longer breaks clients)
MAX_STATUS_SPAN = 256 << 20  # BLOCK_STATUS answers at most this much per request (the spec allows less)
# A connection has this many seconds from accept to the transmission phase, however it spends them (one
# option every few seconds, a byte at a time): it held its thread for ever when the limit was per receive.
NEGOTIATION_SECONDS = env_int("DEDUPIMG_NBD_NEGOTIATION_SECONDS", 60, 1, 3600)
# Connections open at once (one thread each); one more is closed at once, before the greeting.
MAX_CONNECTIONS = env_int("DEDUPIMG_NBD_MAX_CONNECTIONS", 128, 1, 65536)
NOTICE_SECONDS = 10.0  # at most one log line per kind of refusal this often, however many clients are refused
SEND_TIMEOUT = 60  # seconds a reply may wait for a client that does not read it before the connection ends
SHUTDOWN_GRACE = 5.0  # seconds connections get to finish the request in flight when the server stops
KEEP_READERS = 16  # snapshot readers kept for new connections (each caches up to 64 MiB of chunks)

# Our transmission flags. CAN_MULTI_CONN is true of a read-only export: every connection sees the same bytes.
TRANSMISSION_FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN
BASE_ALLOCATION_ID = 1  # our one metadata context's id (any value unique per connection would do)


@dataclass(frozen=True)
class Export:
    name: str  # canonical: the snapshot's full id
    record: SnapshotRecord
    reader: SnapshotReader

    @property
    def description(self) -> str:
        return _describe(self.record)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6ADDR]:PORT`` -> (host, port); UsageError otherwise."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT (like {DEFAULT_HOST}:{DEFAULT_PORT})")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether a server listening on ``host`` is reachable from this machine only.

    True for 127.0.0.0/8 and ::1 (an IPv4-mapped one too) and for a name every address of which is one of those
    (``localhost``). False for the all-interfaces addresses 0.0.0.0 and ::, for any other address, for a name
    that resolves to any other address, and for a name that does not resolve.
    """
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(_loopback_address(str(a)) for a in addresses)


def _loopback_address(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])  # without an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class NbdServer:
    """Serves snapshots of ``repo`` over NBD until :meth:`shutdown`.

    With no ``refs`` every snapshot is exported, including those taken while serving; otherwise only the
    snapshots ``refs`` resolve to now. Resolving and binding happen here, so a bad reference or a taken
    port fails before anything is served (SnapshotNotFound, AmbiguousSnapshot, ListenError).
    """

    def __init__(
        self,
        repo: Repository,
        refs: Sequence[str] = (),
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        max_connections: int = MAX_CONNECTIONS,
        negotiation_seconds: float = NEGOTIATION_SECONDS,
    ) -> None:
        self.repo = repo
        self.max_connections = max_connections
        self.negotiation_seconds = negotiation_seconds
        self._open = 0  # connections accepted and not yet closed
        self._notices: dict[str, tuple[float, int]] = {}  # kind -> (when last logged, how many since)
        self._lock = threading.Lock()
        self._exports: dict[bytes, Export] = {}  # by snapshot id, least recently asked for first
        self._fixed: list[SnapshotRecord] | None = None
        self._aliases: dict[str, SnapshotRecord] = {}  # refs as given: `latest` stays what it was at start
        if refs:
            self._fixed = []
            for ref in refs:
                rec = repo.resolve(ref)
                self._aliases[ref] = rec
                if all(r.id != rec.id for r in self._fixed):
                    self._fixed.append(rec)
        self._sessions: dict[socket.socket, threading.Thread] = {}
        self.reply_buffers = _ReplyBuffers(READ_PIECE, REPLY_BUFFERS)
        self._serving = self._closed = False
        self._stopped = threading.Event()  # serve_forever has returned (or raised)
        try:
            self._tcp = _TCPServer(self, host, port)
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        repo.start_read_pool()  # worker processes decompress and verify for the connections (readpool.py)

    # -- exports --------------------------------------------------------------------------------------------

    def records(self) -> list[SnapshotRecord]:
        """The exported snapshots as NBD_OPT_LIST shows them; the first is the default export.

        Without refs, newest first: the default export is then the latest snapshot.
        """
        if self._fixed is not None:
            return list(self._fixed)
        return self.repo.snapshots()[::-1]

    def lookup(self, name: str) -> Export:
        """The export a client asks for by name; SnapshotNotFound or AmbiguousSnapshot if none."""
        if name == "" and self._fixed is None:
            # The newest snapshot, as `latest`: refused (AmbiguousSnapshot) when several images are stored,
            # so that a client that names no export never boots another machine's disk.
            rec = self.repo.resolve("latest")
        elif name == "":
            records = self.records()
            if not records:
                raise SnapshotNotFound("no snapshot to serve as the default export")
            rec = records[0]
        elif name in self._aliases:
            rec = self._aliases[name]
        else:
            rec = self.repo.resolve(name)
            if self._fixed is not None and all(r.id != rec.id for r in self._fixed):
                raise SnapshotNotFound(f"snapshot {rec.short_id} is not exported by this server")
        # Connections to one snapshot share its reader (and its cache). Only the most recent few are kept
        # here; an evicted reader lives on as long as the connections that use it.
        with self._lock:
            export = self._exports.pop(rec.id, None) or Export(rec.hex_id, rec, SnapshotReader(self.repo, rec))
            self._exports[rec.id] = export
            while len(self._exports) > KEEP_READERS:
                del self._exports[next(iter(self._exports))]
        return export

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._tcp.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"nbd://[{host}]:{port}" if ":" in host else f"nbd://{host}:{port}"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        with self._lock:
            if self._closed:
                return
            self._serving = True
        try:
            self._tcp.serve_forever(poll_interval)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop accepting, let each connection finish the request in flight, close everything."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            serving = self._serving
        if serving and not self._stopped.is_set():
            self._tcp.shutdown()  # waits for the loop; must not be called when it never ran or has ended
        self._tcp.server_close()
        with self._lock:
            sessions = dict(self._sessions)
        # SHUT_RD: the next read of each connection sees end of file, while a reply being sent completes.
        for sock in sessions:
            _quietly(sock.shutdown, socket.SHUT_RD)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for sock, thread in sessions.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # stuck sending to a client that does not read
                _quietly(sock.shutdown, socket.SHUT_RDWR)
                thread.join(1.0)

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _register(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._sessions[sock] = threading.current_thread()
            return True

    def _unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._sessions.pop(sock, None)

    def _admit(self) -> bool:
        """Count a new connection in, unless MAX_CONNECTIONS are open (then it is to be closed at once)."""
        with self._lock:
            if self._open >= self.max_connections:
                return False
            self._open += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._open -= 1

    def notice(self, kind: str, message: str) -> None:
        """Log ``message`` (a warning: on stderr), at most once per NOTICE_SECONDS for each ``kind``, saying how
        many more of the kind there were: a flood of hostile clients must not become a flood of lines."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._notices.get(kind, (float("-inf"), 0))
            if now - last < NOTICE_SECONDS:
                self._notices[kind] = (last, skipped + 1)
                return
            self._notices[kind] = (now, 0)
        more = f" (and {skipped} more like it since the last such line)" if skipped else ""
        log.warning("%s%s", message, more)


def serve(
    repo: Repository,
    refs: Sequence[str] = (),
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    ready: Callable[[NbdServer], None] | None = None,
) -> None:
    """Serve ``refs`` (every snapshot when empty) of ``repo`` on ``host:port`` until a signal: ``dedupimg serve``.

    ``ready`` is called with the listening server before the first connection is accepted. Interrupted (a
    signal, as the CLI's handler raises it) is how a server is stopped: this then returns normally, after
    :meth:`NbdServer.shutdown`. A bad reference or a taken port fails before anything is served.
    """
    server = NbdServer(repo, refs, host, port)
    try:
        if ready is not None:
            ready(server)
        server.serve_forever()
    except Interrupted:
        pass  # a signal is how a server is stopped: a normal exit, not an error
    finally:
        server.shutdown()


class _ReplyBuffers:
    """The buffers READ replies are read into, shared by every connection: at most ``count`` buffers of
    ``size`` bytes ever exist; a connection borrows one for a request and gives it back when the reply is
    sent (a request waits when all are out). Made once and kept: a fresh buffer per request would cost a page
    fault on every byte."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._count = count
        self._free: list[bytearray] = []
        self._made = 0
        self._cond = threading.Condition()

    @contextmanager
    def lend(self) -> Iterator[memoryview]:
        with self._cond:
            while not self._free and self._made >= self._count:
                self._cond.wait()
            buf = self._free.pop() if self._free else None
            if buf is None:
                self._made += 1
        if buf is None:
            buf = bytearray(self.size)
        try:
            yield memoryview(buf)
        finally:
            with self._cond:
                self._free.append(buf)
                self._cond.notify()


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # a restarted server can bind while old connections sit in TIME_WAIT
    daemon_threads = True  # NbdServer.shutdown joins them itself, with a deadline
    block_on_close = False
    # socketserver's default backlog of 5 drops the SYNs of clients that connect at once (nbdcopy opens 4
    # connections, a host boots many VMs): they then hang in TCP's retry backoff. Take the system's maximum.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, nbd: NbdServer, host: str, port: int) -> None:
        self.nbd = nbd
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        nbd = self.nbd
        if not nbd._admit():
            nbd.notice("full", f"dedupimg serve: refused a connection from {_peer(client_address)}: "
                               f"{nbd.max_connections} connections are open, the limit "
                               "(DEDUPIMG_NBD_MAX_CONNECTIONS)")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            nbd._leave()  # no thread was started to do it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.nbd._leave()

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, Interrupted):
            # A signal (the CLI's handler raises Interrupted) that landed while this thread was starting a
            # connection's thread: socketserver would swallow it here and serve on. Stop, as anywhere else.
            raise exc
        log.debug("connection from %s failed", client_address, exc_info=True)


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer
    request: socket.socket

    def handle(self) -> None:
        nbd = self.server.nbd
        if not nbd._register(self.request):
            return
        try:
            _Session(nbd, self.request, self.client_address).run()
        finally:
            nbd._unregister(self.request)


class _Close(Exception):
    """The client broke the protocol or left: drop this connection (a 'hard disconnect')."""


class _Invalid(Exception):
    """Option data that does not parse: NBD_REP_ERR_INVALID."""


class _CommandError(Exception):
    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


OptionHandler = Callable[["_Session", int, bytes], Export | None]
CommandHandler = Callable[["_Session", Export, int, int, int, int], None]


class _Session:
    """One client connection: the handshake, then the transmission loop."""

    def __init__(self, server: NbdServer, sock: socket.socket, peer: object = None) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        # Until transmission: when negotiation must be over. Its receives and sends then wait at most until
        # this moment, and its receives read the socket itself (the buffered rfile would wait anew per read).
        self.deadline: float | None = time.monotonic() + server.negotiation_seconds
        self.rfile = sock.makefile("rb")
        self.no_zeroes = False
        self.structured = False
        self.meta_for: bytes | None = None  # snapshot id base:allocation was selected for

    def run(self) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies go out whole, at once
            export = self.handshake()
            if export is not None:
                self.transmit(export)
        except (_Close, OSError):
            pass  # the client left, was too slow, or broke the protocol: nothing to report
        except Exception:  # noqa: BLE001  (a bug must cost one connection, not the server)
            log.debug("NBD connection failed", exc_info=True)
        finally:
            _quietly(self.rfile.close)

    # -- wire helpers ---------------------------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        if self.deadline is not None:
            return self._recv_by_deadline(n)
        data = self.rfile.read(n)
        if data is None or len(data) != n:
            raise _Close
        return data

    def _recv_by_deadline(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            self._wait_at_most_until_deadline()
            try:
                part = self.sock.recv(n - len(data))
            except TimeoutError:
                self._late()
            if not part:
                raise _Close
            data += part
        return bytes(data)

    def _wait_at_most_until_deadline(self) -> None:
        assert self.deadline is not None
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._late()
        self.sock.settimeout(left)

    def _late(self) -> NoReturn:
        self.server.notice("late", f"dedupimg serve: closed the connection from {_peer(self.peer)}: still "
                                   f"negotiating after {self.server.negotiation_seconds:g} s "
                                   "(DEDUPIMG_NBD_NEGOTIATION_SECONDS)")
        raise _Close

    def send(self, *parts: bytes | memoryview) -> None:
        """Send the pieces in order, gathered by the kernel (sendmsg): image data is never joined first."""
        pending = [memoryview(p).cast("B") for p in parts if len(p)]
        while pending:
            if self.deadline is None:
                sent = self.sock.sendmsg(pending[:SEND_PIECES])
            else:  # a client that does not read its option replies is held to the deadline too
                self._wait_at_most_until_deadline()
                try:
                    sent = self.sock.sendmsg(pending[:SEND_PIECES])
                except TimeoutError:
                    self._late()
            while sent and pending:
                if sent >= len(pending[0]):
                    sent -= len(pending.pop(0))
                else:
                    pending[0] = pending[0][sent:]
                    sent = 0

    def reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self.send(OPTION_REPLY.pack(NBD_REP_MAGIC, option, reply_type, len(data)), data)

    # -- handshake ------------------------------------------------------------------------------------------

    def handshake(self) -> Export | None:
        self.send(GREETING.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", self.recv(4))
        if client_flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise _Close  # proto.md: the server MUST drop a client that sets flags it does not know
        self.no_zeroes = bool(client_flags & NBD_FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = OPTION.unpack(self.recv(OPTION.size))
            if magic != IHAVEOPT or length > MAX_OPTION_DATA:
                raise _Close  # garbage, or a length we will not buffer: no way to find the next option
            data = self.recv(length)
            handler = OPTION_HANDLERS.get(option)
            if handler is None:
                self.reply(option, NBD_REP_ERR_UNSUP, b"option not supported by dedupimg")
                continue
            export = handler(self, option, data)
            if export is not None:
                self.deadline = None
                self.sock.settimeout(None)  # an idle client (a VM that reads nothing) is fine from here on
                # ... but one that stops reading its replies is not: a send blocked this long ends the
                # connection, which returns its reply buffer to the pool of 32 that every connection shares
                # (found by review: 32 such clients stopped every other client's reads for good).
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
                return export

    def opt_export_name(self, option: int, data: bytes) -> Export:
        try:
            export = self.server.lookup(data.decode())
        except (UnicodeDecodeError, DedupimgError):
            raise _Close from None  # this option cannot carry an error: proto.md says end the session
        zeroes = b"" if self.no_zeroes else bytes(124)
        self.send(struct.pack(">QH", export.reader.size, TRANSMISSION_FLAGS), zeroes)
        return export

    def opt_abort(self, option: int, data: bytes) -> None:
        _quietly(self.reply, option, NBD_REP_ACK)  # the client may not wait for it
        raise _Close

    def opt_list(self, option: int, data: bytes) -> None:
        if data:
            return self.reply(option, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
        try:
            records = self.server.records()
        except DedupimgError as exc:
            return self.reply(option, NBD_REP_ERR_POLICY, _wire(str(exc)))
        for rec in records:
            name = rec.hex_id.encode()
            self.reply(option, NBD_REP_SERVER, struct.pack(">I", len(name)) + name + _describe(rec).encode())
        self.reply(option, NBD_REP_ACK)

    def opt_info(self, option: int, data: bytes) -> Export | None:
        """NBD_OPT_INFO and NBD_OPT_GO: the same replies; GO then enters transmission."""
        try:
            name, pos = _string(data, 0)
            (count,) = struct.unpack_from(">H", data, pos)
            if len(data) != pos + 2 + 2 * count:
                raise _Invalid
            requests = struct.unpack_from(f">{count}H", data, pos + 2)
        except (_Invalid, struct.error, UnicodeDecodeError):
            self.reply(option, NBD_REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO request")
            return None
        try:
            export = self.server.lookup(name)
        except DedupimgError as exc:
            self.reply(option, NBD_REP_ERR_UNKNOWN, _wire(str(exc)))
            return None
        self.reply(option, NBD_REP_INFO, struct.pack(">HQH", NBD_INFO_EXPORT, export.reader.size, TRANSMISSION_FLAGS))
        # Sent whether asked or not (allowed): it tells clients our request cap before they hit it.
        self.reply(option, NBD_REP_INFO, struct.pack(">HIII", NBD_INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        if NBD_INFO_NAME in requests:
            self.reply(option, NBD_REP_INFO, struct.pack(">H", NBD_INFO_NAME) + export.name.encode())
        if NBD_INFO_DESCRIPTION in requests:
            self.reply(option, NBD_REP_INFO, struct.pack(">H", NBD_INFO_DESCRIPTION) + export.description.encode())
        self.reply(option, NBD_REP_ACK)
        return export if option == NBD_OPT_GO else None

    def opt_structured_reply(self, option: int, data: bytes) -> None:
        if data:
            return self.reply(option, NBD_REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
        self.structured = True
        self.reply(option, NBD_REP_ACK)

    def opt_meta_context(self, option: int, data: bytes) -> None:
        """LIST_META_CONTEXT and SET_META_CONTEXT: we know one context, base:allocation."""
        setting = option == NBD_OPT_SET_META_CONTEXT
        if setting:
            self.meta_for = None  # proto.md: SET replaces the selection, even when it fails
            if not self.structured:
                return self.reply(option, NBD_REP_ERR_INVALID, b"negotiate structured replies first")
        try:
            name, pos = _string(data, 0)
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                query, pos = _string(data, pos)
                queries.append(query)
            if pos != len(data):
                raise _Invalid
        except (_Invalid, struct.error, UnicodeDecodeError):
            return self.reply(option, NBD_REP_ERR_INVALID, b"malformed meta context request")
        try:
            export = self.server.lookup(name)
        except DedupimgError as exc:
            return self.reply(option, NBD_REP_ERR_UNKNOWN, _wire(str(exc)))
        if setting:
            # `base:` alone selects nothing when setting; unknown namespaces and leaves are ignored.
            found = BASE_ALLOCATION in queries
            if found:
                self.meta_for = export.record.id
            context_id = BASE_ALLOCATION_ID
        else:
            found = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
            context_id = 0  # proto.md: ids in LIST replies are reserved, zero
        if found:
            self.reply(option, NBD_REP_META_CONTEXT, struct.pack(">I", context_id) + BASE_ALLOCATION.encode())
        self.reply(option, NBD_REP_ACK)

    # -- transmission ---------------------------------------------------------------------------------------

    def transmit(self, export: Export) -> None:
        while True:
            magic, flags, command, handle, offset, length = REQUEST.unpack(self.recv(REQUEST.size))
            if magic != NBD_REQUEST_MAGIC:
                raise _Close  # lost framing: nothing after this can be trusted
            if command == NBD_CMD_DISC:
                return
            if command == NBD_CMD_WRITE:
                # The payload must be read to find the next request; one past the cap is treated as
                # an attack (proto.md allows the hard disconnect) rather than skipped.
                if length > MAX_REQUEST:
                    raise _Close
                self.skip(length)
            handler = COMMAND_HANDLERS.get(command)
            try:
                if handler is None:
                    raise _CommandError(NBD_EINVAL, f"unknown command {command}")
                handler(self, export, flags, handle, offset, length)
            except _CommandError as exc:
                self.error(handle, exc.error, str(exc))
            except IntegrityError as exc:
                self.error(handle, NBD_EIO, str(exc))  # damaged data: an error, never wrong bytes

    def skip(self, length: int) -> None:
        while length:
            length -= len(self.recv(min(length, 1 << 16)))

    def chunk(self, flags: int, reply_type: int, handle: int, payload: bytes) -> bytes:
        return CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, len(payload)) + payload

    def error(self, handle: int, error: int, message: str) -> None:
        if self.structured:
            text = _wire(message)
            payload = struct.pack(">IH", error, len(text)) + text
            self.send(self.chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, handle, payload))
        else:
            self.send(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, handle))

    @staticmethod
    def check(export: Export, flags: int, allowed: int, offset: int, length: int) -> None:
        if flags & ~allowed:
            raise _CommandError(NBD_EINVAL, f"unsupported command flags {flags:#x}")
        if offset + length > export.reader.size:
            raise _CommandError(NBD_EINVAL, f"request [{offset}, +{length}) is past the end ({export.reader.size})")

    def cmd_read(self, export: Export, flags: int, handle: int, offset: int, length: int) -> None:
        self.check(export, flags, NBD_CMD_FLAG_FUA, offset, length)
        if length > MAX_REQUEST:
            raise _CommandError(NBD_EINVAL, f"read of {length} bytes is over the {MAX_REQUEST} byte limit")
        if self.structured and length == 0:
            return self.send(self.chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, b""))
        # Data is read (and verified) into a buffer lent by the server's pool, at most READ_PIECE bytes at a
        # time, and each piece is sent before the next is read: a large read costs no more memory than a small
        # one, and being copied out of the shared chunk cache, a slow client holds no cache slot. Damage found
        # before anything was sent is a clean error reply. Found later, a structured reply ends with an error
        # chunk (the client fails the whole read); a simple reply cannot carry an error after its data, so the
        # connection is dropped (proto.md's hard disconnect): no client ever takes wrong bytes for good ones.
        with self.server.reply_buffers.lend() as buf:
            if self.structured:
                return self._read_structured(export, handle, offset, length, buf)
            pos, end = offset, offset + length
            while True:
                data = buf[: min(len(buf), end - pos)]
                try:
                    export.reader.read_into(pos, data)
                except IntegrityError:
                    if pos != offset:
                        raise _Close from None
                    raise
                header = [SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle)] if pos == offset else []
                self.send(*header, data)
                pos += len(data)
                if pos == end:
                    return

    def _read_structured(self, export: Export, handle: int, offset: int, length: int, buf: memoryview) -> None:
        """Holes as hole chunks (never read); data as data chunks of at most ``len(buf)`` bytes."""
        runs = export.reader.is_zero_range(offset, length)
        parts: list[bytes | memoryview] = []  # holes go out with the next data, or at the end
        for i, (start, n, zero) in enumerate(runs):
            last = i == len(runs) - 1
            if zero:
                done = NBD_REPLY_FLAG_DONE if last else 0
                parts.append(self.chunk(done, NBD_REPLY_TYPE_OFFSET_HOLE, handle, struct.pack(">QI", start, n)))
                continue
            for at in range(start, start + n, len(buf)):
                data = buf[: min(len(buf), start + n - at)]
                export.reader.read_into(at, data)
                done = NBD_REPLY_FLAG_DONE if last and at + len(data) == start + n else 0
                parts.append(CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, done, NBD_REPLY_TYPE_OFFSET_DATA, handle,
                                        8 + len(data)))
                parts.append(struct.pack(">Q", at))
                parts.append(data)
                self.send(*parts)
                parts = []
        if parts:
            self.send(*parts)

    def cmd_flush(self, export: Export, flags: int, handle: int, offset: int, length: int) -> None:
        self.check(export, flags, NBD_CMD_FLAG_FUA, offset, length)
        self.send(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle))  # nothing is ever written

    def cmd_refuse(self, export: Export, flags: int, handle: int, offset: int, length: int) -> None:
        raise _CommandError(NBD_EPERM, "the export is read-only")

    def cmd_block_status(self, export: Export, flags: int, handle: int, offset: int, length: int) -> None:
        if not self.structured or self.meta_for != export.record.id:
            raise _CommandError(NBD_EINVAL, "base:allocation was not selected for this export")
        self.check(export, flags, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE, offset, length)
        if length == 0:
            raise _CommandError(NBD_EINVAL, "block status of an empty range")
        runs = export.reader.is_zero_range(offset, min(length, MAX_STATUS_SPAN))
        if flags & NBD_CMD_FLAG_REQ_ONE:
            runs = runs[:1]
        payload = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(
            struct.pack(">II", n, NBD_STATE_HOLE | NBD_STATE_ZERO if zero else 0) for _, n, zero in runs
        )
        self.send(self.chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, handle, payload))


OPTION_HANDLERS: dict[int, OptionHandler] = {
    NBD_OPT_EXPORT_NAME: _Session.opt_export_name,
    NBD_OPT_ABORT: _Session.opt_abort,
    NBD_OPT_LIST: _Session.opt_list,
    NBD_OPT_INFO: _Session.opt_info,
    NBD_OPT_GO: _Session.opt_info,
    NBD_OPT_STRUCTURED_REPLY: _Session.opt_structured_reply,
    NBD_OPT_LIST_META_CONTEXT: _Session.opt_meta_context,
    NBD_OPT_SET_META_CONTEXT: _Session.opt_meta_context,
}

COMMAND_HANDLERS: dict[int, CommandHandler] = {
    NBD_CMD_READ: _Session.cmd_read,
    NBD_CMD_WRITE: _Session.cmd_refuse,
    NBD_CMD_FLUSH: _Session.cmd_flush,
    NBD_CMD_TRIM: _Session.cmd_refuse,
    NBD_CMD_WRITE_ZEROES: _Session.cmd_refuse,
    NBD_CMD_BLOCK_STATUS: _Session.cmd_block_status,
}


def _string(data: bytes, pos: int) -> tuple[str, int]:
    """A 32-bit length and that many UTF-8 bytes at ``pos``; returns the string and the position after it."""
    (n,) = struct.unpack_from(">I", data, pos)
    end = pos + 4 + n
    if end > len(data) or n > 4096:  # proto.md: strings MUST be no longer than 4096 bytes
        raise _Invalid
    return data[pos + 4 : end].decode(), end


def _describe(rec: SnapshotRecord) -> str:
    """Name, time and size, within the spec's MAX_STRING bytes: a longer description makes libnbd refuse the
    whole export list. A name too long is cut (marked with '...'); time and size always fit."""
    tail = f" {rec.time} ({rec.size} bytes)"
    return _wire(rec.name, MAX_STRING - len(tail.encode())).decode() + tail


def _wire(text: str, limit: int = MAX_STRING) -> bytes:
    """``text`` as UTF-8 of at most ``limit`` bytes: cut at a character boundary and marked with '...'."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[: max(0, limit - 3)].decode(errors="ignore").encode() + b"..."


def _peer(address: object) -> str:
    """A client's address as HOST:PORT for a log line."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _quietly(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except OSError:
        pass
