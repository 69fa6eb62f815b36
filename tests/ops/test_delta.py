"""restore --delta: update an existing target in place, writing only what differs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dedupimg.core.errors import UsageError
from dedupimg.ops.restore import restore
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes, text_bytes

pytestmark = pytest.mark.slow  # a 64 MiB image per test

MiB = 1 << 20
SIZE = 64 * MiB


def churn(data: bytes, fraction: float, seed: int) -> bytes:
    """Rewrite ``fraction`` of the 4 KiB blocks, scattered."""
    out = bytearray(data)
    rng = random.Random(seed)
    blocks = len(out) // 4096
    for i in rng.sample(range(blocks), int(blocks * fraction)):
        out[i * 4096 : (i + 1) * 4096] = det_bytes(seed * 100_000 + i, 4096)
    return bytes(out)


@pytest.fixture
def history(tmp_path: Path):
    v1 = b"".join(text_bytes(i, MiB) if i % 3 else det_bytes(i, MiB) for i in range(SIZE // MiB))
    v1 = v1[: 8 * MiB] + bytes(8 * MiB) + v1[16 * MiB :]  # a zero run
    v2 = churn(v1, 0.01, 2)
    repo = Repository.init(tmp_path / "repo")
    ids = []
    for i, img in enumerate((v1, v2)):
        (tmp_path / f"v{i + 1}.img").write_bytes(img)
        ids.append(take_snapshot(repo, str(tmp_path / f"v{i + 1}.img")).record.hex_id)
    yield repo, ids, v1, v2
    repo.close()


def test_delta_of_one_percent_change_writes_under_five_percent(tmp_path, history):
    repo, (id1, id2), v1, v2 = history
    target = tmp_path / "disk.img"
    restore(repo, id1, str(target))
    result = restore(repo, id2, str(target), delta=True)
    assert target.read_bytes() == v2
    assert result.bytes_read >= SIZE - 8 * MiB  # every data byte of the target was compared
    assert result.bytes_written < 0.05 * SIZE, result.bytes_written
    assert result.bytes_written >= 0.01 * SIZE * 0.9  # and the changes were written
    again = restore(repo, id2, str(target), delta=True)  # already up to date: writes nothing
    assert again.bytes_written == 0


def test_delta_fixes_garbage_zero_regions_and_wrong_size(tmp_path, history):
    repo, (_, id2), _, v2 = history
    target = tmp_path / "disk.img"
    target.write_bytes(det_bytes(99, 70 * MiB))  # larger than the image, random where zeros belong
    result = restore(repo, id2, str(target), delta=True)
    assert target.read_bytes() == v2
    assert result.bytes_written > 8 * MiB


def test_delta_onto_shorter_target(tmp_path, history):
    repo, (id1, _), v1, _ = history
    target = tmp_path / "disk.img"
    target.write_bytes(v1[: 10 * MiB])
    restore(repo, id1, str(target), delta=True)
    assert target.read_bytes() == v1


def test_delta_without_target_restores_in_full(tmp_path, history):
    repo, (id1, _), v1, _ = history
    target = tmp_path / "new.img"
    result = restore(repo, id1, str(target), delta=True)
    assert target.read_bytes() == v1
    assert result.bytes_read == 0


def test_delta_to_stdout_is_refused(history):
    repo, (id1, _), _, _ = history
    with pytest.raises(UsageError):
        restore(repo, id1, "-", delta=True)


def test_delta_rewrites_only_the_blocks_of_a_zero_run_that_are_not_zero(tmp_path, history):
    """Found by review: one stray byte in a zero run made --delta write the whole run (up to 8 MiB), which on a
    sparse or thin target also allocates it. Only the 4 KiB blocks that are not zero are written now."""
    repo, (_, id2), _, v2 = history
    target = tmp_path / "disk.img"
    restore(repo, id2, str(target))
    allocated = target.stat().st_blocks
    with target.open("r+b") as f:
        for at in (8 * MiB + 5, 12 * MiB + 4095, 12 * MiB + 4096):  # inside the zero run: 3 blocks
            f.seek(at)
            f.write(b"\x01")
    result = restore(repo, id2, str(target), delta=True)
    assert target.read_bytes() == v2
    assert result.bytes_written == 3 * 4096
    assert target.stat().st_blocks <= allocated + 3 * 8  # st_blocks counts 512-byte units
