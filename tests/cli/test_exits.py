"""How the CLI ends when things go wrong around the command rather than in it (found by a review of the CLI):
an init that fails or is killed midway, a repository's tmp/ that is not a directory, an unusable cache
directory, a reader that closes standard output, a command group without its command, a Ctrl-C during the
imports or just after a snapshot was stored; and the "version" of every JSON document.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dedupimg.repo.repository import Repository
from tests.helpers import cli_env, det_bytes, fails, ok, run_cli, sh

# -- init: all or nothing ---------------------------------------------------------------------------------------


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with 100 inodes: fewer than a repository's directories (packs/00 ... packs/ff), so init fails
    midway with ENOSPC."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=100", "tmpfs", mnt)
    try:
        yield mnt
    finally:
        sh("umount", mnt)


def test_an_init_that_fails_midway_leaves_nothing_and_the_next_init_works(few_inodes):
    repo, empty = few_inodes / "repo", few_inodes / "empty"
    empty.mkdir()  # an existing empty directory (a mount point, say) is built in place
    for path in (repo, empty):
        fails(run_cli("-r", path, "init"), 18, "no space left on device", str(path))
    assert sorted(os.listdir(few_inodes)) == ["empty"]  # no repo/, no temporary directory beside it
    assert os.listdir(empty) == []
    sh("mount", "-o", "remount,nr_inodes=2000", few_inodes)
    for path in (repo, empty):  # was: "exists and is not empty; refusing to create a repository there"
        assert "created repository" in ok(run_cli("-r", path, "init"))
        assert "0 snapshots" in ok(run_cli("-r", path, "snapshots"))
    assert sorted(os.listdir(few_inodes)) == ["empty", "repo"]


def _pid_gone() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_what_a_killed_init_left_does_not_stop_the_next_one(tmp_path):
    # A kill -9 mid-init: a new path's repository was being built under a temporary name beside it; an existing
    # empty directory's in place, behind a marker. Both remains are what such a kill leaves, with the process gone.
    dead = _pid_gone()
    beside = tmp_path / f".repo.init-{dead}-0123abcd"
    (beside / "packs" / "00").mkdir(parents=True)
    (beside / "tmp").mkdir()
    running = tmp_path / f".repo.init-{os.getpid()}-89abcdef"  # an init still running (this process) is left
    running.mkdir()
    ok(run_cli("-r", tmp_path / "repo", "init"))
    assert not beside.exists() and running.exists()
    assert "0 snapshots" in ok(run_cli("-r", tmp_path / "repo", "snapshots"))

    inplace = tmp_path / "mountpoint"
    (inplace / "packs" / "00").mkdir(parents=True)
    (inplace / "index").mkdir()
    (inplace / ".init-unfinished").touch()
    ok(run_cli("-r", inplace, "init"))
    assert sorted(os.listdir(inplace)) == sorted(os.listdir(tmp_path / "repo"))  # the marker is gone too
    # Without the marker, what is there may be anyone's: refused as before.
    other = tmp_path / "other"
    (other / "packs").mkdir(parents=True)
    fails(run_cli("-r", other, "init"), 21, "not empty")


# -- a damaged repository's tmp/ ------------------------------------------------------------------------------------


def test_a_tmp_that_is_a_file_or_missing_is_exit_16_naming_it(tmp_path):
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--encryption", "none"))
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(5, 60_000))
    (repo / "tmp").rmdir()
    (repo / "tmp").write_text("x")
    for command in (["snapshot", image], ["repair", "index"]):  # was exit 1, "Not a directory: .../tmp/..."
        fails(run_cli("-r", repo, *command), 16, f"{repo / 'tmp'} is not a directory")
    (repo / "tmp").unlink()
    fails(run_cli("-r", repo, "snapshot", image), 16, f"{repo / 'tmp'} is missing")
    (repo / "tmp").mkdir()
    ok(run_cli("-r", repo, "snapshot", image))


# -- an unusable cache directory (remote repositories) ------------------------------------------------------------


def test_an_unusable_cache_directory_is_exit_16_naming_it(s3_server: Any, s3_credentials: None, tmp_path: Path):
    location = f"s3:{s3_server.endpoint}/{s3_server.bucket}/exits-{uuid.uuid4().hex[:12]}"
    ok(run_cli("-r", location, "init", env={"DEDUPIMG_CACHE_DIR": str(tmp_path / "cache")}))
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "at-all")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", readonly)
    try:
        for cache in (tmp_path / "file" / "below",  # ENOTDIR
                      tmp_path / "dangling",  # ENOENT: a symlink to a path whose parent is missing
                      readonly):  # EROFS
            for args in (["--cache-dir", cache, "snapshots"], ["snapshots"]):  # the option or the environment
                line = fails(run_cli("-r", location, *args, env={"DEDUPIMG_CACHE_DIR": str(cache)}), 16,
                             "cannot use the cache directory")
                assert str(cache) in line, line
    finally:
        sh("umount", readonly)


# -- standard output closed by its reader -----------------------------------------------------------------------------


def _with_stdout_closed(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    """The CLI with standard output a pipe whose reader is gone (``| head -c0`` that has exited)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "dedupimg", *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, env=cli_env(), timeout=120)
    finally:
        os.close(write)


