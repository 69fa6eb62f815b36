"""A TCP proxy that injects network and server faults between an HTTP client and a real server (issue 13 §2).

``FaultProxy(target_host, target_port)`` listens on 127.0.0.1 on a free port (``.endpoint`` is
``http://127.0.0.1:PORT``) and forwards to the target, one thread per direction per connection. It knows just
enough HTTP/1.1 to see where each request starts (the head up to the blank line, then a ``Content-Length`` or
chunked body), so a fault switched on meanwhile also hits the next request on a kept-alive connection, not
only new connections. What is not HTTP is forwarded as raw bytes.

Fault modes (each call replaces the one before; ``count=None`` means until changed, else the proxy goes back
to passing after that many faults):

- ``passthrough()``: forward both ways.
- ``refuse(count=None)``: a new connection, or the next request on an open one, is reset (RST) at once.
- ``drop_after(n_bytes, direction="up", count=1)``: forward, and cut (RST both sides) the connection that
  carries byte ``n_bytes + 1`` in that direction ("up": client to server, "down": server to client, "both"),
  counted over all connections from this call on; the count restarts after each cut.
- ``stall(count=None)``: the next requests are read and never answered (nothing is forwarded).
- ``http_5xx(status=503, count=1)``: the next requests are answered by the proxy itself with that status, a
  small S3-style XML error body and ``Connection: close``, without reaching the server.
- ``down()``: the server is gone, as a stopped process looks: the proxy stops listening (a connect is refused by
  the kernel) and resets every open connection; any other mode listens again on the same port (the proxy's
  port is chosen below the ephemeral range, so no outgoing connection takes it meanwhile).

Counters (ints, read them any time; ``stats()`` gives them as a dict, ``reset_counters()`` zeroes them):
``connections`` accepted, ``requests`` seen, ``refused`` (connections or requests reset), ``errors``
(requests answered with a 5xx), ``stalled`` (requests stalled), ``dropped`` (connections cut),
``bytes_up`` and ``bytes_down`` forwarded (``bytes_forwarded`` is their sum).

Use it as a context manager (``with FaultProxy(host, port) as proxy:``) or call ``close()``: it stops
listening, resets every open connection and joins its threads. All threads are daemons.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Callable
from http import HTTPStatus
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

Direction = Literal["up", "down", "both"]

_MAX_HEAD = 64 * 1024
_CHUNK = 64 * 1024
_S3_CODES = {500: "InternalError", 501: "NotImplemented", 502: "BadGateway", 503: "SlowDown",
             504: "GatewayTimeout"}


class _NotHttp(Exception):
    """The client's bytes are not an HTTP/1.x request stream: forward them raw."""


class _Cut(Exception):
    """This connection was cut (a fault, or the proxy closing)."""


def _abort(sock: socket.socket | None) -> None:
    """Wake whoever waits on ``sock`` and make its close a reset (RST), sending nothing now."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _listen(host: str, port: int | None) -> tuple[socket.socket, int]:
    """A listening socket on ``port``, or on a free port below the kernel's ephemeral range (so that no
    outgoing connection takes it while the proxy is down(), and it can listen on it again)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = [port] if port is not None else (
        [random.randrange(10000, low) for _ in range(50)] if low > 11000 else []) + [0]
    for candidate in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            if port is not None:
                raise
            continue
        sock.listen(128)
        return sock, sock.getsockname()[1]
    raise OSError("no free port")  # not reached: port 0 always binds


