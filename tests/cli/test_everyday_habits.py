"""Issue 17 items 4 and 5 through the CLI: local times and sorting, plurals, JSON version and UTC times,
--version, -q/-v, -r anywhere, shell completion, progress lines on a non-terminal, serve printing the ids
NAME@latest resolved to."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli_env, det_bytes, fails, first_line, ok, run_cli


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two snapshots whose recorded times sort differently as strings and as instants."""
    tmp = tmp_path_factory.mktemp("habits")
    repo = tmp / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    image = tmp / "disk.img"
    image.write_bytes(det_bytes(7, 40_000))
    # 23:30 at +05:00 is 18:30 UTC: earlier than 20:00 UTC although its string is greater.
    ok(run_cli("-r", repo, "snapshot", image, "--time", "2026-03-01T23:30:00+05:00"))
    image.write_bytes(det_bytes(8, 40_000))
    ok(run_cli("-r", repo, "snapshot", image, "--time", "2026-03-01T20:00:00+00:00"))
    return repo


@pytest.mark.slow
def test_tables_show_local_time_sorted_by_instant_and_json_keeps_utc_and_offset(repo):
    listing = json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))
    assert [s["time"] for s in listing] == ["2026-03-01T23:30:00+05:00", "2026-03-01T20:00:00+00:00"]
    assert [s["time_utc"] for s in listing] == ["2026-03-01T18:30:00Z", "2026-03-01T20:00:00Z"]
    assert [s["utc_offset"] for s in listing] == ["+05:00", "+00:00"] and all(s["version"] == 1 for s in listing)
    berlin = ok(run_cli("-r", repo, "snapshots", env={"TZ": "Europe/Berlin"}))
    assert berlin.index("2026-03-01 19:30:00") < berlin.index("2026-03-01 21:00:00")  # UTC+1 in March
    tokyo = ok(run_cli("-r", repo, "snapshots", env={"TZ": "Asia/Tokyo"}))
    assert "2026-03-02 03:30:00" in tokyo and "2026-03-02 05:00:00" in tokyo and "2 snapshots\n" in tokyo
    one = ok(run_cli("-r", repo, "snapshots", "--host", listing[0]["host"], "--tag", ""))
    assert one.endswith("2 snapshots\n")
    for command in (["info"], ["check"], ["stats"], ["forget", "--keep-last", "5", "--dry-run"]):
        doc = json.loads(ok(run_cli("-r", repo, *command, "--json")))
        assert doc["version"] == 1, command
    info = json.loads(ok(run_cli("-r", repo, "info", "--json")))
    assert info["zero_bytes"] == 0 and info["allocated_bytes"] == info["logical_bytes"] == 80_000
    text = ok(run_cli("-r", repo, "check"))
    assert "checked 2 snapshots" in text and "MiB" not in text and "KiB" in text  # one unit family: KiB, MiB
    assert "MB" not in text.replace("MiB", "")


@pytest.mark.slow
def test_version_quiet_verbose_and_repo_anywhere(repo):
    assert ok(run_cli("--version")).startswith("dedupimg ")
    quiet = ok(run_cli("-q", "-r", repo, "snapshots"))
    assert "snapshots\n" not in quiet and quiet.count("\n") == 3  # header and two rows, no summary
    listing = json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))
    verbose = ok(run_cli("-v", "-r", repo, "snapshots"))
    assert all(s["id"] in verbose and s["source"] in verbose for s in listing)
    fails(run_cli("-q", "-v", "-r", repo, "snapshots"), 2, "not both")
    assert ok(run_cli("snapshots", "-r", repo, "-q")) == quiet  # after the command too, as restic's flags
    assert ok(run_cli("snapshots", "-v", "-r", repo)) == verbose
    fails(run_cli("-q", "snapshots", "-v", "-r", repo), 2, "not both")
    assert "0 snapshots" in ok(run_cli("snapshots", "--name", "-v", "-r", repo))  # an option's value stays one
    a, b = (s["id"] for s in listing)
    assert json.loads(ok(run_cli("diff", a, "-r", repo, b, "--json")))["b"]["id"] == b
    assert json.loads(ok(run_cli("stats", "--json", "-r", repo)))["totals"]["snapshots"] == 2


def test_shell_completion_is_enabled():
    script = ok(run_cli("--show-completion", "bash"))
    assert "_DEDUPIMG_COMPLETE" in script and "complete" in script
    words = ok(run_cli(env={"_DEDUPIMG_COMPLETE": "complete_bash", "COMP_WORDS": "dedupimg ta", "COMP_CWORD": "1"}))
    assert words.split() == ["tag"]
    assert "--install-completion" in ok(run_cli("--help", env={"COLUMNS": "200"}))


@pytest.mark.slow
def test_progress_lines_on_a_non_terminal(repo):
    every = {"DEDUPIMG_PROGRESS_INTERVAL": "0"}  # a line at every step, instead of every 10 s
    proc = run_cli("-r", repo, "check", "--read-data", env=every, text=True)
    ok(proc)
    lines = proc.stderr.splitlines()
    assert any(ln.startswith("check packs: ") and "%" in ln for ln in lines), lines
    assert any(ln.startswith("read data: done, ") for ln in lines), lines
    proc = run_cli("-r", repo, "check", "--read-data", "--json", env=every, text=True)
    status = [json.loads(ln) for ln in proc.stderr.splitlines()]
    assert status and {s["message_type"] for s in status} == {"status", "done"}
    assert all("task" in s and "done" in s and "seconds_elapsed" in s for s in status)
    assert json.loads(ok(proc))["ok"] is True  # stdout still one JSON document
    quiet = run_cli("-q", "-r", repo, "check", "--read-data", env=every, text=True)
    assert ok(quiet) == "" and quiet.stderr == ""  # -q: no progress, and check prints nothing when all is well
    assert run_cli("-r", repo, "check", text=True).stderr == ""  # default: a line only every 10 s


@pytest.mark.slow
def test_serve_name_at_latest_prints_the_ids_it_resolved_to(repo):
    newest = json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))[-1]
    proc = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "serve", "--listen", "127.0.0.1:0",
                             "disk.img@latest"], stderr=subprocess.PIPE, env=cli_env(DEDUPIMG_READ_WORKERS="0"),
                            cwd=ROOT, bufsize=0)  # unbuffered: a buffered first readline could take both lines,
    # and the second first_line() would then wait on an empty pipe
    try:
        assert proc.stderr is not None
        assert first_line(proc.stderr).startswith("serving 1 export on nbd://127.0.0.1:")
        line = first_line(proc.stderr)
        assert line.startswith(f"export {newest['id']} disk.img "), line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
