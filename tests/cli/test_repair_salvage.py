"""repair index and prune through the CLI on a damaged pack: the only snapshot left out is no dead end, a cut
pack is salvaged, and 'forget --left-out' lets prune free what a left-out snapshot had."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import det_bytes, fails, ok, run_cli
from tests.packfiles import trailer

pytestmark = pytest.mark.slow  # a dozen commands in subprocesses: about 15 s


def _packs(repo: Path) -> list[Path]:
    return sorted(repo.glob("packs/*/*.pack"))


def test_only_snapshot_left_out_then_prune_and_forget_left_out(tmp_path):
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "1024", "--pack-size", str(1 << 16)))
    img = tmp_path / "a.img"
    img.write_bytes(det_bytes(7, 300_000))
    snap_id = json.loads(ok(run_cli("-r", repo, "snapshot", img, "--json")))["id"]
    chunks_only = [p for p in _packs(repo) if all(e.type == 0 for e in trailer(p))]
    cut = chunks_only[0]
    entries = trailer(cut)
    os.truncate(cut, entries[1].offset + 50)  # one chunk whole, the next cut: the snapshot is incomplete
    out = ok(run_cli("-r", repo, "repair", "index"))
    assert f"damaged pack {cut.name}" in out and "salvaged 1 intact blobs" in out
    assert f"left out snapshot a.img@{snap_id[:8]}" in out and "forget --left-out" in out
    # Before: exit 17, "lists no snapshot, yet holds snapshot records that were never forgotten" (a dead end).
    pruned = ok(run_cli("-r", repo, "prune", "--max-unused", "0%", "--json"))
    doc = json.loads(pruned)
    assert doc["salvaged_packs"] == 1 and doc["held_rows"] > 0
    assert not cut.exists()
    checked = run_cli("-r", repo, "check", text=True)
    fails(checked, 17, "check found 1 problem")
    assert f"snapshot {snap_id[:8]} has its record indexed" in checked.stdout and "forget --left-out" in checked.stdout
    fails(run_cli("-r", repo, "forget", "--left-out", "--keep-last", "1"), 2, "--left-out")
    ok(run_cli("-r", repo, "forget", "--left-out", "--prune"))
    ok(run_cli("-r", repo, "check", "--read-data"))
    assert json.loads(ok(run_cli("-r", repo, "snapshots", "--json"))) == []
