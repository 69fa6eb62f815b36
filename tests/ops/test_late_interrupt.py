"""A signal that arrives after a snapshot is listed cannot undo it, so it must not make the command report
failure (exit 130) for a snapshot that exists: the CLI's handler lets it pass (core/interrupts.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupimg.cli.main import _on_signal
from dedupimg.core import interrupts
from dedupimg.core.errors import Interrupted
from dedupimg.core.progress import NoProgress
from dedupimg.ops.snapshot import take_snapshot
from tests.helpers import det_bytes, small_repo


class SignalAt(NoProgress):
    """Sends SIGINT to this process when the snapshot starts, or when it finishes (after its commit)."""

    def __init__(self, when: str) -> None:
        self.when = when

    def start(self, task: str, total: int | None) -> None:
        if self.when == "start":
            os.kill(os.getpid(), signal.SIGINT)

    def finish(self) -> None:
        if self.when == "finish":
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def cli_handler() -> Iterator[None]:
    old = signal.signal(signal.SIGINT, _on_signal)
    interrupts.reset()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        interrupts.reset()


def test_a_signal_after_the_commit_lets_the_snapshot_finish(tmp_path: Path, cli_handler: None) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(1, 300_000))
    with small_repo(tmp_path / "repo") as repo:
        result = take_snapshot(repo, str(image), progress=SignalAt("finish"))
        assert [r.id for r in repo.snapshots()] == [result.record.id]


def test_a_signal_before_the_commit_stops_it_and_keeps_nothing(tmp_path: Path, cli_handler: None) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(2, 300_000))
    with small_repo(tmp_path / "repo") as repo:
        with pytest.raises(Interrupted):
            take_snapshot(repo, str(image), progress=SignalAt("start"))
        assert repo.snapshots() == []
