"""Fixtures of the whole-system tests, and the rule that every test here is ``slow``.

Whole-system tests run the real command against the real system (root, loop devices, ext4, FUSE, NBD clients,
kill -9, full disks, memory): seconds each, and together most of the suite's time. ``pytest -m "not slow"``
leaves them out; CI (scripts/test.sh) runs them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Called with every collected item, not only this folder's: mark those that live below it.
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.slow)


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
