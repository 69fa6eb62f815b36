"""Peak RSS of snapshot and restore depends on buffer sizes, not on the image size (1 GiB vs 8 GiB).

The images stream through stdin and stdout, so nothing of their size touches the disk but the repository.
Every 4 MiB block differs from the others in two places, so each block brings new chunks, segments and
index entries, while the repository stays small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import run_cli

GiB = 1 << 30
LIMIT = 300 * 1000 * 1000

GENERATOR = r"""
import sys, blake3
base = bytearray(blake3.blake3(b"memtest").digest(length=4 << 20))
out = sys.stdout.buffer
for i in range(int(sys.argv[1]) // len(base)):
    base[0:8] = i.to_bytes(8, "little")
    base[2 << 20 : (2 << 20) + 8] = i.to_bytes(8, "little")
    out.write(base)
"""


# A forked child starts with its parent's RSS as its high-water mark (Linux keeps it across exec), and pytest
# may be large by now: measure through a small launcher process, as /usr/bin/time does.
LAUNCHER = r"""
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss * 1024} {os.waitstatus_to_exitcode(status)}")
"""


def peak_rss(cmd: list[str], report: Path, stdin=None, stdout=None) -> int:
    launcher = subprocess.run([sys.executable, "-c", LAUNCHER, str(report), *cmd], stdin=stdin, stdout=stdout,
                              stderr=subprocess.PIPE, timeout=900)
    rss, code = map(int, report.read_text().split())
    assert code == 0, launcher.stderr
    return rss


def snapshot_and_restore(repo: Path, size: int) -> tuple[int, int]:
    gen = subprocess.Popen([sys.executable, "-c", GENERATOR, str(size)], stdout=subprocess.PIPE)
    snap_rss = peak_rss(
        [sys.executable, "-m", "dedupimg", "-r", str(repo), "snapshot", "-", "--name", f"m{size}"],
        repo.parent / "rss",
        stdin=gen.stdout,
        stdout=subprocess.DEVNULL,
    )
    gen.stdout.close()  # type: ignore[union-attr]
    assert gen.wait() == 0
    with open(os.devnull, "wb") as sink:
        restore_rss = peak_rss(
            [sys.executable, "-m", "dedupimg", "-r", str(repo), "restore", "latest", "-", "--name", f"m{size}"],
            repo.parent / "rss",
            stdout=sink,
        )
    return snap_rss, restore_rss


def test_peak_rss_is_flat_from_1_to_8_gib(tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("-r", repo, "init").returncode == 0
    small = snapshot_and_restore(repo, 1 * GiB)
    large = snapshot_and_restore(repo, 8 * GiB)
    print(f"peak RSS snapshot/restore: 1 GiB {small}, 8 GiB {large}")
    for rss in (*small, *large):
        assert rss < LIMIT
    # Flat: 8x the image may cost a little more (the buffer pool and malloc arenas reach their steady
    # state, more index pages are mapped), not 8x the memory.
    assert large[0] < small[0] + 64_000_000
    assert large[1] < small[1] + 64_000_000
