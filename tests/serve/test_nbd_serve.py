"""nbd.serve, what ``dedupimg serve`` calls: ready sees a listening server; a signal (Interrupted) ends serving
normally and closes the port; a taken port fails before ready."""

from __future__ import annotations

import socket

import pytest

from dedupimg.core.errors import Interrupted, ListenError
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.serve import nbd
from dedupimg.serve.nbd import NbdServer
from tests.helpers import det_bytes, small_repo


def test_interrupted_ends_serving_normally_and_closes_the_port(tmp_path):
    with small_repo(tmp_path / "repo") as repo:
        (tmp_path / "a.img").write_bytes(det_bytes(1, 100_000))
        rec = take_snapshot(repo, str(tmp_path / "a.img"), name="disk").record
        seen: list[tuple[str, int]] = []

        def ready(server: NbdServer) -> None:
            assert [r.id for r in server.records()] == [rec.id]
            seen.append(server.address)
            with socket.create_connection(server.address, timeout=5):
                pass  # listening already
            raise Interrupted("interrupted by SIGTERM")  # as the CLI's signal handler does

        nbd.serve(repo, [], "127.0.0.1", 0, ready=ready)  # returns: no exception
        assert len(seen) == 1
        with pytest.raises(OSError):
            socket.create_connection(seen[0], timeout=5).close()


def test_a_taken_port_fails_before_ready(tmp_path):
    with small_repo(tmp_path / "repo") as repo, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        called = []
        with pytest.raises(ListenError):
            nbd.serve(repo, [], "127.0.0.1", taken.getsockname()[1], ready=called.append)
        assert called == []
