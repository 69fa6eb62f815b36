"""The store contract (dedupimg/store/base.py), run against every implementation (borgstore's pattern).

Each test takes the ``store`` fixture, parametrized over the implementations; a new backend (S3, issue 13)
joins by adding a parameter, and must pass all of it. Tests of what only one backend has (a FIFO or a
directory on a local disk, the exact fsync order) are marked by name and take their own fixture.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from dedupimg.core.errors import IntegrityError, PermissionDenied, RepositoryLocked
from dedupimg.store import Store, open_store
from dedupimg.store.base import TEMP_PREFIX, NotAnObject, ObjectInfo, ObjectMissing, StoreError
from dedupimg.store.local import LocalStore
from dedupimg.store.lock import LockMode
from dedupimg.store.memory import MemoryStore
from dedupimg.store.s3 import S3Store
from tests.helpers import ROOT, det_bytes

NAME = "packs/ab/" + "ab" * 32 + ".pack"
OTHER = "packs/cd/" + "cd" * 32 + ".pack"


def _local(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "repo")
    os.mkdir(store.root, 0o700)
    store.initialize(["packs", "packs/ab", "packs/cd"])
    return store


def _s3(request: pytest.FixtureRequest) -> S3Store:
    """A fresh prefix in the session's S3 bucket (tests/s3server.py: SeaweedFS, or DEDUPIMG_TEST_S3)."""
    server = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3_credentials")
    return S3Store(server.endpoint, server.bucket, f"contract/{os.getpid()}-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = (_local(tmp_path) if request.param == "local" else MemoryStore() if request.param == "memory"
                else _s3(request))
    try:
        yield s
    finally:
        if isinstance(s, S3Store):  # leave nothing in a shared bucket (DEDUPIMG_TEST_S3 may be a real one)
            s.delete(visible(s, ""))
        s.close()