class _Reader:
    """Buffered reads from the client socket, for finding request boundaries."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(_CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def _until(self, separator: bytes) -> bytes | None:
        """The bytes up to and with ``separator``; None when the stream ends before any."""
        while True:
            end = self.buf.find(separator)
            if end >= 0:
                found = bytes(self.buf[: end + len(separator)])
                del self.buf[: end + len(separator)]
                return found
            if len(self.buf) > _MAX_HEAD:
                raise _NotHttp
            if not self._fill():
                if self.buf:
                    raise _Cut  # the client went away in the middle
                return None

    def head(self) -> bytes | None:
        """The next request's head up to and with the blank line; None at a clean end between requests."""
        return self._until(b"\r\n\r\n")

    def line(self) -> bytes:
        try:
            line = self._until(b"\r\n")
        except _NotHttp:
            raise _Cut from None
        if line is None:
            raise _Cut
        return line

    def some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one); _Cut at the end of the stream."""
        if not self.buf and not self._fill():
            raise _Cut
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data


class _Request:
    def __init__(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
            raise _NotHttp
        self.method = parts[0].decode("ascii").upper()
        self.target = parts[1].decode("latin-1")
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.decode("latin-1").partition(":")
                self.headers[name.strip().lower()] = value.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        try:
            self.length = 0 if self.chunked else int(self.headers.get("content-length", "0"))
        except ValueError:
            raise _NotHttp from None
        self.expects_continue = self.headers.get("expect", "").lower() == "100-continue"


class _Conn:
    """One client connection and, once a request is forwarded, its connection to the target."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.cut = False
        self.down_thread: threading.Thread | None = None

    def abort(self) -> None:
        self.cut = True
        _abort(self.client)
        _abort(self.upstream)


