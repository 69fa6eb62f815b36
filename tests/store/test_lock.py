"""Repository locks of a local store (dedupimg/store/lock.py): real files, real flock, real processes."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupimg.core.errors import PermissionDenied, RepositoryLocked, RepositoryNotFound
from dedupimg.store import lock as lock_mod
from dedupimg.store.lock import LockMode, RepositoryLock
from tests.helpers import ROOT

SHARED, EXCLUSIVE = LockMode.SHARED, LockMode.EXCLUSIVE

# A lock holder in another process: acquires, says "locked <pid>", sleeps. With "fork" it forks a sleeping child
# first, releases its own descriptor and exits, so that only the child still holds the lock.
HOLDER = """
import os, sys, time
from pathlib import Path
from dedupimg.store.lock import LockMode, RepositoryLock
lock = RepositoryLock(Path(sys.argv[1]), LockMode[sys.argv[2]], what=sys.argv[3])
lock.acquire()
if sys.argv[4] == "fork":
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    lock.release()
    print("locked", pid, flush=True)
    sys.exit(0)
print("locked", os.getpid(), flush=True)
time.sleep(60)
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    return path


def start_holder(repo: Path, mode: LockMode, what: str, how: str = "sleep") -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(repo), mode.name, what, how], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    word, pid = proc.stdout.readline().split()
    assert word == "locked"
    return proc, int(pid)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def test_shared_locks_coexist(repo: Path) -> None:
    with RepositoryLock(repo, SHARED, what="snapshot") as a, RepositoryLock(repo, SHARED, what="restore") as b:
        assert a.locked and b.locked
    assert not a.locked and not b.locked


def test_lock_file_is_created_and_kept(repo: Path) -> None:
    with RepositoryLock(repo, EXCLUSIVE, what="prune"):
        pass
    path = repo / "lock"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) & ~0o644 == 0
    assert path.read_text() == f"{os.getpid()} prune\n"
    with RepositoryLock(repo, SHARED):  # a shared holder leaves the record alone
        pass
    assert path.read_text() == f"{os.getpid()} prune\n"


def test_exclusive_blocks_shared(repo: Path) -> None:
    with RepositoryLock(repo, EXCLUSIVE, what="prune"):
        t0 = time.monotonic()
        with pytest.raises(RepositoryLocked) as info:
            RepositoryLock(repo, SHARED, what="snapshot").acquire()
        assert time.monotonic() - t0 < 0.2  # wait=0: one attempt, no sleeping
    err = info.value
    assert err.exit_code == 11
    msg = str(err)
    assert "\n" not in msg
    assert f"repository {repo} is locked" in msg
    assert "shared lock wanted for snapshot" in msg
    assert f"last exclusive holder recorded: pid {os.getpid()} (prune)" in msg
    assert "--lock-wait" in msg


def test_shared_blocks_exclusive(repo: Path) -> None:
    with RepositoryLock(repo, SHARED, what="restore"), RepositoryLock(repo, SHARED, what="serve"):
        with pytest.raises(RepositoryLocked) as info:
            RepositoryLock(repo, EXCLUSIVE, what="forget").acquire()
    msg = str(info.value)
    assert f"repository {repo} is locked" in msg
    assert "exclusive lock wanted for forget" in msg
    assert "shared by other processes" in msg
    assert "did not wait" in msg
    # The failed attempt (and its shared probe) left nothing behind.
    with RepositoryLock(repo, EXCLUSIVE):
        pass


def test_exclusive_blocks_exclusive(repo: Path) -> None:
    with RepositoryLock(repo, EXCLUSIVE, what="prune"):
        with pytest.raises(RepositoryLocked, match="exclusive lock wanted for forget; an exclusive lock is held"):
            RepositoryLock(repo, EXCLUSIVE, what="forget").acquire()


def test_waits_for_the_holder_to_release(repo: Path) -> None:
    holder = RepositoryLock(repo, EXCLUSIVE, what="prune")
    holder.acquire()
    timer = threading.Timer(0.3, holder.release)
    timer.start()
    try:
        t0 = time.monotonic()
        with RepositoryLock(repo, SHARED, wait=1.0, what="snapshot") as lock:
            elapsed = time.monotonic() - t0
            assert lock.locked
    finally:
        timer.join()
    assert 0.25 <= elapsed < 0.9


def test_wait_is_honoured(repo: Path) -> None:
    with RepositoryLock(repo, SHARED, what="mount"):
        t0 = time.monotonic()
        with pytest.raises(RepositoryLocked, match=r"waited 0\.5 s; try again"):
            RepositoryLock(repo, EXCLUSIVE, wait=0.5, what="prune").acquire()
        elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 0.8


def test_other_process_and_sigkill_leaves_no_stale_lock(repo: Path, procs: list[subprocess.Popen[str]]) -> None:
    proc, pid = start_holder(repo, EXCLUSIVE, "prune")
    procs.append(proc)
    assert pid == proc.pid
    with pytest.raises(RepositoryLocked, match=f"last exclusive holder recorded: pid {pid} \\(prune\\)"):
        RepositoryLock(repo, SHARED, what="restore").acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with RepositoryLock(repo, EXCLUSIVE, what="prune") as lock:  # wait=0: the lock is free at once
        assert lock.locked


def test_shared_holder_in_other_process(repo: Path, procs: list[subprocess.Popen[str]]) -> None:
    proc, _ = start_holder(repo, SHARED, "serve")
    procs.append(proc)
    with RepositoryLock(repo, SHARED, what="snapshot"):
        pass
    with pytest.raises(RepositoryLocked, match="shared by other processes"):
        RepositoryLock(repo, EXCLUSIVE, what="prune").acquire()
    proc.terminate()
    proc.wait()
    with RepositoryLock(repo, EXCLUSIVE):
        pass


