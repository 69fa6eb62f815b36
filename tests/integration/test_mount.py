"""`dedupimg mount`: real FUSE mounts through the CLI in a subprocess, an ext4 image loop-mounted from it."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo import pack
from dedupimg.repo.repository import Repository
from dedupimg.serve.mount import entry_name
from dedupimg.serve.reader import SnapshotReader
from tests.helpers import det_bytes, make_tree, run_cli, sh, small_repo, text_bytes, wait_for, write_sparse
from tests.integration.support import mounted, unmount
from tests.packfiles import pack_file, trailer

MiB = 1 << 20
T1 = datetime(2026, 11, 24, 22, 0, 0, tzinfo=UTC)
T2 = datetime(2026, 11, 25, 23, 30, 15, tzinfo=UTC)


def image_bytes(seed: int, size: int = 3 * MiB + 1234) -> bytes:
    """Random and text data with a zero run (a hole in the source), of an odd size."""
    return det_bytes(seed, MiB) + bytes(MiB) + text_bytes(seed + 1, size - 2 * MiB)


@pytest.fixture
def two_images(tmp_path):
    """A repository with two snapshots of "disk" (T1, T2) and one of "web/root"; closed, for the CLI."""
    path = tmp_path / "repo"
    repo = small_repo(path)
    src = tmp_path / "src.img"
    data = {}
    for seed, name, when in ((1, "disk", T1), (2, "disk", T2), (3, "web/root", T1)):
        src.write_bytes(image_bytes(seed))
        data[seed] = (take_snapshot(repo, str(src), name=name, when=when).record, image_bytes(seed))
    repo.close()
    return path, data


def test_layout_names_sizes_modes(tmp_path, two_images):
    repo, data = two_images
    (r1, d1), (r2, _), (r3, _) = data[1], data[2], data[3]
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt, tmp_path / "log"):
        assert sorted(os.listdir(mnt)) == ["by-id", "disk", "web%2Froot"]
        f1 = f"2026-11-24T22:00:00+00:00_{r1.short_id}.img"
        f2 = f"2026-11-25T23:30:15+00:00_{r2.short_id}.img"
        assert sorted(os.listdir(mnt / "disk")) == [f1, f2, "latest"]
        assert os.readlink(mnt / "disk" / "latest") == f2
        assert os.path.samefile(mnt / "disk" / "latest", mnt / "disk" / f2)
        assert os.listdir(mnt / "web%2Froot") == [f"2026-11-24T22:00:00+00:00_{r3.short_id}.img", "latest"]
        assert sorted(os.listdir(mnt / "by-id")) == sorted(f"{r.hex_id}.img" for r in (r1, r2, r3))

        for d in (mnt, mnt / "disk", mnt / "by-id"):
            st = os.stat(d)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555
        for path, rec in ((mnt / "disk" / f1, r1), (mnt / "by-id" / f"{r2.hex_id}.img", r2)):
            st = os.lstat(path)
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
            assert st.st_size == rec.size == len(d1)
            assert st.st_mtime == rec.datetime.timestamp()
        assert stat.S_ISLNK(os.lstat(mnt / "disk" / "latest").st_mode)
        assert os.stat(mnt / "disk").st_mtime == T2.timestamp()
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "disk" / "nothing.img")


def test_names_too_long_for_a_file_name_are_shortened_and_the_listing_works(tmp_path):
    """Records of older versions may hold names of any length: one of 5000 characters made `ls` of the whole
    mount fail (a listing entry over 255 bytes). Each now shows cut to 255 bytes with a suffix from its hash:
    distinct names stay distinct, the same name shows the same way at every mount, its files read."""
    path = tmp_path / "repo"
    repo = small_repo(path)
    src = tmp_path / "src.img"
    src.write_bytes(image_bytes(1))
    rec = take_snapshot(repo, str(src), name="short", when=T1).record
    long_names = ["x" * 5000, "x" * 4999 + "y", "a/b%" * 80, "é" * 200]  # as an older version could store them
    olds = [rec] + [take_snapshot(repo, str(src), name=f"n{i}", when=T2).record for i in range(len(long_names) - 1)]
    news = []
    for old, name in zip(olds, long_names, strict=True):
        new = replace(old, name=name, id=b"")
        new.encode()  # sets the id
        news.append(new)
    repo.replace_records(list(zip(olds, news, strict=True)))
    ok_rec = take_snapshot(repo, str(src), name="plain", when=T1).record
    repo.close()
    mnt = tmp_path / "mnt"
    with mounted(path, mnt, tmp_path / "log"):
        listed = os.listdir(mnt)  # was OSError (EIO) for the whole root
        assert len(listed) == len(long_names) + 2 and {"by-id", "plain"} <= set(listed)
        assert all(len(os.fsencode(n)) <= 255 for n in listed)
        shortened = sorted(set(listed) - {"by-id", "plain"})
        assert all("%~" in n for n in shortened)
        assert subprocess.run(["ls", "-lR", str(mnt)], capture_output=True).returncode == 0
        assert os.listdir(mnt / "plain") == [f"2026-11-24T22:00:00+00:00_{ok_rec.short_id}.img", "latest"]
        for name, new in zip(long_names, news, strict=True):
            shown = entry_name(name)
            assert shown in shortened
            files = sorted(os.listdir(mnt / shown))
            assert files[-1] == "latest" and files[0].endswith(f"_{new.short_id}.img")
            assert (mnt / shown / "latest").read_bytes() == image_bytes(1)
        first = sorted(listed)
    with mounted(path, mnt, tmp_path / "log"):
        assert sorted(os.listdir(mnt)) == first  # stable


def test_sparse_image_shows_its_holes_to_stat_du_and_seek(tmp_path):
    """Holes and zero runs of a snapshot are holes of its file: st_blocks counts only the bytes held in chunks
    (it was the whole size), and SEEK_DATA / SEEK_HOLE find them (there were none: SEEK_HOLE gave the end)."""
    path = tmp_path / "repo"
    repo = small_repo(path)
    src = tmp_path / "sparse.img"
    size = 16 * MiB + 100
    a, b = det_bytes(5, MiB), text_bytes(6, MiB + 4321)
    tail = b"end" * 33 + b"!"  # the last 100 bytes, at 16 MiB
    write_sparse(src, size, [(2 * MiB, a), (5 * MiB, bytes(MiB)), (9 * MiB, b), (16 * MiB, tail)])  # zeros at 5 MiB
    expect = src.read_bytes()
    rec = take_snapshot(repo, str(src), name="sparse", when=T1).record
    repo.close()
    mnt = tmp_path / "mnt"
    with mounted(path, mnt, tmp_path / "log"):
        image = mnt / "by-id" / f"{rec.hex_id}.img"
        st = os.stat(image)
        assert st.st_size == size
        data = len(a) + len(b) + len(tail)
        assert data <= st.st_blocks * 512 <= data + 8192  # was the whole 16 MiB
        assert int(sh("du", "-B1", image).split()[0]) == st.st_blocks * 512
        assert os.stat(mnt / "sparse" / "latest").st_blocks == st.st_blocks
        fd = os.open(image, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 2 * MiB
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
            assert os.lseek(fd, 2 * MiB + 5, os.SEEK_HOLE) == 3 * MiB
            assert os.lseek(fd, 3 * MiB, os.SEEK_DATA) == 9 * MiB  # the written zeros at 5 MiB are a hole too
            assert 9 * MiB + len(b) <= os.lseek(fd, 9 * MiB, os.SEEK_HOLE) <= 9 * MiB + len(b) + 4096
            assert os.lseek(fd, size - 1, os.SEEK_HOLE) == size  # the end counts as a hole
            assert os.lseek(fd, 11 * MiB, os.SEEK_DATA) == 16 * MiB
            for offset in (size, size + 1):
                with pytest.raises(OSError) as err:
                    os.lseek(fd, offset, os.SEEK_DATA)
                assert err.value.errno == errno.ENXIO
            assert os.pread(fd, 100, 2 * MiB - 50) == expect[2 * MiB - 50 : 2 * MiB + 50]  # reads unchanged
        finally:
            os.close(fd)
        copy = tmp_path / "copy.img"
        sh("cp", image, copy)  # --sparse=auto: sparse because st_blocks / SEEK_HOLE show the holes
        assert copy.read_bytes() == expect
        assert os.stat(copy).st_blocks * 512 <= data + 2 * MiB


def test_reads_are_bit_exact_and_short_at_the_end(tmp_path, two_images):
    repo, data = two_images
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt, tmp_path / "log"):
        for rec, expect in data.values():
            copy = tmp_path / "copy.img"
            with open(mnt / "by-id" / f"{rec.hex_id}.img", "rb") as src, open(copy, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            assert copy.read_bytes() == expect
        rec, expect = data[2]
        assert (mnt / "disk" / "latest").read_bytes() == expect  # through the symlink, with cat's buffer size
        rng = random.Random(7)
        fd = os.open(mnt / "disk" / "latest", os.O_RDONLY)
        try:
            for _ in range(200):
                off = rng.randrange(0, len(expect))
                n = rng.choice([1, 511, 4097, 65535, 300_001])
                assert os.pread(fd, n, off) == expect[off : off + n]
            assert os.pread(fd, 10_000, len(expect) - 77) == expect[-77:]  # short read at the end
            assert os.pread(fd, 4096, len(expect)) == b""
            assert os.pread(fd, 4096, len(expect) + 12345) == b""
        finally:
            os.close(fd)

        def check(seed: int) -> None:  # several readers at once, over several files
            rec, expect = data[seed % 3 + 1]
            rng = random.Random(seed)
            with open(mnt / "by-id" / f"{rec.hex_id}.img", "rb", buffering=0) as f:
                for _ in range(60):
                    off, n = rng.randrange(0, len(expect)), rng.randrange(1, 200_000)
                    f.seek(off)
                    assert f.read(n) == expect[off : off + n]

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(check, range(12)))


def test_snapshots_taken_while_mounted_appear(tmp_path, two_images):
    repo_path, data = two_images
    mnt = tmp_path / "mnt"
    with mounted(repo_path, mnt, tmp_path / "log"):
        assert os.readlink(mnt / "disk" / "latest").endswith(f"_{data[2][0].short_id}.img")
        src = tmp_path / "new.img"
        src.write_bytes(image_bytes(4))
        with Repository.open(repo_path) as repo:
            rec = take_snapshot(repo, str(src), name="disk", when=datetime(2026, 11, 26, tzinfo=UTC)).record
        wait_for(lambda: os.readlink(mnt / "disk" / "latest").endswith(f"_{rec.short_id}.img"), "the new snapshot")
        assert (mnt / "by-id" / f"{rec.hex_id}.img").read_bytes() == image_bytes(4)
        assert len(os.listdir(mnt / "disk")) == 4


def make_versioned_tree(root: Path, extra: bool) -> None:
    make_tree(root, dirs=3, files=8, size=10_000, dense=40_000)
    if extra:
        (root / "dir1" / "file2.dat").write_bytes(b"changed in version two\n" * 100)
        (root / "added.txt").write_bytes(text_bytes(999, 123_456))


def compare_tree(tree: Path, mounted_fs: Path) -> None:
    names = sorted(p.relative_to(tree) for p in tree.rglob("*") if p.is_file())
    found = sorted(p.relative_to(mounted_fs) for p in mounted_fs.rglob("*") if p.is_file())
    assert found == names
    for rel in names:
        assert (mounted_fs / rel).read_bytes() == (tree / rel).read_bytes(), rel


def test_ext4_image_loop_mounted_from_the_mount(tmp_path):
    repo_path = tmp_path / "repo"
    repo = small_repo(repo_path, avg=4096)
    image, trees = tmp_path / "fs.img", []
    for version, when in ((1, T1), (2, T2)):
        tree = tmp_path / f"tree{version}"
        make_versioned_tree(tree, extra=version == 2)
        image.unlink(missing_ok=True)
        sh("mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", tree, image, "32M")
        take_snapshot(repo, str(image), name="fs", when=when)
        trees.append(tree)
    records = repo.snapshots("fs")
    repo.close()

    mnt, loops = tmp_path / "mnt", []
    with mounted(repo_path, mnt, tmp_path / "log"):
        try:
            for tree, rec in zip(trees, records, strict=True):
                where = tmp_path / f"loop-{rec.short_id}"
                where.mkdir()
                files = [p for p in (mnt / "fs").iterdir() if rec.short_id in p.name]
                sh("mount", "-o", "loop,ro", files[0], where)
                loops.append(where)
                compare_tree(tree, where)
            assert not (loops[0] / "added.txt").exists()
            assert (loops[1] / "added.txt").read_bytes() == text_bytes(999, 123_456)
        finally:
            for where in loops:
                sh("umount", where)


def test_writes_are_refused(tmp_path, two_images):
    repo, data = two_images
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt, tmp_path / "log"):
        img = mnt / "disk" / "latest"
        for mode in ("r+b", "wb", "ab"):
            with pytest.raises(OSError) as exc:
                open(img, mode)
            assert exc.value.errno in (errno.EROFS, errno.EACCES)
        with pytest.raises(OSError) as exc:
            os.open(img, os.O_RDONLY | os.O_TRUNC)
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        for attempt in (
            lambda: open(mnt / "disk" / "new.img", "wb"),
            lambda: os.mkdir(mnt / "newdir"),
            lambda: os.unlink(mnt / "disk" / "latest"),
            lambda: os.rmdir(mnt / "by-id"),
            lambda: os.rename(mnt / "disk", mnt / "other"),
            lambda: os.chmod(img, 0o644),
            lambda: os.truncate(img, 0),
            lambda: os.symlink("x", mnt / "link"),
        ):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS
        touch = subprocess.run(["touch", str(img), str(mnt / "touched")], capture_output=True)
        assert touch.returncode != 0 and b"Read-only file system" in touch.stderr
        assert (mnt / "disk" / "latest").read_bytes() == data[2][1]  # unchanged
        assert sorted(os.listdir(mnt)) == ["by-id", "disk", "web%2Froot"]


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dedupimg: error: "), result.stderr
    return lines[0]


def test_cli_errors_missing_and_non_empty_mount_point(tmp_path, two_images):
    repo, _ = two_images
    missing = run_cli("-r", repo, "mount", tmp_path / "nowhere")
    assert missing.returncode == 16
    assert "does not exist" in one_error_line(missing)

    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    result = run_cli("-r", repo, "mount", full, "--foreground")
    assert result.returncode == 16
    assert "not empty" in one_error_line(result)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = run_cli("-r", repo, "mount", a_file)
    assert result.returncode == 16
    assert "not a directory" in one_error_line(result)

    (tmp_path / "empty").mkdir()
    result = run_cli("-r", tmp_path / "no-repo", "mount", tmp_path / "empty")
    assert result.returncode == 10
    assert "does not exist" in one_error_line(result)
    assert not os.path.ismount(tmp_path / "empty")


def test_dead_mount_is_reported(tmp_path, two_images):
    repo, _ = two_images
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt, tmp_path / "log") as proc:
        proc.kill()  # the server dies without unmounting: the kernel answers ENOTCONN
        proc.wait(timeout=30)
        result = run_cli("-r", repo, "mount", mnt)
        assert result.returncode == 16
        assert f"dead FUSE mount: run fusermount3 -u {mnt}" in one_error_line(result)


def test_cli_error_without_fuse(tmp_path, two_images):
    # A machine without FUSE, made real in a private mount namespace: /dev/fuse is a regular file there.
    repo, _ = two_images
    (tmp_path / "mnt").mkdir()
    fake = tmp_path / "not-a-device"
    fake.write_text("")
    dedupimg = f'"{sys.executable}" -m dedupimg -r "{repo}" mount "{tmp_path / "mnt"}"'
    script = f'mount --bind "{fake}" /dev/fuse && exec {dedupimg}'
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 20, result.stderr
    assert "FUSE is not available on this machine: no /dev/fuse" in one_error_line(result)


def mount_processes(mnt: Path) -> list[int]:
    """Pids of processes whose command line names ``mnt`` (the background server is a fork of the CLI)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(mnt).encode() in args and b"mount" in args:
                pids.append(int(entry))
    return pids


