"""`dedupimg serve`: real NBD clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and raw sockets against the server."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.repository import Repository
from dedupimg.serve import nbd
from tests.helpers import ROOT, cli_env, det_bytes, first_line, ok, run_cli, small_repo, text_bytes
from tests.integration.support import RawClient, build, flip_byte_in_chunk, start, stop

MiB = 1 << 20
KiB = 1 << 10

# Two versions of a sparse disk: data pieces at their offsets, holes everywhere else.
V1_SIZE = 6 * MiB
V1_PIECES = [(0, text_bytes(1, 512 * KiB)), (2 * MiB, det_bytes(2, MiB)), (5 * MiB, text_bytes(3, 512 * KiB))]
V2_SIZE = 7 * MiB  # a different size tells the versions apart in nbdinfo's output
V2_PIECES = [(0, text_bytes(4, 512 * KiB)), *V1_PIECES[1:], (6 * MiB + 256 * KiB, det_bytes(5, 256 * KiB))]


@dataclass
class Served:
    repo: Repository
    server: nbd.NbdServer
    port: int
    ids: list[str]  # oldest first
    images: dict[str, bytes]  # by snapshot id

    def uri(self, name: str = "") -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("nbd")
    repo = small_repo(tmp / "repo")
    images = {}
    for day, (size, pieces) in enumerate([(V1_SIZE, V1_PIECES), (V2_SIZE, V2_PIECES)], start=1):
        data = build(tmp / "disk.img", size, pieces)
        rec = take_snapshot(repo, str(tmp / "disk.img"), name="disk", when=datetime(2026, 1, day, tzinfo=UTC)).record
        images[rec.hex_id] = data
    running = start(repo)
    yield Served(repo, running.server, running.port, list(images), images)
    stop(running)
    repo.close()


def tool(*args: str | os.PathLike[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def export_size(uri: str) -> int:
    doc = json.loads(ok(tool("nbdinfo", "--no-content", "--json", uri)))
    return int(doc["exports"][0]["export-size"])


def assert_alive(s: Served) -> None:
    """A real client still gets the right export after whatever the previous client did."""
    assert export_size(s.uri(s.ids[0])) == V1_SIZE


# -- real clients ---------------------------------------------------------------------------------------------


def test_list_shows_every_snapshot_newest_first(served):
    doc = json.loads(ok(tool("nbdinfo", "--list", "--json", served.uri())))
    exports = doc["exports"]
    assert [e["export-name"] for e in exports] == served.ids[::-1]
    assert [e["export-size"] for e in exports] == [V2_SIZE, V1_SIZE]
    for e in exports:
        assert e["is_read_only"] is True and e["can_flush"] is True and e["can_trim"] is False
        assert "base:allocation" in e["contexts"]
        assert e["description"].startswith("disk 2026-01-0")


@pytest.mark.parametrize("version", [0, 1])
def test_map_shows_holes_where_the_image_has_holes(served, version):
    sid = served.ids[version]
    size, pieces = [(V1_SIZE, V1_PIECES), (V2_SIZE, V2_PIECES)][version]
    extents = json.loads(ok(tool("nbdinfo", "--map", "--json", served.uri(sid))))
    # The map covers the export exactly, in order.
    assert extents[0]["offset"] == 0
    for a, b in zip(extents, extents[1:], strict=False):
        assert a["offset"] + a["length"] == b["offset"]
    assert extents[-1]["offset"] + extents[-1]["length"] == size
    # Data pieces are data (type 0); everything else is a hole that reads as zeros (type 3).
    data = [(off, off + len(d)) for off, d in pieces]
    for e in extents:
        lo, hi = e["offset"], e["offset"] + e["length"]
        inside = [(a, b) for a, b in data if a < hi and lo < b]
        if e["type"] == 0:
            assert inside and all(a <= lo and hi <= b for a, b in inside), e
        else:
            assert e["type"] == 3 and e["description"] == "hole,zero" and not inside, e
    assert sum(e["length"] for e in extents if e["type"] == 3) == size - sum(len(d) for _, d in pieces)


def test_nbdcopy_and_qemu_img_copies_are_bit_exact(served, tmp_path):
    for sid in served.ids:
        out = tmp_path / f"nbdcopy-{sid[:8]}.img"
        ok(tool("nbdcopy", served.uri(sid), out))
        assert out.read_bytes() == served.images[sid]
        out = tmp_path / f"qemu-{sid[:8]}.img"
        ok(tool("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri(sid), out))
        assert out.read_bytes() == served.images[sid]


def test_export_names_resolve_like_the_cli(served):
    old, new = served.ids
    assert export_size(served.uri(old)) == V1_SIZE
    assert export_size(served.uri(old[:8])) == V1_SIZE
    assert export_size(served.uri(new[:10])) == V2_SIZE
    assert export_size(served.uri("latest")) == V2_SIZE
    assert export_size(served.uri("disk@latest")) == V2_SIZE
    assert export_size(served.uri()) == V2_SIZE  # the default export: the first listed, the newest


@pytest.mark.parametrize("name", ["nosuch", "ffffffffffff", "other@latest"])
def test_unknown_export_is_refused_and_the_server_lives_on(served, name):
    proc = tool("nbdinfo", served.uri(name))
    assert proc.returncode != 0
    assert "server replied with error to opt_go" in proc.stderr
    # The refusal is NBD_REP_ERR_UNKNOWN with the reason, and the client may go on negotiating.
    c = RawClient(served.port)
    raw = name.encode()
    c.option(nbd.NBD_OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    option, reply_type, message = c.option_reply()
    assert (option, reply_type) == (nbd.NBD_OPT_GO, nbd.NBD_REP_ERR_UNKNOWN)
    assert b"no snapshot" in message
    assert c.go(served.ids[0]) == V1_SIZE
    c.close()
    assert_alive(served)


def test_only_the_snapshots_asked_for_are_exported(served):
    old, new = served.ids
    running = start(served.repo, [old[:8]])
    try:
        uri = f"nbd://127.0.0.1:{running.port}/"
        doc = json.loads(ok(tool("nbdinfo", "--list", "--json", uri)))
        assert [e["export-name"] for e in doc["exports"]] == [old]
        assert export_size(uri + old[:8]) == V1_SIZE  # the reference as given
        assert export_size(uri + old) == V1_SIZE
        assert export_size(uri) == V1_SIZE  # default export
        for name in (new, "latest"):  # both resolve to the newer snapshot, which is not exported
            proc = tool("nbdinfo", uri + name)
            assert proc.returncode != 0 and "server replied with error to opt_go" in proc.stderr
        c = RawClient(running.port)
        c.option(nbd.NBD_OPT_GO, struct.pack(">I", len(new)) + new.encode() + struct.pack(">H", 0))
        _, reply_type, message = c.option_reply()
        assert reply_type == nbd.NBD_REP_ERR_UNKNOWN and b"is not exported" in message
        c.close()
    finally:
        stop(running)


def test_instant_recovery_writes_land_in_the_overlay(served, tmp_path):
    sid = served.ids[1]
    overlay = tmp_path / "overlay.qcow2"
    ok(tool("qemu-img", "create", "-f", "qcow2", "-b", served.uri(sid), "-F", "raw", overlay))
    out = ok(tool("qemu-io", "-c", "write -P 0xab 0 64k", overlay))
    assert "wrote 65536/65536" in out
    out = ok(tool("qemu-io", "-c", "read -P 0xab 0 64k", "-c", "read -P 0 1m 64k", overlay))
    assert out.count("read 65536/65536") == 2 and "verification failed" not in out, out
    # The overlay holds the write on top of the backup...
    merged = tmp_path / "merged.img"
    ok(tool("qemu-img", "convert", "-f", "qcow2", "-O", "raw", overlay, merged))
    expected = bytearray(served.images[sid])
    expected[: 64 * KiB] = b"\xab" * (64 * KiB)
    assert merged.read_bytes() == expected
    # ...and the snapshot itself is unchanged.
    copy = tmp_path / "again.img"
    ok(tool("nbdcopy", served.uri(sid), copy))
    assert copy.read_bytes() == served.images[sid]


def test_several_clients_at_once(served, tmp_path):
    jobs = []
    for i, sid in enumerate([served.ids[0], served.ids[1], served.ids[1], served.ids[0]]):
        out = tmp_path / f"parallel-{i}.img"
        proc = subprocess.Popen(["nbdcopy", served.uri(sid), str(out)], stderr=subprocess.PIPE)
        jobs.append((proc, out, sid))
    for proc, out, sid in jobs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        assert out.read_bytes() == served.images[sid]


# -- bad input, with raw sockets ------------------------------------------------------------------------------


@pytest.fixture
def client(served):
    clients: list[RawClient] = []

    def connect(**kwargs: int) -> RawClient:
        clients.append(RawClient(served.port, **kwargs))
        return clients[-1]

    yield connect
    for c in clients:
        c.close()
    assert_alive(served)  # after every bad client, a real one still works


FLAGS = nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES


@pytest.mark.parametrize(
    ("flags", "garbage"),
    [
        (FLAGS, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),  # text where an option should be
        (FLAGS, nbd.OPTION.pack(0x1122334455667788, nbd.NBD_OPT_LIST, 0)),  # an option with a bad magic
        (0xFFFFFFFF, b""),  # client flags we never offered: proto.md says drop the connection
    ],
)
def test_garbage_handshake_closes_that_connection(served, client, flags, garbage):
    c = client(flags=flags)
    c.sock.sendall(garbage)
    assert c.closed()


def test_garbage_request_closes_that_connection(served, client):
    c = client()
    c.go(served.ids[0])
    c.sock.sendall(b"\xde\xad" * 14)  # 28 bytes: a request header with a bad magic
    assert c.closed()


def test_unknown_option_is_unsupported_and_negotiation_continues(served, client):
    c = client()
    c.option(0x1234, b"whatever data")
    assert c.option_reply()[:2] == (0x1234, nbd.NBD_REP_ERR_UNSUP)
    c.option(nbd.NBD_OPT_LIST)
    names = []
    while (reply := c.option_reply())[1] == nbd.NBD_REP_SERVER:
        (n,) = struct.unpack_from(">I", reply[2])
        names.append(reply[2][4 : 4 + n].decode())
    assert reply[1] == nbd.NBD_REP_ACK and names == served.ids[::-1]
    c.option(nbd.NBD_OPT_LIST, b"junk")  # LIST takes no data
    assert c.option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    c.option(nbd.NBD_OPT_GO, b"\x00\x00\x01\x00abc")  # name length past the data
    assert c.option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    assert c.go(served.ids[0]) == V1_SIZE


def test_oversized_option_closes_that_connection(served, client):
    c = client()
    c.sock.sendall(nbd.OPTION.pack(nbd.IHAVEOPT, nbd.NBD_OPT_GO, 1 << 30))
    assert c.closed()


@pytest.mark.parametrize("structured", [False, True])
def test_bad_requests_get_errors_and_the_connection_goes_on(served, client, structured):
    c = client()
    sid = served.ids[0]
    assert c.go(sid, structured=structured) == V1_SIZE
    image = served.images[sid]

    def error_of(handle: int) -> int:
        if not structured:
            return c.simple_reply(handle)[0]
        flags, reply_type, got, payload = c.chunk()
        assert got == handle and flags & nbd.NBD_REPLY_FLAG_DONE and reply_type == nbd.NBD_REPLY_TYPE_ERROR
        return struct.unpack_from(">I", payload)[0]

    c.request(nbd.NBD_CMD_READ, V1_SIZE - 4096, 8192, handle=1)  # past the end
    assert error_of(1) == nbd.NBD_EINVAL
    c.request(nbd.NBD_CMD_READ, 1 << 62, 512, handle=2)  # far past the end
    assert error_of(2) == nbd.NBD_EINVAL
    c.request(nbd.NBD_CMD_WRITE, 0, 4096, handle=3, payload=b"\x55" * 4096)
    assert error_of(3) == nbd.NBD_EPERM
    c.request(nbd.NBD_CMD_TRIM, 0, 4096, handle=4)
    assert error_of(4) == nbd.NBD_EPERM
    c.request(nbd.NBD_CMD_WRITE_ZEROES, 0, 4096, handle=5)
    assert error_of(5) == nbd.NBD_EPERM
    c.request(99, 0, 0, handle=6)  # no such command
    assert error_of(6) == nbd.NBD_EINVAL
    c.request(nbd.NBD_CMD_BLOCK_STATUS, 0, 4096, handle=7)  # no metadata context was selected
    assert error_of(7) == nbd.NBD_EINVAL
    c.request(nbd.NBD_CMD_FLUSH, 0, 0, handle=8)
    assert c.simple_reply(8) == (0, b"")
    # After all that the connection still reads the right bytes, and the write changed nothing.
    c.request(nbd.NBD_CMD_READ, 1000, 70000, handle=9)
    if structured:
        flags, reply_type, handle, payload = c.chunk()
        assert (handle, reply_type, flags) == (9, nbd.NBD_REPLY_TYPE_OFFSET_DATA, nbd.NBD_REPLY_FLAG_DONE)
        assert payload == struct.pack(">Q", 1000) + image[1000:71000]
    else:
        assert c.simple_reply(9, 70000) == (0, image[1000:71000])
    c.request(nbd.NBD_CMD_DISC, 0, 0, handle=10)
    assert c.closed()


def test_oversized_read_is_refused(served, client):
    c = client()
    c.go(served.ids[1])
    c.request(nbd.NBD_CMD_READ, 0, nbd.MAX_REQUEST + 1, handle=1)
    assert c.simple_reply(1)[0] == nbd.NBD_EINVAL


def test_structured_read_sends_holes_as_holes(served, client):
    c = client()
    sid = served.ids[0]
    c.go(sid, structured=True)
    c.request(nbd.NBD_CMD_READ, 256 * KiB, 2 * MiB, handle=7)  # data, then a hole, then data
    chunks = []
    while True:
        flags, reply_type, handle, payload = c.chunk()
        assert handle == 7
        chunks.append((reply_type, payload))
        if flags & nbd.NBD_REPLY_FLAG_DONE:
            break
    assert [t for t, _ in chunks] == [
        nbd.NBD_REPLY_TYPE_OFFSET_DATA,
        nbd.NBD_REPLY_TYPE_OFFSET_HOLE,
        nbd.NBD_REPLY_TYPE_OFFSET_DATA,
    ]
    assert chunks[0][1] == struct.pack(">Q", 256 * KiB) + served.images[sid][256 * KiB : 512 * KiB]
    assert chunks[1][1] == struct.pack(">QI", 512 * KiB, 1536 * KiB)
    assert chunks[2][1] == struct.pack(">Q", 2 * MiB) + served.images[sid][2 * MiB : 2 * MiB + 256 * KiB]


# -- damaged data ---------------------------------------------------------------------------------------------


def test_damaged_chunk_is_an_error_not_wrong_data(tmp_path):
    repo = small_repo(tmp_path / "repo")
    try:
        image = build(tmp_path / "disk.img", 4 * MiB, [(0, det_bytes(7, 3 * MiB))])
        rec = take_snapshot(repo, str(tmp_path / "disk.img"), name="disk").record
        extent = flip_byte_in_chunk(repo, rec, 2 * MiB)

        running = start(repo)
        try:
            uri = f"nbd://127.0.0.1:{running.port}/{rec.hex_id}"
            out = tmp_path / "copy.img"
            proc = tool("nbdcopy", uri, out)
            assert proc.returncode != 0
            assert not out.exists() or out.read_bytes() != image
            # Precisely: the read that covers the damaged chunk is an EIO; the rest still reads right.
            c = RawClient(running.port)
            c.go(rec.hex_id)
            c.request(nbd.NBD_CMD_READ, extent.offset, extent.length, handle=1)
            assert c.simple_reply(1)[0] == nbd.NBD_EIO
            c.request(nbd.NBD_CMD_READ, 0, 4096, handle=2)
            assert c.simple_reply(2, 4096) == (0, image[:4096])
            c.close()
        finally:
            stop(running)
    finally:
        repo.close()


# -- the command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_until_signalled(served, sig):
    repo_path = served.repo.path
    proc = subprocess.Popen(
        [sys.executable, "-m", "dedupimg", "-r", str(repo_path), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    try:
        line = first_line(proc.stderr)
        assert line.startswith("serving 2 exports on nbd://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        doc = json.loads(ok(tool("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}")))
        assert sorted(e["export-name"] for e in doc["exports"]) == sorted(served.ids)
        # A client connected in transmission does not hold the stop up.
        c = RawClient(port)
        c.go("latest")
        started = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 4
        assert c.closed()
        c.close()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and err.strip() == b"", err


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1", "127.0.0.1:99999", ":10809", "host:port"])
def test_cli_bad_listen_is_a_usage_error(served, listen):
    proc = run_cli("-r", served.repo.path, "serve", "--listen", listen)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "--listen" in err and "HOST:PORT" in err


def test_cli_port_in_use_is_a_clear_error(served):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("-r", served.repo.path, "serve", "--listen", f"127.0.0.1:{port}")
    err = proc.stderr.decode()
    assert proc.returncode == 19, err
    assert len(err.strip().splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in err, err
    assert "in use" in err


def test_cli_unknown_snapshot_fails_before_serving(served):
    proc = run_cli("-r", served.repo.path, "serve", "nosuch", "--listen", "127.0.0.1:0")
    err = proc.stderr.decode()
    assert proc.returncode == 13, err
    assert len(err.strip().splitlines()) == 1 and "no snapshot matches 'nosuch'" in err


def test_read_workers_end_when_the_server_is_killed(tmp_path):
    repo = small_repo(tmp_path / "repo")
    data = build(tmp_path / "disk.img", V1_SIZE, V1_PIECES)
    sid = take_snapshot(repo, str(tmp_path / "disk.img")).record.hex_id
    repo.close()
    env = {**os.environ, "DEDUPIMG_READ_WORKERS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(tmp_path / "repo"), "serve", "--listen",
                             "127.0.0.1:0"], stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        line = proc.stderr.readline().decode()  # type: ignore[union-attr]
        assert "serving 1 export on nbd://" in line, line
        uri = line.split(" on ", 1)[1].strip() + "/" + sid
        out = tmp_path / "copy.img"
        ok(tool("nbdcopy", uri, out))
        assert out.read_bytes() == data
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()

    def ended(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 10
    while not all(ended(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(ended(p) for p in workers), "read workers outlived the killed server"
