"""Entries in ``packs/`` that are not pack files (issue 11 §4b), through the installed command.

A FIFO named like a pack used to block open() for ever (check, repair index, restore, verify, serve all hung,
and a hung restore ignored SIGTERM and left its temporary file); a directory named like a pack made prune fail
with exit 1. Every pack is now opened non-blocking and refused unless it is a regular file, and directories
are reported and left alone. Each command here runs with a timeout: a hang fails the test instead of CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dedupimg.ops.snapshot import take_snapshot
from tests.helpers import ROOT, det_bytes, fails, run_cli, small_repo, text_bytes
from tests.packfiles import pack_file as pack_file_of

TIMEOUT = 60  # seconds: far more than any of these commands needs on a small repository


def cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, text=True, timeout=TIMEOUT, cwd=ROOT)


@pytest.fixture
def fifo_repo(tmp_path: Path) -> tuple[Path, str, str, Path, dict[str, bytes]]:
    """Two snapshots sharing no pack; the pack holding the first one's data replaced by a FIFO.

    Returns (repo, damaged id, intact id, the FIFO, {id: image bytes}).
    """
    repo = tmp_path / "repo"
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(det_bytes(1, 200_000) + text_bytes(2, 100_000))
    second.write_bytes(det_bytes(3, 200_000))
    with small_repo(repo) as r:
        damaged = take_snapshot(r, str(first)).record
        intact = take_snapshot(r, str(second)).record
        chunk = r.segment(damaged.segments[0][0]).chunk_ids()[3]
        loc = r.index.lookup_blobs([chunk])[0]
        assert loc is not None
        pack_file = pack_file_of(r, r.index.pack_id(loc.pack_no))
    pack_file.unlink()
    os.mkfifo(pack_file)
    images = {damaged.hex_id: first.read_bytes(), intact.hex_id: second.read_bytes()}
    return repo, damaged.hex_id, intact.hex_id, pack_file, images


def test_check_reports_a_fifo_and_does_not_hang(fifo_repo):
    repo, damaged, intact, fifo, _ = fifo_repo
    for args in ([], ["--read-data"]):
        proc = cli("-r", repo, "check", *args)
        assert proc.returncode == 17, (proc.stdout, proc.stderr)
        assert f"pack {fifo.name}: is a FIFO, not a pack file" in proc.stdout
        assert damaged[:8] in proc.stdout and intact[:8] not in proc.stdout
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["restore", "verify"])
def test_restore_and_verify_refuse_a_fifo_at_once(fifo_repo, tmp_path, command):
    repo, damaged, intact, fifo, images = fifo_repo
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "restored.img"
    args = ["restore", damaged, target] if command == "restore" else ["verify", damaged]
    err = fails(cli("-r", repo, *args), 17)
    assert fifo.name in err and "FIFO" in err
    assert list(out_dir.iterdir()) == []  # no temporary file left behind, no target
    # The other snapshot does not need that pack: it still restores bit-exact.
    proc = cli("-r", repo, "restore", intact, target)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == images[intact]


def test_repair_index_skips_a_fifo_and_prune_removes_it(fifo_repo):
    repo, damaged, intact, fifo, _ = fifo_repo
    proc = cli("-r", repo, "repair", "index")
    assert proc.returncode == 0, proc.stderr
    assert f"skipped damaged pack {fifo.name}: is a FIFO, not a pack file" in proc.stdout + proc.stderr
    listed = json.loads(cli("-r", repo, "snapshots", "--json").stdout)
    assert [s["id"] for s in listed] == [intact]  # the snapshot that needed the lost pack is left out
    # Unlisted now, the FIFO is an orphan: check names it, prune deletes it (it never opens it).
    proc = cli("-r", repo, "check")
    assert proc.returncode == 17 and fifo.name in proc.stdout and "FIFO" in proc.stdout
    proc = cli("-r", repo, "prune")
    assert proc.returncode == 0, proc.stderr
    assert not fifo.exists() and not fifo.is_fifo()
    # What is left to report is the left-out snapshot's record (its data is gone), not the FIFO.
    proc = cli("-r", repo, "check")
    assert "FIFO" not in proc.stdout and fifo.name not in proc.stdout and "record-unlisted" in proc.stdout


@pytest.mark.parametrize("workers", ["0", "1"])
def test_serve_answers_eio_for_a_fifo_and_goes_on(fifo_repo, tmp_path, workers):
    """Reads through the server: in process (no workers) and through a read worker."""
    repo, damaged, intact, _, images = fifo_repo
    env = {k: v for k, v in os.environ.items() if k not in ("DEDUPIMG_REPO", "DEDUPIMG_DEBUG")}
    env["DEDUPIMG_READ_WORKERS"] = workers
    server = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", str(repo), "serve", "--listen",
                               "127.0.0.1:0"], stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert server.stderr is not None
        line = server.stderr.readline().decode()
        assert line.startswith("serving ") and " on nbd://" in line, line
        url = line.split(" on ", 1)[1].strip()
        bad = subprocess.run(["nbdcopy", f"{url}/{damaged}", str(tmp_path / "bad.img")], capture_output=True,
                             timeout=TIMEOUT)
        assert bad.returncode != 0
        good = subprocess.run(["nbdcopy", f"{url}/{intact}", str(tmp_path / "good.img")], capture_output=True,
                              timeout=TIMEOUT)
        assert good.returncode == 0, good.stderr
        assert (tmp_path / "good.img").read_bytes() == images[intact]
    finally:
        server.terminate()
        server.wait(TIMEOUT)


def test_directories_in_packs_and_tmp_are_reported_and_left_alone(tmp_path):
    repo = tmp_path / "repo"
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(4, 150_000))
    with small_repo(repo) as r:
        sid = take_snapshot(r, str(image)).record.hex_id
        packs_dir, tmp_dir = r.path / "packs", r.path / "tmp"
    odd_pack = packs_dir / "ab" / f"{'ab' * 32}.pack"  # named exactly like a pack the index does not list
    odd_pack.mkdir()
    (odd_pack / "something").write_bytes(b"not ours")
    odd_tmp = tmp_dir / "12-0123456789abcdef.tmp"
    odd_tmp.mkdir()

    proc = cli("-r", repo, "check", "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    hints = json.loads(proc.stdout)["hints"]
    assert any(h["kind"] == "stray-dir" and str(odd_pack) in h["message"] for h in hints), hints

    for args in (["prune", "--dry-run"], ["prune"]):
        proc = cli("-r", repo, *args)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        assert f"skipped {odd_pack}: a directory" in proc.stdout and f"skipped {odd_tmp}: a directory" in proc.stdout
    doc = json.loads(cli("-r", repo, "prune", "--json").stdout)
    assert sorted(doc["skipped"]) == sorted([str(odd_pack), str(odd_tmp)])
    assert (odd_pack / "something").read_bytes() == b"not ours" and odd_tmp.is_dir()

    proc = cli("-r", repo, "repair", "index")
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {odd_pack}: a directory" in proc.stdout
    assert json.loads(cli("-r", repo, "repair", "index", "--json").stdout)["skipped"] == [str(odd_pack)]
    proc = cli("-r", repo, "restore", sid, tmp_path / "out.img")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()