def put(store: Store, name: str, data: bytes, pieces: int = 3) -> None:
    writer = store.create()
    step = max(1, len(data) // pieces)
    try:
        for i in range(0, len(data), step):
            writer.write(data[i : i + step])
        writer.commit(name)
    except BaseException:
        writer.abort()
        raise


def visible(store: Store, prefix: str = "packs/") -> list[str]:
    """Every object name under ``prefix``, all levels down."""
    listing = store.list(prefix)
    names = [o.name for o in listing.objects]
    for d in listing.dirs:
        names += visible(store, d + "/")
    return sorted(names)


# -- writing ----------------------------------------------------------------------------------------------


def test_commit_makes_the_object_visible_whole(store: Store):
    data = det_bytes(1, 300_000)
    put(store, NAME, data, pieces=7)
    assert store.read(NAME) == data
    assert store.size(NAME) == len(data)
    assert visible(store) == [NAME]
    assert store.list(TEMP_PREFIX).objects == []  # the temporary object is gone


def test_an_uncommitted_writer_leaves_nothing_visible(store: Store):
    writer = store.create()
    assert re.fullmatch(rf"tmp/{os.getpid()}-[0-9a-f]{{16}}\.tmp", writer.temp_name)
    writer.write(b"x" * 5000)
    assert visible(store) == []
    with pytest.raises(ObjectMissing):
        store.size(NAME)
    if isinstance(store, S3Store):  # no rename on S3: the temporary name lives in memory only, a crash leaves none
        assert store.list(TEMP_PREFIX).objects == []
        writer.abort()
        return
    # What a crash leaves: the temporary object, listed for prune to delete.
    leftovers = store.list(TEMP_PREFIX).objects
    assert [o.name for o in leftovers] == [writer.temp_name]
    assert store.delete([writer.temp_name]) == leftovers[0].size
    assert store.list(TEMP_PREFIX).objects == []


def test_an_aborted_writer_leaves_nothing(store: Store):
    writer = store.create()
    writer.write(det_bytes(2, 2 << 20))  # past the local writer's flush size: bytes reached the disk
    writer.abort()
    writer.abort()  # twice is harmless
    assert visible(store) == [] and store.list(TEMP_PREFIX).objects == []


def test_writers_do_not_share_temporary_names(store: Store):
    writers = [store.create() for _ in range(20)]
    assert len({w.temp_name for w in writers}) == 20
    for w in writers:
        w.abort()


def test_commit_replaces_an_object_of_the_same_name(store: Store):
    put(store, NAME, b"first")
    put(store, NAME, b"second")  # names are content hashes: in practice the same bytes again
    assert store.read(NAME) == b"second"
    assert visible(store) == [NAME]


def test_an_empty_object(store: Store):
    put(store, NAME, b"")
    assert store.read(NAME) == b"" and store.size(NAME) == 0
    with store.open(NAME) as reader:
        assert reader.size == 0 and reader.pread(10, 0) == b""


def test_a_commit_after_abort_fails_and_shows_nothing(store: Store):
    writer = store.create()
    writer.write(b"abc")
    writer.abort()
    with pytest.raises((StoreError, OSError)):
        writer.commit(NAME)
    assert visible(store) == []


def test_parallel_writers(store: Store):
    blobs = {f"packs/ab/{i:064x}.pack": det_bytes(i, 10_000 + i) for i in range(16)}

    def work(names: list[str]) -> None:
        for n in names:
            put(store, n, blobs[n])

    names = sorted(blobs)
    threads = [threading.Thread(target=work, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert visible(store) == names
    assert all(store.read(n) == blobs[n] for n in names)


# -- reading ----------------------------------------------------------------------------------------------


def test_read_ranges(store: Store):
    data = det_bytes(3, 100_000)
    put(store, NAME, data)
    for offset, length in [(0, 10), (1, 0), (99_990, 10), (99_990, 100), (100_000, 5), (200_000, 5), (5, -1),
                           (0, -1), (12_345, 54_321)]:
        expect = data[offset:] if length < 0 else data[offset : offset + length]
        assert store.read(NAME, offset, length) == expect, (offset, length)


def test_reader_reads_ranges_repeatedly(store: Store):
    data = det_bytes(4, 70_000)
    put(store, NAME, data)
    with store.open(NAME, "pack one") as reader:
        assert reader.size == len(data) and reader.where == "pack one"
        reader.advise_sequential()
        for offset, length in [(0, 8), (69_999, 8), (70_000, 1), (1000, 30_000), (0, 70_000)]:
            assert reader.pread(length, offset) == data[offset : offset + length]
        reader.drop_cache()
    with store.open(NAME) as reader:
        assert reader.where == store.location(NAME)


def test_missing_objects(store: Store):
    for call in (lambda: store.open(NAME, "pack x"), lambda: store.read(NAME, where="pack x"),
                 lambda: store.size(NAME, "pack x")):
        with pytest.raises(ObjectMissing, match="^pack x: the pack file is missing$") as info:
            call()
        assert isinstance(info.value, IntegrityError) and info.value.exit_code == 17
    with pytest.raises(ObjectMissing, match=re.escape(store.location(NAME))):
        store.open(NAME)


def test_a_deleted_object_is_missing_but_open_readers_may_finish(store: Store):
    data = det_bytes(5, 5000)
    put(store, NAME, data)
    reader = store.open(NAME)
    try:
        assert store.delete([NAME]) == len(data)
        with pytest.raises(ObjectMissing):
            store.read(NAME)
        if isinstance(store, S3Store):  # S3 keeps nothing for readers: the next ranged GET fails
            with pytest.raises(OSError):
                reader.pread(100, 0)
        else:
            assert reader.pread(100, 0) == data[:100]  # POSIX semantics
    finally:
        reader.close()


@pytest.mark.parametrize("bad", ["", "/packs/x", "packs//x", "packs/../config", "./x", "packs/x/"])
def test_invalid_names_are_refused(store: Store, bad: str):
    with pytest.raises(StoreError):
        store.size(bad)
    writer = store.create()
    try:
        with pytest.raises(StoreError):
            writer.commit(bad)
    finally:
        writer.abort()


# -- listing and deleting ---------------------------------------------------------------------------------


def test_list_is_one_level_sorted_with_sizes(store: Store):
    put(store, OTHER, b"12345")
    put(store, NAME, b"123")
    put(store, "packs/ab/" + "aa" * 32 + ".pack", b"1")
    top = store.list("packs/")
    assert top.objects == []
    assert {"packs/ab", "packs/cd"} <= set(top.dirs) and top.dirs == sorted(top.dirs)
    ab = store.list("packs/ab/")
    assert ab.objects == [ObjectInfo("packs/ab/" + "aa" * 32 + ".pack", 1), ObjectInfo(NAME, 3)]
    assert ab.dirs == []
    assert store.list("packs/cd/").objects == [ObjectInfo(OTHER, 5)]
    assert "packs" in store.list("").dirs


def test_list_of_nothing_is_empty(store: Store):
    assert store.list("nothing/here/").objects == [] and store.list("nothing/here/").dirs == []
    put(store, NAME, b"x")
    assert store.list("packs/ab/" + "ab" * 32 + ".pack/").objects == []  # an object is not a level


@pytest.mark.parametrize("bad", ["packs", "/packs/", "packs//", "../"])
def test_invalid_prefixes_are_refused(store: Store, bad: str):
    with pytest.raises(StoreError):
        store.list(bad)


def test_delete(store: Store):
    put(store, NAME, b"a" * 100)
    put(store, OTHER, b"b" * 50)
    assert store.delete([NAME, "packs/ef/" + "ef" * 32 + ".pack", OTHER]) == 150  # the missing one frees nothing
    assert visible(store) == []
    assert store.delete([NAME]) == 0
    assert store.delete([]) == 0


def test_delete_many_at_once(store: Store):
    """An object store deletes several at a time: each is freed once (also when named twice), missing skipped."""
    names = [f"packs/ab/{i:02d}" + "ab" * 31 + ".pack" for i in range(20)]
    for i, name in enumerate(names):
        put(store, name, b"x" * (i + 1), pieces=1)
    missing = "packs/cd/" + "cd" * 32 + ".pack"
    assert store.delete([*names, missing, names[0], names[5]]) == sum(range(1, 21))
    assert visible(store) == []


# -- another process --------------------------------------------------------------------------------------


def test_spec_round_trip(store: Store):
    data = det_bytes(6, 20_000)
    put(store, NAME, data)
    spec = store.spec()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items())
    assert msgpack.unpackb(msgpack.packb(spec)) == spec == json.loads(json.dumps(spec))
    again = open_store(json.loads(json.dumps(spec)))
    assert again.read(NAME, 100, 50) == data[100:150]
    with again.open(NAME) as reader:
        assert reader.pread(10, 19_990) == data[19_990:]
    put(again, OTHER, b"from the copy")
    assert store.read(OTHER) == b"from the copy"


def test_spec_in_another_process(store: Store):
    put(store, NAME, b"seen by a worker")
    code = ("import json, sys; from dedupimg.store import open_store; "
            f"sys.stdout.write(open_store(json.loads(sys.argv[1])).read({NAME!r}).decode())")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(store.spec())], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    if store.cross_process:
        assert proc.returncode == 0 and proc.stdout == "seen by a worker", proc.stderr
    else:
        assert proc.returncode != 0 and "does not exist in this process" in proc.stderr


# -- a local disk -----------------------------------------------------------------------------------------


def test_lock_shared_holders_share_and_exclude_an_exclusive_one(store: Store):
    """What every store's repository lock must do (local: flock; an object store: lock objects)."""
    with store.lock(LockMode.SHARED, what="snapshot") as first, store.lock(LockMode.SHARED, what="restore"):
        assert first.locked
        with pytest.raises(RepositoryLocked):
            store.lock(LockMode.EXCLUSIVE, wait=0.0, what="prune").acquire()
    with store.lock(LockMode.EXCLUSIVE, what="prune") as held:
        assert held.locked
        for mode in (LockMode.SHARED, LockMode.EXCLUSIVE):
            with pytest.raises(RepositoryLocked):
                store.lock(mode, wait=0.0).acquire()
    assert not held.locked


def test_lock_check_says_whether_it_is_held(store: Store):
    """check() (what prune calls before it deletes) passes while the lock is held, and refuses before and after."""
    lock = store.lock(LockMode.EXCLUSIVE, what="prune")
    with pytest.raises(RepositoryLocked, match="not held"):
        lock.check()
    with lock:
        lock.check()
        lock.check()
    with pytest.raises(RepositoryLocked, match="not held"):
        lock.check()


def test_remove_locks_leaves_live_locks_alone(store: Store):
    """unlock's call: nothing held is stale, so remove_locks(False) removes nothing (local and memory locks never
    go stale: they are [] always, also with all_locks)."""
    with store.lock(LockMode.SHARED, what="snapshot") as held:
        assert store.remove_locks(False) == []
        assert [r["what"] for r in store.list_locks()] == ([] if not isinstance(store, S3Store) else ["snapshot"])
        held.check()
    assert store.remove_locks(True) == [] and store.list_locks() == []


def test_lock_waits_for_a_holder_that_lets_go(store: Store):
    held = store.lock(LockMode.EXCLUSIVE, what="prune")
    held.acquire()
    threading.Timer(0.2, held.release).start()
    with store.lock(LockMode.SHARED, wait=5.0, what="snapshot") as waited:
        assert waited.locked


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return _local(tmp_path)


def test_local_layout_and_modes(local: LocalStore):
    put(local, NAME, b"pack bytes")
    path = local.root / NAME
    assert local.path(NAME) == path and local.location(NAME) == str(path)
    assert path.read_bytes() == b"pack bytes" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(local.root / "tmp") == []
    assert stat.S_IMODE((local.root / "tmp").stat().st_mode) == 0o700


def test_local_commit_order_is_fsync_rename_fsync_dir(local: LocalStore, monkeypatch: pytest.MonkeyPatch):
    import dedupimg.store.local as mod

    calls: list[str] = []
    real_fsync, real_replace, real_fsync_dir = os.fsync, os.replace, mod.fsync_dir

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            calls.append("fsync file")
        real_fsync(fd)

    monkeypatch.setattr(mod.os, "fsync", fsync)

    def replace(a: Path, b: Path) -> None:
        calls.append("rename")
        real_replace(a, b)

    def fsync_dir(p: Path) -> None:
        calls.append(f"fsync {Path(p).name}/")
        real_fsync_dir(p)

    monkeypatch.setattr(mod.os, "replace", replace)
    monkeypatch.setattr(mod, "fsync_dir", fsync_dir)
    writer = local.create()
    writer.write(b"x" * 100)
    assert (local.root / writer.temp_name).exists()
    writer.commit(NAME)
    assert calls == ["fsync file", "rename", "fsync ab/"]
    put(local, OTHER, b"y" * 10)
    calls.clear()
    assert local.delete([OTHER, NAME, OTHER]) == 110
    assert calls == ["fsync ab/", "fsync cd/"]  # each directory once, after every unlink


def test_local_commit_makes_a_missing_level(local: LocalStore):
    name = "packs/ef/" + "ef" * 32 + ".pack"
    put(local, name, b"x")
    assert local.read(name) == b"x"


def test_local_fifo_named_like_an_object(local: LocalStore):
    os.mkfifo(local.root / NAME)
    assert [o.name for o in local.list("packs/ab/").objects] == [NAME]  # listed: prune deletes it as an orphan
    for call in (lambda: local.open(NAME, "pack f"), lambda: local.read(NAME, where="pack f")):
        with pytest.raises(NotAnObject, match="^pack f: is a FIFO, not a pack file$"):
            call()  # at once: no open() that waits for a writer
    assert local.delete([NAME]) == 0 and not os.path.lexists(local.root / NAME)


def test_local_directory_named_like_an_object(local: LocalStore):
    os.mkdir(local.root / NAME)
    listing = local.list("packs/ab/")
    assert listing.objects == [] and listing.dirs == [NAME]
    with pytest.raises(NotAnObject, match="is a directory, not a pack file"):
        local.open(NAME)
    with pytest.raises(OSError):
        local.delete([NAME])  # never removed as if it were an object
    assert (local.root / NAME).is_dir()


def test_local_symlink_is_followed(local: LocalStore, tmp_path: Path):
    elsewhere = tmp_path / "moved.pack"
    elsewhere.write_bytes(b"moved by an admin")
    os.symlink(elsewhere, local.root / NAME)
    assert local.read(NAME) == b"moved by an admin"
    assert local.list("packs/ab/").objects == [ObjectInfo(NAME, 17)]
    os.symlink(tmp_path / "gone", local.root / OTHER)
    with pytest.raises(ObjectMissing):
        local.open(OTHER)


def test_local_permission_error_is_permission_denied(local: LocalStore, monkeypatch: pytest.MonkeyPatch):
    """What an unreadable pack gives any user but root (the CLI test in tests/cli/test_errors.py runs it for
    real as another user): EACCES from open() is PermissionDenied (exit 16), not damage."""
    import dedupimg.store.local as mod

    put(local, NAME, b"secret")
    real_open = os.open

    def refuse(path: object, *args: object, **kwargs: object) -> int:
        if str(path) == str(local.root / NAME):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mod.os, "open", refuse)
    for call in (lambda: local.open(NAME, "pack p"), lambda: local.read(NAME, where="pack p")):
        with pytest.raises(PermissionDenied, match="^pack p: cannot open the pack file: permission denied$"):
            call()
