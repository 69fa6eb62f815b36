"""Deduplication targets of issue 2 on a 256 MiB image (default chunk size)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes

pytestmark = pytest.mark.slow  # 256 MiB images: 1-2 s a test

SIZE = 256 << 20


@pytest.fixture(scope="module")
def base_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "disk.img"
    path.write_bytes(det_bytes(42, SIZE))  # random data: no help from compression
    return path


def _repo_with_base(tmp_path: Path, image: Path) -> Repository:
    repo = Repository.init(tmp_path / "repo")
    take_snapshot(repo, str(image))
    return repo


def test_unchanged_image_adds_well_under_one_percent(tmp_path, base_image):
    with _repo_with_base(tmp_path, base_image) as repo:
        again = take_snapshot(repo, str(base_image))
        assert again.bytes_new == 0
        assert again.bytes_stored < SIZE / 1000


def test_scattered_in_place_changes(tmp_path, base_image):
    with _repo_with_base(tmp_path, base_image) as repo:
        data = bytearray(base_image.read_bytes())
        rng = random.Random(7)
        for i in range(512):  # 512 scattered 4 KiB writes: 2 MiB
            off = rng.randrange(0, SIZE // 4096) * 4096
            data[off : off + 4096] = det_bytes(1000 + i, 4096)
        changed = tmp_path / "changed.img"
        changed.write_bytes(bytes(data))
        result = take_snapshot(repo, str(changed))
        assert result.bytes_stored < 24 << 20, result


def test_insertion_at_start_shifts_everything(tmp_path, base_image):
    with _repo_with_base(tmp_path, base_image) as repo:
        shifted = tmp_path / "shifted.img"
        shifted.write_bytes(det_bytes(9, 4096) + base_image.read_bytes())
        result = take_snapshot(repo, str(shifted))
        assert result.bytes_stored < 24 << 20, result
        assert result.bytes_stored < 1 << 20  # in fact only the first chunks and segment change
