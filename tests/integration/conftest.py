"""Fixtures of the whole-system tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 24 MiB ext4 filesystem on a loop device: a disk that really fills up (journal, delayed allocation)."""
    fs_image = tmp_path / "small-fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(fs_image), "24M"], check=True, timeout=60)
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(fs_image), str(mnt)], check=True, timeout=30)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True, timeout=60)
