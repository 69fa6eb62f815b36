"""Issue 17 items 1 and 2 through the CLI: ``stats`` (what each snapshot costs, zeros apart from dedup) and
``diff`` (changed byte ranges from the manifests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import det_bytes, fails, ok, run_cli, write_sparse

MiB = 1 << 20


def _init(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    return repo


def _snap(repo: Path, image: Path, *args: str) -> str:
    return json.loads(ok(run_cli("-r", repo, "snapshot", image, "--json", *args)))["id"]


@pytest.mark.slow
def test_stats_counts_holes_apart_from_dedup_and_unique_bytes_match_what_prune_frees(tmp_path):
    repo = _init(tmp_path)
    image = tmp_path / "disk.img"
    # 8 MiB sparse: 300 KB + 200 KB of data (4 KiB blocks), the rest holes.
    first, second = det_bytes(1, 300_000), det_bytes(2, 200_000)
    write_sparse(image, 8 * MiB, [(0, first), (4 * MiB, second)])
    a = _snap(repo, image, "--time", "2026-01-01T00:00:00+00:00")
    changed = det_bytes(3, 50_000)
    write_sparse(image, 8 * MiB, [(0, first[:100_000] + changed + first[150_000:]), (4 * MiB, second)])
    b = _snap(repo, image, "--time", "2026-01-02T00:00:00+00:00")

    doc = json.loads(ok(run_cli("-r", repo, "stats", "--json")))
    assert doc["version"] == 1
    costs = {s["id"]: s for s in doc["snapshots"]}
    assert list(costs) == [a, b]
    data = 303_104 + 200_704  # the data rounded out to 4 KiB blocks: the rest are holes
    for s in costs.values():
        assert s["size"] == 8 * MiB and s["allocated_bytes"] == data and s["zero_bytes"] == 8 * MiB - data
        assert s["shared_bytes"] + s["unique_bytes"] == data
        # Only the chunks around the 50 KB change are each snapshot's own (but for a's chunks at its edges
        # that are the bases of b's deltas there: shared, as forgetting a would not free them).
        assert 50_000 - 2 * 16384 < s["unique_bytes"] < 50_000 + 4 * 16384
        # Random data is stored about as large as it is, but for b's chunks at the edges of the change: deltas
        # on a's, a fraction of it. (What forgetting frees is compared with what prune frees below.)
        assert s["unique_chunks"] >= 1 and s["freed_bytes"] >= (s["unique_data_bytes"] - 2 * 4 * 16384) * 0.9
    totals = doc["totals"]
    assert totals["zero_bytes"] == 2 * (8 * MiB - data) and totals["allocated_bytes"] == 2 * data
    # Holes are not deduplication: two near-identical images of mostly holes dedup about 2x, not 30x.
    assert 1.7 < totals["dedup_ratio"] < 2.0
    assert doc["repository"]["snapshots"] == 2 and doc["repository"]["pack_bytes"] > totals["stored_bytes"]

    # What stats says forgetting a alone frees is what forget + a full prune frees.
    expected = costs[a]["freed_bytes"]
    freed = json.loads(ok(run_cli("-r", repo, "forget", a, "--prune", "--json")))["prune"]["bytes_freed"]
    freed += json.loads(ok(run_cli("-r", repo, "prune", "--max-unused", "0", "--json")))["bytes_freed"]
    assert 0.9 * expected <= freed <= 1.2 * expected, (expected, freed)
    after = json.loads(ok(run_cli("-r", repo, "stats", "--json")))["snapshots"]
    assert [s["id"] for s in after] == [b] and after[0]["unique_bytes"] == data  # alone now: all its own

    text = ok(run_cli("-r", repo, "stats", b[:8]))
    assert b[:8] in text and "1 snapshot:" in text and "holes and zero runs" in text and "MiB" in text
    fails(run_cli("-r", repo, "stats", "ffffffff"), 13, "no snapshot matches")


@pytest.mark.slow
def test_diff_lists_merged_changed_ranges_and_new_data(tmp_path):
    repo = _init(tmp_path)
    image = tmp_path / "disk.img"
    base = det_bytes(4, 2 * MiB)
    image.write_bytes(base)
    a = _snap(repo, image)
    edited = bytearray(base)
    edited[300_000:300_010] = b"x" * 10  # two small edits far apart
    edited[1_500_000:1_500_100] = b"y" * 100
    image.write_bytes(bytes(edited) + det_bytes(5, 100_000))  # and 100 KB appended
    b = _snap(repo, image)

    doc = json.loads(ok(run_cli("-r", repo, "diff", a, b, "--json")))
    assert doc["version"] == 1 and doc["a"]["id"] == a and doc["b"]["id"] == b
    ranges = [(r["offset"], r["length"]) for r in doc["ranges"]]
    assert len(ranges) == 3
    for (off, n), edit in zip(ranges, (300_000, 1_500_000, 2 * MiB), strict=True):
        assert off <= edit < off + n  # each edit inside its range
    assert ranges[2][0] + ranges[2][1] == 2 * MiB + 100_000  # the growth reaches the end of b
    assert all(o1 + n1 < o2 for (o1, n1), (o2, _) in zip(ranges, ranges[1:], strict=False))  # merged, ascending
    assert doc["bytes_changed"] == sum(n for _, n in ranges) < 300_000  # chunks around the edits only
    assert doc["new_chunks"] >= 3 and 100_000 < doc["new_data_bytes"] < doc["bytes_changed"] + 1
    same = json.loads(ok(run_cli("-r", repo, "diff", a, a, "--json")))
    assert same["ranges"] == [] and same["bytes_changed"] == 0 and same["new_chunks"] == 0
    text = ok(run_cli("-r", repo, "diff", a[:8], b[:8]))
    assert "changed in 3 ranges" in text and str(ranges[0][0]) in text
    fails(run_cli("-r", repo, "diff", a, "nope"), 13, "no snapshot matches")


@pytest.mark.slow
def test_check_hint_says_what_prune_frees(tmp_path):
    repo = _init(tmp_path)
    image = tmp_path / "disk.img"
    ids = []
    for seed in range(3):
        image.write_bytes(det_bytes(10 + seed, 300_000))
        ids.append(_snap(repo, image))
    ok(run_cli("-r", repo, "forget", ids[0], ids[1]))
    doc = json.loads(ok(run_cli("-r", repo, "check", "--json")))
    assert doc["ok"] and doc["version"] == 1
    estimate = doc["prune_estimate"]["bytes_to_free"]
    (hint,) = [h["message"] for h in doc["hints"] if h["kind"] == "garbage"]
    text = ok(run_cli("-r", repo, "check"))
    assert f"prune would free about {estimate / 1024:.1f} KiB" in hint and hint in text
    pruned = json.loads(ok(run_cli("-r", repo, "prune", "--json")))
    assert pruned["bytes_to_free"] == estimate  # the hint came from prune's own plan
    assert 0.9 * estimate <= pruned["bytes_freed"] <= 1.1 * estimate
    assert json.loads(ok(run_cli("-r", repo, "check", "--json")))["hints"] == []
