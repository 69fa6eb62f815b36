"""Shared test helpers: deterministic data and images, the CLI in a subprocess and what a result must look like,
shell commands, small repositories, snapshot-and-restore in the library, snapshot records.

One place for what several test modules need; fixtures live in ``conftest.py`` (tests/ and tests/integration/).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import blake3
import pytest

from dedupimg.core.config import ChunkerParams, Config
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.ops.restore import restore
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.repository import Repository, cache_home, read_remote_config
from dedupimg.store import Store
from dedupimg.store.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent


def det_bytes(seed: int, n: int) -> bytes:
    """``n`` pseudo-random bytes that are the same on every machine (blake3 XOF)."""
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


def text_bytes(seed: int, n: int) -> bytes:
    """Compressible, text-like bytes with some variety."""
    words = [w.encode() for w in det_bytes(seed, 4096).hex().split("a") if w]
    out = bytearray()
    i = 0
    while len(out) < n:
        out += words[i % len(words)] + (b"\n" if i % 11 == 0 else b" ")
        i += 7
    return bytes(out[:n])


def small_repo(path: Path, avg: int = 1024, encrypted: bool = False) -> Repository:
    """Small chunks and 64 KiB packs, so that every test crosses many packs and segments; ``encrypted``:
    AES-256-GCM with the test password (tests/conftest.py)."""
    return Repository.init(path, ChunkerParams.for_average(avg), pack_size=1 << 16,
                           encryption="aes-256-gcm" if encrypted else "none")


def open_remote(store: Store, config: Config, cache_dir: Path) -> Repository:
    """A remote repository as a host whose caches live under ``cache_dir`` opens it for a command: synced."""
    repo = Repository(cache_home(cache_dir, config.repo_id), config, store, owns_store=False, remote=True)
    try:
        repo.sync()
    except BaseException:
        repo.close()
        raise
    return repo


class MemoryRemote:
    """A remote repository on an in-memory store (small chunks and packs), opened by several hosts: host ``h``
    keeps its cache under ``tmp/host<h>``."""

    def __init__(self, tmp: Path, pack_size: int = 1 << 16) -> None:
        self.tmp = tmp
        self.store = MemoryStore()
        Repository._init_remote(self.store, Config(chunker=ChunkerParams.for_average(1024), pack_size=pack_size),
                                tmp / "host0").close()
        self.config = read_remote_config(self.store)  # as every host reads it

    def host(self, h: int) -> Repository:
        return open_remote(self.store, self.config, self.tmp / f"host{h}")


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables that would change what the CLI does, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("DEDUPIMG_REPO", "DEDUPIMG_DEBUG")}
    env.update(extra)
    return env


def run_cli(*args: str | os.PathLike[str], input: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 600, user: int | None = None, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``python -m dedupimg ARGS`` in a subprocess, output captured (bytes, or str with ``text=True``); with
    ``user``, as that uid and gid with no other groups (setpriv; the tests run as root)."""
    as_user = [] if user is None else ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups"]
    return subprocess.run(
        [*as_user, sys.executable, "-m", "dedupimg", *map(str, args)],
        input=input,
        capture_output=True,
        env=cli_env(**(env or {})),
        timeout=timeout,
        **kwargs,
    )


