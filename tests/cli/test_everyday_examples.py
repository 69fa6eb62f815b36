"""Issue 17 item 2's example: examples/diff_files.sh runs (root: loop mounts, FUSE) and finds the changed files
of an ext4 image both from the manifests' changed ranges (debugfs) and by mounting both snapshots."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import ROOT

CHANGED = {"etc/site.conf", "home/admin/notes.txt", "var/log/access.log"}


@pytest.mark.slow
def test_diff_files_example_lists_the_changed_files():
    proc = subprocess.run(["bash", str(ROOT / "examples" / "diff_files.sh")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    work = ROOT / "examples" / "work" / "diff-files"
    by_mount = (work / "changed-by-mount.txt").read_text()
    assert {line.split()[1].removeprefix("old/") for line in by_mount.splitlines()} == CHANGED
    by_blocks = {p.lstrip("/") for p in (work / "changed-by-blocks.txt").read_text().split()}
    assert CHANGED <= by_blocks  # the manifests' ranges cover every changed file (and some neighbours)
    assert "changed in" in proc.stdout and "unmounted" in proc.stdout
    mounts = open("/proc/mounts").read()
    assert str(work) not in mounts  # nothing left mounted