def test_a_closed_standard_output_ends_the_command_quietly_with_141(tmp_path):
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--encryption", "aes-256-gcm"))  # `key list` too (the unencrypted CLI pass)
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(6, 60_000))
    ok(run_cli("-r", repo, "snapshot", image))
    for args in (["snapshots", "--json"], ["snapshots"], ["info"], ["key", "list"]):
        proc = _with_stdout_closed("-r", repo, *args)  # was exit 1, or 120 and "Exception ignored" for --json
        assert (proc.returncode, proc.stderr) == (141, b""), (args, proc.returncode, proc.stderr)
    # A restore to a closed pipe is an incomplete image: that stays an error, said so.
    proc = _with_stdout_closed("-r", repo, "restore", "latest", "-")
    assert proc.returncode == 16 and b"output pipe closed" in proc.stderr, proc.stderr


# -- JSON -------------------------------------------------------------------------------------------------------------


def test_every_json_document_has_a_version(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    ok(run_cli("-r", src, "init", "--encryption", "aes-256-gcm"))  # `key list` too (the unencrypted CLI pass)
    ok(run_cli("-r", dst, "init", "--encryption", "aes-256-gcm", "--copy-chunker-params-from", src))
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(7, 60_000))
    ok(run_cli("-r", src, "snapshot", image))
    docs = {
        "copy": json.loads(ok(run_cli("-r", dst, "copy", "--from-repo", src, "--json"))),
        "unlock": json.loads(ok(run_cli("-r", dst, "unlock", "--json"))),
        "repair index": json.loads(ok(run_cli("-r", dst, "repair", "index", "--json"))),
    }
    keys = json.loads(ok(run_cli("-r", dst, "key", "list", "--json")))
    docs.update({f"key list [{i}]": k for i, k in enumerate(keys)})
    for command, doc in docs.items():
        assert doc.get("version") == 1, (command, doc)
    assert docs["copy"]["copied"] == 1 and docs["copy"]["snapshots"][0]["version"] == 1


# -- a group without its command -------------------------------------------------------------------------------------


def test_a_command_group_without_its_command_says_so_in_one_line():
    for group, commands in (("key", "list, add, remove, passwd"), ("repair", "index")):
        proc = run_cli(group)
        fails(proc, 2, f"dedupimg {group}: missing command ({commands})", f"dedupimg {group} --help")
        assert proc.stdout == b""  # was the whole help text, and no error line


# -- signals -----------------------------------------------------------------------------------------------------------

# ``python -m dedupimg`` with what comes before dedupimg/__main__.py's first line kept out of reach of the signal:
# SIGINT is ignored while the interpreter starts (site, ...), imports the package and reads __main__.py, as runpy
# does (a SIGINT there is the interpreter's, whatever the program); then the default handler is back, as
# ``python -m`` has it, and __main__.py runs. (What is left is a few bytecodes before its handler is installed.)
_AS_PYTHON_M = """
import signal, sys
import dedupimg
path = dedupimg.__path__[0] + "/__main__.py"
code = compile(open(path).read(), path, "exec")
sys.argv[0] = "dedupimg"
signal.signal(signal.SIGINT, signal.default_int_handler)
exec(code, {"__name__": "__main__", "__file__": path, "__package__": "dedupimg", "__builtins__": __builtins__})
"""


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _snapshot_count(repo: Path) -> int:
    with Repository.open(repo) as r:
        return len(r.snapshots())


@pytest.mark.slow
def test_a_sigint_at_any_moment_is_130_and_nothing_stored_or_0_and_stored(tmp_path):
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--encryption", "none"))
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(8, 300_000))
    command = [sys.executable, "-c", _AS_PYTHON_M, "-r", str(repo), "snapshot", str(image), "--name", "d"]
    durations = []
    for _ in range(3):
        started = time.monotonic()
        ok(subprocess.run(command, capture_output=True, env=cli_env(), timeout=120))
        durations.append(time.monotonic() - started)
    duration = sorted(durations)[1]
    rng = random.Random(7)
    outcomes: dict[int, int] = {}
    for i in range(40):
        before = _snapshot_count(repo)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                                preexec_fn=_ignore_sigint)
        # Any moment (the imports take the first ~2/3), and every other run near the end: the commit, the
        # summary, the interpreter's shutdown (where a signal killed the process after its snapshot was stored).
        time.sleep(duration * (rng.uniform(0, 1.1) if i % 2 else rng.uniform(0.75, 1.1)))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        listed = _snapshot_count(repo) - before
        assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()
        # Never killed by the signal (-2, which a shell reports as 130): a command that ran to the end exits 0
        # and its snapshot is listed; 130 means nothing was stored.
        assert (proc.returncode, listed) in ((0, 1), (130, 0)), (proc.returncode, listed, err.decode())
        if proc.returncode == 130:
            assert len(err.decode().strip().splitlines()) <= 1, err.decode()
        outcomes[proc.returncode] = outcomes.get(proc.returncode, 0) + 1
    assert outcomes.get(0) and outcomes.get(130), outcomes  # the signals fell on both sides of the commit
    shutil.rmtree(repo)