def test_background_mode(tmp_path, two_images):
    repo, data = two_images
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        result = run_cli("-r", repo, "mount", mnt)
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        assert f"fusermount3 -u {mnt}" in result.stdout.decode()
        assert os.path.ismount(mnt)
        assert len(mount_processes(mnt)) == 1
        rec, expect = data[1]
        assert (mnt / "by-id" / f"{rec.hex_id}.img").read_bytes() == expect
        assert "fuse.dedupimg" in Path("/proc/mounts").read_text()
    finally:
        unmount(mnt)
    assert not os.path.ismount(mnt)
    wait_for(lambda: not mount_processes(mnt), "the background server to exit")


def damage_one_chunk(repo_path: Path, rec_name: str) -> tuple[int, int]:
    """Flip a byte inside a chunk that only ``rec_name``'s image holds; returns that chunk's image range."""
    repo = Repository.open(repo_path)
    try:
        target, *others = sorted(repo.snapshots(), key=lambda r: r.name != rec_name)
        used_elsewhere = set()
        for rec in others:
            used_elsewhere.update(e.id for e in SnapshotReader(repo, rec).extents(0, rec.size))
        extents = [e for e in SnapshotReader(repo, target).extents(0, target.size)
                   if e.id is not None and e.id not in used_elsewhere and e.offset > 2 * MiB and e.length > 64]
        ext = extents[len(extents) // 2]
        loc = repo.index.lookup_blobs([ext.id])[0]
        path = pack_file(repo, repo.index.pack_id(loc.pack_no))
    finally:
        repo.close()
    entry = next(e for e in trailer(path) if e.id == ext.id)
    assert entry.type == pack.CHUNK
    with open(path, "r+b") as f:
        f.seek(entry.data_offset + 10)
        byte = f.read(1)
        f.seek(entry.data_offset + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    return ext.offset, ext.length


def test_damaged_chunk_reads_fail_with_eio(tmp_path):
    repo_path = tmp_path / "repo"
    repo = small_repo(repo_path)
    src = tmp_path / "src.img"
    expect = {}
    for name, seed in (("damaged", 10), ("intact", 20)):
        expect[name] = det_bytes(seed, 4 * MiB)
        src.write_bytes(expect[name])
        take_snapshot(repo, str(src), name=name)
    repo.close()
    offset, length = damage_one_chunk(repo_path, "damaged")

    mnt = tmp_path / "mnt"
    log = tmp_path / "log"
    with mounted(repo_path, mnt, log):
        fd = os.open(mnt / "damaged" / "latest", os.O_RDONLY)
        try:
            assert os.pread(fd, 65536, 0) == expect["damaged"][:65536]  # far from the damage: fine
            with pytest.raises(OSError) as exc:
                os.pread(fd, length, offset)
            assert exc.value.errno == errno.EIO
            with pytest.raises(OSError) as exc:
                (mnt / "damaged" / "latest").read_bytes()
            assert exc.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert (mnt / "intact" / "latest").read_bytes() == expect["intact"]
    assert "failed" in log.read_text()  # the foreground server names the failed read on stderr


def test_sigint_unmounts_cleanly(tmp_path, two_images):
    repo, data = two_images
    mnt = tmp_path / "mnt"
    log = tmp_path / "log"
    with mounted(repo, mnt, log) as proc:
        assert (mnt / "disk" / "latest").read_bytes() == data[2][1]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0  # Ctrl-C is how a foreground mount ends: not an error
        assert not os.path.ismount(mnt)
    assert "Traceback" not in log.read_text()
    assert os.listdir(mnt) == []


def test_sigterm_unmounts_cleanly(tmp_path, two_images):
    repo, _ = two_images
    mnt = tmp_path / "mnt"
    log = tmp_path / "log"
    with mounted(repo, mnt, log) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
    assert "Traceback" not in log.read_text()
