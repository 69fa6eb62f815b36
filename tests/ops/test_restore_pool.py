"""Restore through the read pool's worker processes: bit-exact when the pool's slots run short (runs read again
in this process), when several short pack runs share a slot, and when its workers are killed mid-restore."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from dedupimg.core.config import ChunkerParams
from dedupimg.ops import restore as restore_mod
from dedupimg.ops.restore import restore, verify
from dedupimg.repo import readpool
from dedupimg.repo.chunksource import ChunkSource
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes, snap

MiB = 1 << 20


@pytest.fixture(params=["plain", "encrypted"])
def versions(tmp_path: Path, request: pytest.FixtureRequest):
    """A repository of 16 KiB chunks in 256 KiB packs with two versions of a 40 MiB image; the second has 300
    scattered 4 KiB writes, so that its chunks alternate between the packs of both versions."""
    repo = Repository.init(tmp_path / "repo", ChunkerParams.for_average(16384), pack_size=256 << 10,
                           encryption="aes-256-gcm" if request.param == "encrypted" else "none")
    v1 = bytearray(det_bytes(3, 40 * MiB))
    v1[8 * MiB : 12 * MiB] = bytes(4 * MiB)  # a zero run in between
    rng = random.Random(5)
    v2 = bytearray(v1)
    for _ in range(300):
        at = rng.randrange(0, len(v2) - 4096) // 4096 * 4096
        v2[at : at + 4096] = rng.randbytes(4096)
    recs = [snap(repo, tmp_path / "img", bytes(v), name="disk") for v in (v1, v2)]
    yield repo, list(zip(recs, (bytes(v1), bytes(v2)), strict=True))
    repo.close()


def restored(repo: Repository, rec, out: Path) -> bytes:
    restore(repo, rec.hex_id, str(out), force=True)
    data = out.read_bytes()
    out.unlink()
    return data


def test_restore_reads_through_the_pool_and_packs_short_runs_into_slots(versions, tmp_path, monkeypatch):
    repo, images = versions
    pinned: list[int] = []
    pin = ChunkSource.pin
    monkeypatch.setattr(ChunkSource, "pin", lambda self, ids, ahead: pinned.append(len(ids)) or pin(self, ids, ahead))
    (rec1, data1), (rec2, data2) = images
    assert restored(repo, rec1, tmp_path / "out") == data1
    pool = repo.read_pool
    assert pool is not None
    submitted: list[int] = []
    submit = pool.submit
    monkeypatch.setattr(pool, "submit", lambda runs, *rest: submitted.append(len(runs)) or submit(runs, *rest))
    assert restored(repo, rec2, tmp_path / "out") == data2
    assert pinned, "the restore did not read through the pool"
    assert max(submitted) > 1, "no slot held more than one pack run of the scattered version"


def test_restore_is_bit_exact_when_the_pools_slots_run_short(versions, tmp_path, monkeypatch):
    """Runs of 32 MiB in 16 slots of 1 MiB (the least a pool has): a run cannot be held whole, so its first
    slots are refilled before it is pinned, and its chunks are read again in this process."""
    repo, images = versions
    monkeypatch.setattr(restore_mod, "READ_BATCH", 32 * MiB)
    monkeypatch.setattr(restore_mod, "POOL_SPARE_RUNS", -restore_mod.AHEAD)
    here: list[int] = []
    read_blobs = repo.read_blobs
    monkeypatch.setattr(repo, "read_blobs", lambda ids: here.append(len(ids)) or read_blobs(ids))
    for rec, data in images:
        assert restored(repo, rec, tmp_path / "out") == data
    assert repo.read_pool is not None and repo.read_pool.slots == 16
    assert here, "the slots never ran short: this test no longer tests what it says"


def test_restore_survives_its_read_workers_being_killed(versions, tmp_path, monkeypatch):
    repo, images = versions
    rec, data = images[1]
    pins = 0
    pin = ChunkSource.pin

    def pin_and_kill(self, ids, ahead):
        nonlocal pins
        pins += 1
        if pins in (2, 4):  # one worker, then the other, with runs in flight
            os.kill(self._pool._workers[pins // 2 - 1].proc.pid, signal.SIGKILL)
        return pin(self, ids, ahead)

    monkeypatch.setattr(ChunkSource, "pin", pin_and_kill)
    assert restored(repo, rec, tmp_path / "out") == data
    assert pins > 4
    assert not any(w.proc.poll() is None for w in repo.read_pool._workers)  # type: ignore[union-attr]
    verify(repo, rec.hex_id)  # no worker left: read in this process


def test_restore_reads_here_when_no_worker_can_be_started(versions, tmp_path, monkeypatch):
    """The interpreter not executable by this user (seen as another user with a venv under /root): no pool."""
    repo, images = versions

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0][0])

    monkeypatch.setattr(readpool.subprocess, "Popen", refuse)
    for rec, data in images:
        assert restored(repo, rec, tmp_path / "out") == data
    assert repo.read_pool is None