def _text(out: bytes | str | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def ok(proc: subprocess.CompletedProcess[Any]) -> str:
    """Asserts exit 0 and returns standard output as text."""
    assert proc.returncode == 0, (proc.args, proc.returncode, _text(proc.stdout)[-2000:], _text(proc.stderr))
    return _text(proc.stdout)


def fails(proc: subprocess.CompletedProcess[Any], code: int, *words: str) -> str:
    """Asserts exit ``code`` with one clear line on stderr (no traceback) holding every one of ``words``;
    returns that line."""
    err = _text(proc.stderr)
    assert proc.returncode == code, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err  # one clear line
    for w in words:
        assert w in lines[0], err
    return lines[0]


def sh(*cmd: str | os.PathLike[str], timeout: float = 120) -> str:
    """A system command (mkfs, mount, losetup, ...) that must succeed; returns its standard output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stderr)
    return proc.stdout


def wait_for(predicate: Callable[[], object], what: str, proc: subprocess.Popen[Any] | None = None,
             timeout: float = 20) -> None:
    """Polls ``predicate`` until true; fails the test on timeout or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def first_line(stream: IO[bytes], timeout: float = 30) -> str:
    """The first line a server subprocess prints (its address), or a failure after ``timeout`` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    assert sel.select(timeout), "the server printed nothing"
    return stream.readline().decode()


def check_clean(repo: Path, *args: str) -> dict[str, object]:
    """``dedupimg check --json`` exits 0 with no findings; returns its document."""
    doc = json.loads(ok(run_cli("-r", repo, "check", "--json", *args)))
    assert doc["ok"] is True and doc["findings"] == []
    return doc


def restore_all_bit_exact(repo: Path, expected: dict[str, bytes], tmp_path: Path,
                          only: list[str] | None = None) -> None:
    """Through the CLI: the repository lists exactly ``expected`` (id -> image bytes); each (or each of
    ``only``) restores to its bytes."""
    listing = json.loads(run_cli("-r", repo, "snapshots", "--json").stdout)
    assert sorted(s["id"] for s in listing) == sorted(expected)
    for sid, data in expected.items():
        if only is not None and sid not in only:
            continue
        out = tmp_path / f"restore-{sid[:8]}.img"
        ok(run_cli("-r", repo, "restore", sid, out, "--force"))
        assert out.read_bytes() == data
        out.unlink()


def snap(repo: Repository, path: Path, data: bytes, name: str | None = "disk") -> SnapshotRecord:
    """Writes ``data`` to ``path`` and snapshots it in the library as ``name`` (None: the file's base name)."""
    path.write_bytes(data)
    return take_snapshot(repo, str(path), name=name).record


def restores(repo: Repository, rec: SnapshotRecord, expected: bytes, tmp: Path) -> bool:
    """Asserts that ``rec`` restores (in the library) to ``expected``; True, so ``assert restores(...)`` reads."""
    out = tmp / f"out-{rec.short_id}.img"
    restore(repo, rec.hex_id, str(out), force=True)
    assert out.read_bytes() == expected
    out.unlink()
    return True


def make_tree(root: Path, dirs: int, files: int, size: int, dense: int) -> None:
    """A directory tree to put into an ext4 image: ``dirs`` directories of ``files`` files, every third one
    ``dense`` random bytes, the others text of ``size`` bytes and more."""
    for d in range(dirs):
        sub = root / f"dir{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            data = text_bytes(d * 100 + f, size + f * 3000) if f % 3 else det_bytes(d * 100 + f, dense)
            (sub / f"file{f}.dat").write_bytes(data)


def record(name: str = "disk", time: str = "2026-01-02T03:04:05+00:00", tags: list[str] | None = None,
           segments: list[tuple[bytes, int]] | None = None, **fields: Any) -> SnapshotRecord:
    """A snapshot record that needs no repository (retention, encodings); ``fields`` sets any other field."""
    segments = segments or []
    fields.setdefault("size", sum(n for _, n in segments))
    fields.setdefault("image_hash", b"\0" * 32)
    return SnapshotRecord(name=name, time=time, segments=segments, tags=tags or [], **fields)


def write_sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    """A sparse file of ``size`` bytes with data ``pieces`` at their offsets and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)


def write_image(path: Path, image: bytes, holes: bool, block: int = 4096) -> None:
    """Writes ``image``; with ``holes``, aligned all-zero blocks become real holes (SEEK_HOLE sees them)."""
    if not holes:
        path.write_bytes(image)
        return
    pieces = []
    for off in range(0, len(image), block):
        data = image[off : off + block]
        if data.count(0) != len(data):
            pieces.append((off, data))
    write_sparse(path, len(image), pieces)


def blocks_allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512
