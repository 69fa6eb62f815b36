"""prune killed at many points, and snapshots racing prunes: nothing a remaining snapshot needs is ever lost."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dedupimg.ops.forget import forget_snapshots
from dedupimg.ops.prune import prune
from dedupimg.ops.restore import verify
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.repository import Repository
from tests.helpers import ROOT, det_bytes, small_repo, text_bytes
from tests.packfiles import pack_files

KILL_POINTS = 10


def dedupimg_cmd(repo: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dedupimg", "-r", str(repo), *args]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A repository of 10 versions of a 6 MB image with half of them forgotten: a prune with much to do (about
    a second here, so that kills at random points land while it runs)."""
    root = tmp_path_factory.mktemp("prune-template")
    repo = small_repo(root / "repo")
    image = bytearray(text_bytes(1, 3_000_000) + det_bytes(2, 3_000_000))
    rng = random.Random(7)
    for v in range(10):
        for _ in range(60):
            at = rng.randrange(0, len(image) - 8192)
            image[at : at + 8192] = det_bytes(1000 * v + at, 8192)
        (root / "img").write_bytes(image)
        take_snapshot(repo, str(root / "img"), name="disk")
    forget_snapshots(repo, repo.snapshots()[::2])
    repo.close()
    return root / "repo"


def assert_whole(path: Path) -> list[str]:
    """The repository opens and every remaining snapshot reads back whole (blake3 of the image checked)."""
    with Repository.open(path) as repo:
        ids = [r.hex_id for r in repo.snapshots()]
        for i in ids:
            verify(repo, i)
    return ids


def unlisted_packs(path: Path) -> int:
    with Repository.open(path) as repo:
        on_disk = {bytes.fromhex(p.stem) for p in pack_files(repo)}
        return len(on_disk - set(repo.index.pack_numbers(list(on_disk))))


def test_prune_killed_at_many_points_leaves_a_whole_repository_and_a_rerun_finishes(template, tmp_path):
    expected = assert_whole(template)
    assert len(expected) == 5
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    started = time.monotonic()
    subprocess.run(dedupimg_cmd(probe, "prune", "--max-unused", "0"), check=True, cwd=ROOT, capture_output=True)
    duration = time.monotonic() - started
    rng = random.Random(2026)
    killed_mid_way = 0
    for point in range(KILL_POINTS):
        work = tmp_path / f"kill{point}"
        shutil.copytree(template, work)
        proc = subprocess.Popen(dedupimg_cmd(work, "prune", "--max-unused", "0"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.95) * duration)
        proc.send_signal(signal.SIGKILL)
        if proc.wait() == -signal.SIGKILL:
            killed_mid_way += 1
        assert assert_whole(work) == expected, f"kill point {point}"
        with Repository.open(work) as repo:
            report = prune(repo, max_unused=0.0)  # the re-run completes the work
        assert report.outcome is not None
        assert assert_whole(work) == expected
        assert unlisted_packs(work) == 0 and not list((work / "tmp").glob("*.tmp"))
        with Repository.open(work) as repo:
            assert prune(repo, max_unused=0.0).packs_to_rewrite == 0  # nothing left over
        shutil.rmtree(work)
    assert killed_mid_way >= KILL_POINTS // 2, "most kills must land while prune runs"


def test_snapshots_racing_prunes_never_lose_a_chunk(template, tmp_path):
    work = tmp_path / "race"
    shutil.copytree(template, work)
    images = []
    for round_ in range(3):
        image = tmp_path / f"new{round_}.img"
        image.write_bytes(text_bytes(50 + round_, 600_000) + det_bytes(60 + round_, 600_000))
        images.append(image)
        snap = subprocess.Popen(dedupimg_cmd(work, "snapshot", str(image), "--name", "new", "--lock-wait", "60"),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.15 * round_)  # vary who gets the lock first
        pruned = subprocess.run(dedupimg_cmd(work, "forget", "--keep-last", "2", "--prune", "--lock-wait", "60"),
                                cwd=ROOT, capture_output=True)
        out, err = snap.communicate(timeout=120)
        assert snap.returncode == 0, err.decode()
        assert pruned.returncode == 0, pruned.stderr.decode()
        assert_whole(work)
    with Repository.open(work) as repo:
        latest = repo.resolve("latest", "new")
    out_img = tmp_path / "out.img"
    subprocess.run(dedupimg_cmd(work, "restore", latest.hex_id, str(out_img)), check=True, cwd=ROOT)
    assert out_img.read_bytes() == images[-1].read_bytes()
