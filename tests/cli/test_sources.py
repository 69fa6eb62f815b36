"""Snapshot sources through the CLI: two machines under one name, a source that changes or shrinks while it is
read, FIFOs, a stalled stdin, user text that looks like rich markup, comma-separated tags, --time range."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dedupimg.repo.repository import Repository
from dedupimg.serve.mount import build_tree
from tests.helpers import det_bytes, fails, ok, run_cli, text_bytes, write_sparse

MiB = 1 << 20
WIDE = {"COLUMNS": "400"}  # rich tables fit their width: a wide one shows every cell whole


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    ok(run_cli("-r", path, "init", "--chunk-size", "4096"))
    return path


def listing(repo: Path) -> list[dict[str, object]]:
    return json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))


def _popen(*args: str | os.PathLike[str], **kwargs: object) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("DEDUPIMG_REPO", "DEDUPIMG_DEBUG")}
    return subprocess.Popen([sys.executable, "-m", "dedupimg", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **kwargs)  # type: ignore[call-overload]


def _wait_for(what: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)


def _source_fd(pid: int, path: Path) -> str | None:
    """The number of the fd by which process ``pid`` has ``path`` open, or None."""
    fds = Path(f"/proc/{pid}/fd")
    path = path.resolve()
    try:
        for fd in fds.iterdir():
            try:
                if os.readlink(fd) == str(path):
                    return fd.name
            except OSError:
                continue
    except OSError:
        pass
    return None


# -- one name, two machines ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_name_of_another_source_path_is_refused(repo, tmp_path):
    a, b = tmp_path / "vms" / "a" / "disk.img", tmp_path / "vms" / "b" / "disk.img"
    for i, path in enumerate((a, b)):
        path.parent.mkdir(parents=True)
        path.write_bytes(det_bytes(i, 100_000))
    ok(run_cli("-r", repo, "snapshot", a))
    ok(run_cli("-r", repo, "snapshot", a))  # the same source again: the same series
    line = fails(run_cli("-r", repo, "snapshot", b), 2, "--name")
    assert "disk.img" in line and str(a) in line and str(b) in line
    assert [s["source"] for s in listing(repo)] == [str(a)] * 2  # nothing stored
    # A symlink to the same file, under the same base name, is the same source, either way round.
    link = tmp_path / "vms" / "link"
    link.mkdir()
    (link / "disk.img").symlink_to(a)
    ok(run_cli("-r", repo, "snapshot", link / "disk.img"))
    ok(run_cli("-r", repo, "snapshot", a))
    ok(run_cli("-r", repo, "snapshot", b, "--name", "vm-b"))
    ok(run_cli("-r", repo, "snapshot", b, "--name", "disk.img"))  # an explicit name is taken as given


@pytest.mark.slow
def test_default_name_of_another_host_is_refused(repo, tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare"):  # as CI runs: root, util-linux from setup.sh
        pytest.fail("this test takes a snapshot under another host name: it needs root and unshare (util-linux)")
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(1, 100_000))
    ok(run_cli("-r", repo, "snapshot", image))
    # The same path on another machine (a shared repository): same name, another host.
    script = f"hostname other-host && exec {sys.executable} -m dedupimg -r {repo} snapshot {image}"
    proc = subprocess.run(["unshare", "--uts", "sh", "-c", script], capture_output=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "DEDUPIMG_REPO"})
    fails(proc, 2, "other-host")
    assert len(listing(repo)) == 1


# -- a source that changes or shrinks while it is read --------------------------------------------------------


@pytest.mark.slow
def test_source_changed_while_read_is_stored_marked_and_exits_3(repo, tmp_path):
    image = tmp_path / "live.img"
    data = det_bytes(7, 64 * MiB)
    image.write_bytes(data)
    proc = _popen("-r", repo, "snapshot", image, "--json")
    _wait_for(lambda: _source_fd(proc.pid, image) is not None, proc)
    # Touch the file (mtime and ctime) until the snapshot ends: one touch lands while it is read.
    t = 1_700_000_000
    while proc.poll() is None:
        os.utime(image, (t, t))
        t += 1
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 3, err.decode()
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dedupimg: warning: ") and "changed while it was read" in lines[0]
    doc = json.loads(out)
    assert doc["changed_during_read"] is True
    [listed] = listing(repo)
    assert listed["id"] == doc["id"] and listed["changed_during_read"] is True
    table = ok(run_cli("-r", repo, "snapshots", env=WIDE))
    assert "changed during read" in table
    restored = tmp_path / "out.img"  # stored whole: it restores (the bytes the reads saw)
    ok(run_cli("-r", repo, "restore", doc["id"], restored))
    assert restored.read_bytes() == data
    # An unchanged source: exit 0, not marked, no note column.
    plain = tmp_path / "quiet.img"
    plain.write_bytes(text_bytes(3, 200_000))
    doc2 = json.loads(ok(run_cli("-r", repo, "snapshot", plain, "--json")))
    assert doc2["changed_during_read"] is False
    assert [s["changed_during_read"] for s in listing(repo)] == [True, False]
    assert "3 snapshot stored" in ok(run_cli("snapshot", "--help", env=WIDE))


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_source_truncated_while_read_fails_with_16(repo, tmp_path, sparse):
    image = tmp_path / "shrinking.img"
    size = 256 * MiB
    if sparse:  # 1 MiB of data every 4 MiB, the first at 1 MiB: 64 MiB to read, holes between
        write_sparse(image, size, [(off + MiB, det_bytes(off, MiB)) for off in range(0, size, 4 * MiB)])
    else:
        image.write_bytes(det_bytes(5, 96 * MiB))
    proc = _popen("-r", repo, "snapshot", image)

    def regions_started() -> bool:
        # The first SEEK_DATA/SEEK_HOLE moves the fd's offset: the source was opened and its size taken.
        fd = _source_fd(proc.pid, image)
        if fd is None:
            return False
        try:
            info = Path(f"/proc/{proc.pid}/fdinfo/{fd}").read_text()
        except OSError:
            return False
        return int(info.split("pos:")[1].split()[0]) > 0

    _wait_for(regions_started, proc)
    os.truncate(image, 2 * MiB)  # inside the first data region, below every later one
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 16, (out, err)
    line = err.decode().strip()
    assert len(line.splitlines()) == 1 and ("shrank" in line or "ended early" in line), line
    assert listing(repo) == []  # nothing stored


# -- FIFOs and stdin ----------------------------------------------------------------------------------------


def test_fifo_as_source_is_refused_at_once(repo, tmp_path):
    fifo = tmp_path / "pipe.img"
    os.mkfifo(fifo)
    proc = _popen("-r", repo, "snapshot", fifo)
    try:
        out, err = proc.communicate(timeout=60)  # no wait for a writer
    finally:
        proc.kill()
    fails(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 16, "FIFO")
    data = text_bytes(4, 300_000)
    # A pipe on stdin still works.
    doc = json.loads(ok(run_cli("-r", repo, "snapshot", "-", "--name", "piped", "--json", input=data)))
    assert doc["size"] == len(data) and doc["source"] == "<stdin>"


@pytest.mark.slow
def test_sigterm_while_stdin_is_stalled_exits_within_a_second(repo):
    read_end, write_end = os.pipe()
    try:
        proc = _popen("-r", repo, "snapshot", "-", "--name", "stalled", stdin=read_end)
        os.close(read_end)
        os.write(write_end, det_bytes(1, 50_000))  # some data (less than a pipe holds), then the writer stalls

        def reading() -> bool:  # the reader, hasher and pool threads are up: the snapshot waits for stdin
            return len(os.listdir(f"/proc/{proc.pid}/task")) >= 3

        _wait_for(reading, proc)
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
        took = time.monotonic() - sent
    finally:
        os.close(write_end)
    assert proc.returncode == 130, err.decode()
    assert "interrupted by SIGTERM" in err.decode()
    assert took < 1.0, took
    assert listing(repo) == []


# -- user text is not markup --------------------------------------------------------------------------------


@pytest.mark.slow
def test_names_tags_and_paths_print_literally_everywhere(repo, tmp_path):
    name, tag = "[bold]web[/bold] [/x]:smile:", "[/tag]"
    folder = tmp_path / "[red]dir"  # no "/" in a file name: opening tags only
    folder.mkdir()
    image = folder / "[bold]oops.img"
    image.write_bytes(text_bytes(2, 200_000))
    for _ in range(2):
        ok(run_cli("-r", repo, "snapshot", image, "--name", name, "--tag", tag))
    sid = ok(run_cli("-r", repo, "snapshot", image)).strip()  # default name "[bold]oops.img"
    table = ok(run_cli("-r", repo, "snapshots", env=WIDE))
    assert name in table and tag in table and "[bold]oops.img" in table
    out = ok(run_cli("-r", repo, "forget", "--keep-last", "1", "--dry-run", env=WIDE))
    assert f"{name}: keep 1" in out and tag in out
    out = ok(run_cli("-r", repo, "forget", "--keep-tag", tag, "--name", name, env=WIDE))
    assert f"has tags [{tag}]" in out
    assert "no problems found" in ok(run_cli("-r", repo, "check", env=WIDE))
    restored = folder / "[b]restored.img"
    out = ok(run_cli("-r", repo, "restore", sid, restored, env=WIDE))
    assert str(restored) in out
    ok(run_cli("-r", repo, "verify", sid))
    # Messages too: an error naming the snapshot name.
    fails(run_cli("-r", repo, "restore", "latest", "--name", "[/nope]", tmp_path / "x.img"), 13, "[/nope]")
    # The progress bar (stderr a terminal) shows the name as given.
    if shutil.which("script"):
        cmd = f"{sys.executable} -m dedupimg -r '{repo}' snapshot '{image}' --name '{name}'"
        proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, timeout=120,
                              env={**os.environ, **WIDE})
        assert proc.returncode == 0, proc.stdout.decode(errors="replace")
        assert name.encode() in proc.stdout


def test_repository_path_with_markup_prints_literally(tmp_path):
    repo = tmp_path / "[bold]repo[/bold]"
    assert str(repo) in ok(run_cli("-r", repo, "init", env=WIDE))
    assert str(repo) in ok(run_cli("-r", repo, "info", env=WIDE))


# -- tags ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tag_with_commas_is_several_tags(repo, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(text_bytes(6, 100_000))
    first = json.loads(ok(run_cli("-r", repo, "snapshot", image, "--tag", "gold,weekly", "--tag", " x , ,y",
                                  "--time", "2026-01-01T00:00:00+00:00", "--json")))
    assert first["tags"] == ["gold", "weekly", "x", "y"]
    ok(run_cli("-r", repo, "snapshot", image, "--time", "2026-01-02T00:00:00+00:00"))
    ok(run_cli("-r", repo, "snapshot", image, "--time", "2026-01-03T00:00:00+00:00"))
    # restic's --keep-tag a,b: keep what has both tags; the snapshot tagged "gold,weekly" has them.
    doc = json.loads(ok(run_cli("-r", repo, "forget", "--keep-tag", "gold,weekly", "--keep-last", "1", "--json")))
    [group] = doc["groups"]
    assert {k["id"] for k in group["keep"]} == {first["id"], listing(repo)[-1]["id"]}
    assert len(group["remove"]) == 1


# -- --time -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", [
    "0001-01-01T00:00:00+01:00",  # year 0 in UTC: mount's conversion overflowed
    "9999-12-31T23:00:00-05:00",  # year 10000 in UTC
    "1969-12-31T23:59:59+00:00",
    "1970-01-01T00:30:00+01:00",  # 1969 in UTC
    "0001-01-01T00:00:00",  # naive: local time
])
def test_time_out_of_range_is_refused(repo, tmp_path, when):
    image = tmp_path / "disk.img"
    image.write_bytes(text_bytes(8, 50_000))
    fails(run_cli("-r", repo, "snapshot", image, "--time", when), 2, "out of range")
    assert listing(repo) == []


@pytest.mark.slow
def test_times_at_the_ends_of_the_range_are_stored_and_mountable(repo, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(text_bytes(8, 50_000))
    for when in ("1970-01-01T00:00:00+00:00", "9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59+05:00"):
        ok(run_cli("-r", repo, "snapshot", image, "--time", when))
    with Repository.open(repo) as r:
        tree = build_tree(r.snapshots())  # what mount shows: every record's time converts
    assert sum(1 for p in tree if p.startswith("/by-id/")) == 3


def test_name_longer_than_255_bytes_is_refused_in_one_line(repo, tmp_path):
    """A 5000 character name broke `ls` of the mount (found by review): refused before anything is read, in one
    line that quotes only its start; 255 bytes of UTF-8 (what a file name may be) is taken."""
    image = tmp_path / "disk.img"
    image.write_bytes(text_bytes(3, 50_000))
    line = fails(run_cli("-r", repo, "snapshot", image, "--name", "x" * 5000), 2, "5000 bytes", "at most 255")
    assert len(line) < 200
    fails(run_cli("-r", repo, "snapshot", image, "--name", "é" * 128), 2, "256 bytes")  # bytes, not characters
    assert listing(repo) == []
    ok(run_cli("-r", repo, "snapshot", image, "--name", "é" * 127 + "x"))
    assert [s["name"] for s in listing(repo)] == ["é" * 127 + "x"]