class FaultProxy:
    """A threaded TCP proxy to ``target_host:target_port`` with switchable faults (see the module's text)."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, int(target_port))
        self._lock = threading.Lock()
        self._mode = "pass"
        self._left: int | None = None  # faults still to inject in this mode; None: until changed
        self._status = 503
        self._drop_at = 0
        self._drop_dir: Direction = "up"
        self._drop_seen = 0
        self.reset_counters()
        self._conns: set[_Conn] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self.host = host
        self._listener, self.port = _listen(host, None)
        self.endpoint = f"http://{host}:{self.port}"
        self._acceptor = self._accepting()

    @classmethod
    def to(cls, endpoint: str) -> FaultProxy:
        """A proxy in front of ``http://host:port``."""
        parts = urlsplit(endpoint)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{endpoint!r}: expected http://host:port")
        return cls(parts.hostname, parts.port)

    def __repr__(self) -> str:
        return f"FaultProxy({self.endpoint} -> {self.target[0]}:{self.target[1]}, {self.mode})"

    # -- modes ------------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The fault in force: "pass", "refuse", "drop_after", "stall", "http_5xx" or "down"."""
        with self._lock:
            return self._mode

    def _set(self, mode: str, count: int | None) -> FaultProxy:
        if count is not None and count < 1:
            raise ValueError("count must be at least 1 (or None: until changed)")
        with self._lock:
            if self._closed:
                raise ValueError("the proxy is closed")
            was_down = self._mode == "down"
            self._mode, self._left = mode, count
            if was_down:  # listen again, on the same port
                self._listener, _ = _listen(self.host, self.port)
                self._acceptor = self._accepting()
        return self

    def down(self) -> FaultProxy:
        """The server is gone: stop listening (connecting is refused by the kernel, ECONNREFUSED) and reset
        every open connection. Any other mode listens again on the same port."""
        with self._lock:
            if self._closed:
                raise ValueError("the proxy is closed")
            if self._mode == "down":
                return self
            self._mode, self._left = "down", None
            listener, acceptor, conns = self._listener, self._acceptor, list(self._conns)
        self._stop_listening(listener, acceptor)
        for conn in conns:
            conn.abort()
        return self

    def passthrough(self) -> FaultProxy:
        return self._set("pass", None)

    def refuse(self, count: int | None = None) -> FaultProxy:
        return self._set("refuse", count)

    def stall(self, count: int | None = None) -> FaultProxy:
        return self._set("stall", count)

    def http_5xx(self, status: int = 503, count: int | None = 1) -> FaultProxy:
        if not 500 <= status <= 599:
            raise ValueError(f"status {status} is not a 5xx")
        with self._lock:
            self._status = status
        return self._set("http_5xx", count)

    def drop_after(self, n_bytes: int, direction: Direction = "up", count: int | None = 1) -> FaultProxy:
        if n_bytes < 0 or direction not in ("up", "down", "both"):
            raise ValueError("n_bytes must be >= 0 and direction one of up, down, both")
        with self._lock:
            self._drop_at, self._drop_dir, self._drop_seen = n_bytes, direction, 0
        return self._set("drop_after", count)

    def _take(self, *modes: str) -> str | None:
        """The fault to inject now if the mode is one of ``modes`` (using up one of its count), else None.
        Call with the lock held."""
        mode = self._mode
        if mode not in modes:
            return None
        if self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self._mode, self._left = "pass", None
        return mode

    # -- counters ---------------------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        with self._lock:
            self.connections = 0
            self.requests = 0
            self.refused = 0
            self.errors = 0
            self.stalled = 0
            self.dropped = 0
            self.bytes_up = 0
            self.bytes_down = 0

    @property
    def bytes_forwarded(self) -> int:
        return self.bytes_up + self.bytes_down

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"connections": self.connections, "requests": self.requests, "refused": self.refused,
                    "errors": self.errors, "stalled": self.stalled, "dropped": self.dropped,
                    "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    # -- life -------------------------------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener, acceptor, conns = self._listener, self._acceptor, list(self._conns)
        self._stop_listening(listener, acceptor)
        for conn in conns:
            conn.abort()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def _accepting(self) -> threading.Thread:
        thread = threading.Thread(target=self._accept_loop, args=(self._listener,), name=f"faultproxy-{self.port}",
                                  daemon=True)
        thread.start()
        return thread

    @staticmethod
    def _stop_listening(listener: socket.socket, acceptor: threading.Thread) -> None:
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (Linux)
        except OSError:
            pass
        acceptor.join(timeout=5)
        _close(listener)

    def _start(self, target: Callable[[_Conn], None], conn: _Conn, name: str) -> threading.Thread | None:
        thread = threading.Thread(target=self._run, args=(target, conn), name=name, daemon=True)
        with self._lock:
            if self._closed:
                return None
            self._threads.add(thread)
        thread.start()
        return thread

    def _run(self, target: Callable[[_Conn], None], conn: _Conn) -> None:
        try:
            target(conn)
        except (OSError, _Cut):
            conn.abort()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed, or down()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client)
            with self._lock:
                self.connections += 1
                refused = self._take("refuse") is not None or self._closed or self._mode == "down"
                if refused:
                    self.refused += 1
                else:
                    self._conns.add(conn)
            if refused:
                _abort(client)
                _close(client)
                continue
            if self._start(self._serve, conn, f"faultproxy-{self.port}-up") is None:
                with self._lock:
                    self._conns.discard(conn)
                _abort(client)
                _close(client)

    # -- one connection ---------------------------------------------------------------------------------------

    def _serve(self, conn: _Conn) -> None:
        """The client-to-server side: request by request, each checked against the fault in force."""
        graceful = False
        try:
            reader = _Reader(conn.client)
            while not conn.cut:
                try:
                    head = reader.head()
                except _NotHttp:
                    self._forward_up(conn, bytes(reader.buf))
                    reader.buf.clear()
                    while not conn.cut:
                        self._forward_up(conn, reader.some(_CHUNK))
                    break
                if head is None:  # the client closed between requests: pass the end on
                    graceful = True
                    break
                try:
                    request = _Request(head)
                except _NotHttp:
                    request = None
                with self._lock:
                    self.requests += 1
                    fault = self._take("refuse", "stall", "http_5xx")
                    status = self._status
                    if fault == "refuse":
                        self.refused += 1
                    elif fault == "stall":
                        self.stalled += 1
                if fault == "refuse":
                    break
                if fault == "stall":
                    while reader.some(_CHUNK):  # read and never answer, until the client gives up
                        pass
                if fault == "http_5xx" and request is not None:
                    self._answer_error(conn, reader, request, status)
                    return
                self._forward_up(conn, head)
                if request is None:
                    while not conn.cut:
                        self._forward_up(conn, reader.some(_CHUNK))
                    break
                self._body(reader, request, lambda data: self._forward_up(conn, data))
        except (OSError, _Cut):
            pass
        finally:
            self._finish(conn, graceful)

    def _finish(self, conn: _Conn, graceful: bool) -> None:
        """Close both sides: after a clean end of the client's requests, with FIN (the server closes its side
        and the server-to-client side drains), else (faults, errors) with a reset."""
        if graceful and conn.upstream is not None and not conn.cut:
            try:
                conn.upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            conn.abort()
        if conn.down_thread is not None:
            conn.down_thread.join(timeout=5)
            if conn.down_thread.is_alive():  # the server kept its side open: reset it
                conn.abort()
                conn.down_thread.join(timeout=5)
        _close(conn.client)
        _close(conn.upstream)
        with self._lock:
            self._conns.discard(conn)

    @staticmethod
    def _body(reader: _Reader, request: _Request, send: Callable[[bytes], object]) -> None:
        """Pass the body of ``request`` to ``send``, piece by piece as it comes."""
        if request.chunked:
            while True:
                line = reader.line()
                send(line)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _Cut from None
                if size == 0:
                    while True:  # trailers, up to the blank line
                        trailer = reader.line()
                        send(trailer)
                        if trailer == b"\r\n":
                            return
                left = size + 2  # the data and its CRLF
                while left:
                    data = reader.some(min(left, _CHUNK))
                    send(data)
                    left -= len(data)
        else:
            left = request.length
            while left > 0:
                data = reader.some(min(left, _CHUNK))
                send(data)
                left -= len(data)

    def _answer_error(self, conn: _Conn, reader: _Reader, request: _Request, status: int) -> None:
        """Answer ``request`` with ``status`` ourselves and close the connection gracefully."""
        if not request.expects_continue:
            self._body(reader, request, lambda data: None)  # read it all, so that closing does not reset
        code = _S3_CODES.get(status, "ServiceUnavailable")
        with self._lock:
            self.errors += 1
            number = self.errors
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>injected by FaultProxy</Message>"
                f"<Resource>{request.target.split('?')[0]}</Resource>"
                f"<RequestId>faultproxy-{number}</RequestId></Error>\n").encode()
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Server Error"
        head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nx-amz-request-id: faultproxy-{number}\r\n"
                "Connection: close\r\n\r\n").encode()
        conn.client.sendall(head if request.method == "HEAD" else head + body)
        conn.client.shutdown(socket.SHUT_WR)
        conn.client.settimeout(2.0)  # a lingering close: let the client see the answer before we go
        try:
            while conn.client.recv(_CHUNK):
                pass
        except OSError:
            pass
        _close(conn.client)  # a plain close (FIN already sent); _finish resets the server side

    def _forward_up(self, conn: _Conn, data: bytes) -> None:
        if conn.upstream is None:
            try:
                conn.upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                with self._lock:
                    self.refused += 1
                raise _Cut from None
            conn.upstream.settimeout(None)
            conn.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if conn.cut:
                raise _Cut
            conn.down_thread = self._start(self._pump_down, conn, f"faultproxy-{self.port}-down")
        self._send(conn, conn.upstream, "up", data)

    def _pump_down(self, conn: _Conn) -> None:
        """The server-to-client side: raw bytes, until the server closes or the connection is cut."""
        upstream = conn.upstream
        assert upstream is not None
        while not conn.cut:
            data = upstream.recv(_CHUNK)
            if not data:
                if not conn.cut:
                    try:
                        conn.client.shutdown(socket.SHUT_WR)  # the server closed: pass the end on
                    except OSError:
                        pass
                return
            self._send(conn, conn.client, "down", data)

    def _send(self, conn: _Conn, sock: socket.socket, direction: str, data: bytes) -> None:
        """Send ``data`` on ``sock``, or the part of it before a drop_after cut, then cut."""
        if not data:
            return
        cut_at = -1
        with self._lock:
            if self._mode == "drop_after" and self._drop_dir in (direction, "both"):
                if self._drop_seen + len(data) > self._drop_at:
                    cut_at = self._drop_at - self._drop_seen
                    self._drop_seen = 0
                    self._take("drop_after")
                    self.dropped += 1
                else:
                    self._drop_seen += len(data)
        if conn.cut:
            raise _Cut
        part = data if cut_at < 0 else data[:cut_at]
        if part:
            sock.sendall(part)
            with self._lock:
                if direction == "up":
                    self.bytes_up += len(part)
                else:
                    self.bytes_down += len(part)
        if cut_at >= 0:
            conn.abort()
            raise _Cut