def test_forked_child_keeps_the_lock(repo: Path, procs: list[subprocess.Popen[str]]) -> None:
    # What `mount` relies on: the background server forked after acquiring keeps the lock after the parent
    # released its descriptor and exited.
    proc, child = start_holder(repo, SHARED, "mount", how="fork")
    procs.append(proc)
    assert proc.wait() == 0
    try:
        with pytest.raises(RepositoryLocked, match="shared by other processes"):
            RepositoryLock(repo, EXCLUSIVE, what="prune").acquire()
    finally:
        os.kill(child, signal.SIGKILL)
    with RepositoryLock(repo, EXCLUSIVE, wait=3.0):  # the child is not ours to reap: allow for its exit
        pass


def test_interrupt_while_waiting_closes_the_descriptor(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    fds = len(os.listdir("/proc/self/fd"))
    with RepositoryLock(repo, EXCLUSIVE):
        monkeypatch.setattr(lock_mod.time, "sleep", interrupted)
        with pytest.raises(KeyboardInterrupt):
            RepositoryLock(repo, SHARED, wait=5.0).acquire()
        monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == fds
    with RepositoryLock(repo, EXCLUSIVE):
        pass


def test_not_reentrant(repo: Path) -> None:
    lock = RepositoryLock(repo, SHARED)
    with lock, pytest.raises(RuntimeError):
        lock.acquire()
    lock.release()  # releasing twice is harmless


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFound):
        RepositoryLock(tmp_path / "nope", SHARED).acquire()
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_filesystem_without_flock(repo: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    with pytest.raises(RepositoryLocked, match=f"repository {repo} is on a filesystem without working flock"):
        RepositoryLock(repo, SHARED).acquire()


def read_only(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Make opening REPO/lock for writing fail with ``code`` (tests run as root, so chmod would not do)."""
    real_open = os.open

    def fake_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        if Path(path).name == "lock" and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(lock_mod.os, "open", fake_open)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_repository_with_lock_file(repo: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    (repo / "lock").write_text("")
    with RepositoryLock(repo, EXCLUSIVE, what="prune"):  # another, writable process
        read_only(monkeypatch, code)
        with pytest.raises(RepositoryLocked, match="shared lock wanted"):
            RepositoryLock(repo, SHARED).acquire()
        # Read-only descriptors lock too, in either mode, and still conflict with the writable holder.
        with pytest.raises(RepositoryLocked, match="exclusive lock wanted"):
            RepositoryLock(repo, EXCLUSIVE).acquire()
    with RepositoryLock(repo, SHARED) as lock:
        assert lock.locked
        monkeypatch.undo()
        with pytest.raises(RepositoryLocked):
            RepositoryLock(repo, EXCLUSIVE).acquire()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_repository_without_lock_file(repo: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    read_only(monkeypatch, code)
    with RepositoryLock(repo, SHARED, what="restore") as lock:
        assert not lock.locked  # read-only media: proceed unlocked
        lock.check()  # ... which counts as held: nothing can change the repository through this path
    with pytest.raises(PermissionDenied, match=f"cannot open {repo / 'lock'}: .*prune needs write access"):
        RepositoryLock(repo, EXCLUSIVE, what="prune").acquire()
    assert not (repo / "lock").exists()


def test_check_refuses_before_acquire_and_after_release(repo: Path) -> None:
    """check() is prune's question before deleting, and a snapshot's before its record is listed."""
    lock = RepositoryLock(repo, EXCLUSIVE, what="prune")
    with pytest.raises(RepositoryLocked, match=f"exclusive lock of prune on {repo} is not held"):
        lock.check()
    with lock:
        lock.check()
    with pytest.raises(RepositoryLocked, match="not held"):
        lock.check()


def test_a_removed_lock_file_excludes_nobody_so_the_holder_counts_it_lost(repo: Path) -> None:
    """Found by review: an admin who deletes ``lock`` (as one does with other tools' stale locks) let a prune
    lock the new file while a snapshot still held the old one. The holder's check() now says the lock was
    lost, so the snapshot lists no record; and a waiter whose file was removed meanwhile locks the new one."""
    snapshot = RepositoryLock(repo, SHARED, what="snapshot")
    with snapshot:
        (repo / "lock").unlink()
        with RepositoryLock(repo, EXCLUSIVE, what="prune") as prune:  # the new file: nothing excludes it
            prune.check()
            with pytest.raises(RepositoryLocked, match=r"shared lock of snapshot on .* was lost \(its lock file"):
                snapshot.check()
        os.replace(repo / "lock", repo / "lock.old")
        with pytest.raises(RepositoryLocked, match="was lost"):
            snapshot.check()

    waiter_got: list[RepositoryLock] = []
    holder = RepositoryLock(repo, EXCLUSIVE, what="prune")
    holder.acquire()
    waiter = threading.Thread(target=lambda: waiter_got.append(
        RepositoryLock(repo, EXCLUSIVE, wait=5.0, what="forget").__enter__()))
    waiter.start()
    time.sleep(0.2)
    (repo / "lock").unlink()  # the waiter is blocked on the old file's lock
    holder.release()  # the waiter gets the old (removed) file's lock, sees it is not current and retries
    waiter.join(10)
    [got] = waiter_got
    try:
        got.check()
        with pytest.raises(RepositoryLocked, match="an exclusive lock is held"):
            RepositoryLock(repo, SHARED, what="snapshot").acquire()  # the file now at ``lock`` is held
    finally:
        got.release()
