"""Issue 17 item 3 through the CLI: ``tag --add/--remove/--set``, the ``--name/--host/--tag`` filters of
``snapshots``, ``stats`` and ``forget``, and ``forget --keep-tag`` on snapshots tagged after they were taken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import check_clean, det_bytes, fails, ok, run_cli


def _listing(repo: Path, *args: str) -> list[dict[str, object]]:
    return json.loads(ok(run_cli("-r", repo, "snapshots", "--json", *args)))


@pytest.mark.slow
def test_tag_then_filter_then_keep_tag_protects_an_older_snapshot(tmp_path):
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    image = tmp_path / "db.img"
    ids = []
    for day in range(1, 4):
        image.write_bytes(det_bytes(day, 50_000))
        ids.append(json.loads(ok(run_cli("-r", repo, "snapshot", image, "--name", "db", "--json",
                                         "--time", f"2026-11-0{day}T22:00:00+01:00")))["id"])

    out = ok(run_cli("-r", repo, "tag", ids[0][:8], "--add", "gold,audit"))
    assert "changed 1 snapshot\n" in out
    doc = json.loads(ok(run_cli("-r", repo, "tag", "db@latest", "--add", "x", "--json")))
    assert doc["version"] == 1 and len(doc["changed"]) == 1 and doc["changed"][0]["old_id"] == ids[2]
    listing = _listing(repo)
    assert len(listing) == 3 and ids[0] not in {s["id"] for s in listing}  # replaced, not duplicated
    gold = listing[0]
    assert gold["tags"] == ["gold", "audit"] and gold["time"] == "2026-11-01T22:00:00+01:00"
    assert [s["id"] for s in _listing(repo, "--tag", "gold")] == [gold["id"]]
    assert [s["id"] for s in _listing(repo, "--tag", "gold,x")] == []  # both tags: none has
    assert len(_listing(repo, "--tag", "gold", "--tag", "x")) == 2  # either list
    assert [s["id"] for s in _listing(repo, "--tag", "")] == [ids[1]]  # untagged
    host = str(gold["host"])
    assert len(_listing(repo, "--host", host)) == 3 and _listing(repo, "--host", "other-host") == []
    stats = json.loads(ok(run_cli("-r", repo, "stats", "--tag", "gold", "--json")))
    assert [s["id"] for s in stats["snapshots"]] == [gold["id"]] and stats["repository"]["snapshots"] == 3

    # --set replaces all; a filter on forget leaves other snapshots alone.
    ok(run_cli("-r", repo, "tag", str(gold["id"]), "--set", "gold"))
    assert _listing(repo, "--tag", "gold")[0]["tags"] == ["gold"]
    plan = json.loads(ok(run_cli("-r", repo, "forget", "--keep-last", "1", "--tag", "x", "--dry-run", "--json")))
    assert sum(len(g["remove"]) for g in plan["groups"]) == 0  # only the x snapshot is looked at: it is kept

    out = ok(run_cli("-r", repo, "forget", "--keep-last", "1", "--keep-tag", "gold", "--prune"))
    assert "has tags [gold]" in out and "removed 1 snapshot\n" in out
    left = _listing(repo)
    assert [s["tags"] for s in left] == [["gold"], ["x"]]
    check_clean(repo)

    fails(run_cli("-r", repo, "tag", str(left[0]["id"]), "--add", "a", "--set", "b"), 2, "--set")
    fails(run_cli("-r", repo, "tag", str(left[0]["id"])), 2, "nothing to do")
    fails(run_cli("-r", repo, "tag", "ffffffff", "--add", "a"), 13, "no snapshot matches")
    fails(run_cli("-r", repo, "forget", str(left[0]["id"]), "--tag", "x"), 2, "--tag")


@pytest.mark.slow
def test_tag_killed_at_any_moment_leaves_one_record(tmp_path):
    """kill -9 of ``tag`` at 5 moments spread over its run: the snapshot is listed exactly once, with the old or
    the new tags, before and after ``repair index``; check finds no problem."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT, cli_env

    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    image = tmp_path / "db.img"
    image.write_bytes(det_bytes(5, 80_000))
    ok(run_cli("-r", repo, "snapshot", image, "--name", "db"))
    outcomes = set()
    for i in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "tag", "db@latest", "--add",
                                 f"t{i}"], env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(0.1 * i)  # from before the interpreter is up to after the command is done
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        (rec,) = _listing(repo)
        outcomes.add(f"t{i}" in rec["tags"])
        ok(run_cli("-r", repo, "repair", "index"))
        (again,) = _listing(repo)
        assert set(again["tags"]) >= set(rec["tags"]) and len(again["tags"]) - len(rec["tags"]) <= 1
    assert False in outcomes  # killed before the replacement at least once (the first kill comes at once)
    check_clean(repo)
