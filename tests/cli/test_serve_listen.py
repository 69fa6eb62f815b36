"""`dedupimg serve` stays on loopback unless told otherwise (issue 14): the default listen address is loopback; an
address beyond loopback (0.0.0.0, ::, an address of this machine) is refused with exit 2 before anything listens,
unless --allow-remote is given; then the export is served, with a one-line warning that it has no authentication
or encryption."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dedupimg.ops.snapshot import take_snapshot
from dedupimg.serve.nbd import DEFAULT_PORT, is_loopback
from tests.helpers import ROOT, cli_env, det_bytes, fails, first_line, run_cli, small_repo

TIMEOUT = 60


@dataclass
class Served:
    repo: Path
    sid: str  # the snapshot's full id: its export name


@pytest.fixture
def served(tmp_path: Path) -> Served:
    (tmp_path / "disk.img").write_bytes(det_bytes(3, 200_000))
    with small_repo(tmp_path / "repo") as repo:
        sid = take_snapshot(repo, str(tmp_path / "disk.img"), name="disk").record.hex_id
    return Served(tmp_path / "repo", sid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def remote_addresses() -> list[str]:
    """This machine's addresses beyond loopback, from `hostname -I` and its host name (IPv6 link-local left out:
    binding one needs its zone)."""
    found: list[str] = []
    try:
        found += subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        found += [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)]
    except OSError:
        pass
    return [a for a in dict.fromkeys(found) if not is_loopback(a) and not a.lower().startswith("fe80:")]


def listen_arg(addr: str, port: int = 0) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# -- refused without --allow-remote ----------------------------------------------------------------------------


def refused(served: Served, addr: str) -> None:
    port = free_port()
    proc = run_cli("-r", served.repo, "serve", "--listen", listen_arg(addr, port), timeout=TIMEOUT)
    fails(proc, 2, "--allow-remote", "not a loopback address")
    assert b" on nbd://" not in proc.stderr  # never started
    assert not listening(port)


@pytest.mark.parametrize("addr", ["0.0.0.0", "::"])
def test_all_interfaces_is_refused_without_allow_remote(served, addr):
    refused(served, addr)


def test_an_address_of_this_machine_is_refused_without_allow_remote(served):
    addresses = remote_addresses() or ["0.0.0.0"]  # a machine with no address beyond loopback: all interfaces
    for addr in addresses:
        refused(served, addr)


def test_refusal_comes_before_the_repository_is_opened(tmp_path):
    fails(run_cli("-r", tmp_path / "nosuch", "serve", "--listen", "0.0.0.0:0"), 2, "--allow-remote")


# -- served: loopback by default, beyond it with --allow-remote ------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str  # nbd://HOST:PORT as the server printed it
    port: int


@pytest.fixture
def serve() -> Iterator:
    """Start `dedupimg serve` in a subprocess and return once it listens; every server is stopped after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def run(repo: Path, *args: str) -> Server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dedupimg", "-r", str(repo), "serve", *args],
            stderr=subprocess.PIPE,
            env=cli_env(DEDUPIMG_READ_WORKERS="0"),
            cwd=ROOT,
        )
        started.append(proc)
        assert proc.stderr is not None
        line = first_line(proc.stderr, TIMEOUT)
        if not line.startswith("serving ") or " on nbd://" not in line:
            proc.wait(TIMEOUT)
            pytest.fail(f"serve {args} did not start ({proc.returncode}): {line}{proc.stderr.read().decode()}")
        url = line.split(" on ", 1)[1].strip()
        return Server(proc, url, int(url.rsplit(":", 1)[1]))

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def stopped(server: Server) -> str:
    """Stop the server (SIGTERM: exit 0) and return what it printed on stderr after its first line."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(TIMEOUT) == 0
    assert server.proc.stderr is not None
    return server.proc.stderr.read().decode().strip()


def exports(url: str) -> list[str]:
    """The export names a real NBD client (nbdinfo) lists at ``url``."""
    proc = subprocess.run(["nbdinfo", "--list", "--json", url], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return [e["export-name"] for e in json.loads(proc.stdout)["exports"]]


@pytest.mark.slow
def test_allow_remote_serves_on_all_interfaces_with_a_warning(served, serve):
    server = serve(served.repo, "--listen", "0.0.0.0:0", "--allow-remote")
    assert server.url.startswith("nbd://0.0.0.0:"), server.url
    assert exports(f"nbd://127.0.0.1:{server.port}") == [served.sid]
    for addr in remote_addresses():  # reachable on this machine's other addresses too: that is what was allowed
        if ":" not in addr:
            assert exports(f"nbd://{addr}:{server.port}") == [served.sid]
    warning = stopped(server)
    assert len(warning.splitlines()) == 1, warning
    assert warning.startswith("warning:") and "unauthenticated and unencrypted" in warning, warning
    assert "SSH tunnel" in warning and "stunnel" in warning, warning
    assert not listening(server.port)


@pytest.mark.slow
def test_default_listen_address_is_loopback(served, serve):
    # The default port must be free to test the default (CI is a fresh machine): fail saying so, never skip.
    assert not listening(DEFAULT_PORT), f"port {DEFAULT_PORT} is taken on this machine: free it to run this test"
    server = serve(served.repo)
    assert server.url == f"nbd://127.0.0.1:{DEFAULT_PORT}", server.url
    assert exports(server.url) == [served.sid]
    assert stopped(server) == ""  # no warning
    assert not listening(DEFAULT_PORT)


@pytest.mark.slow
@pytest.mark.parametrize("listen", ["localhost:0", "127.5.5.5:0", "[::1]:0"])
def test_loopback_needs_no_allow_remote_and_prints_no_warning(served, serve, listen):
    server = serve(served.repo, "--listen", listen)
    assert exports(server.url) == [served.sid]
    assert stopped(server) == ""
