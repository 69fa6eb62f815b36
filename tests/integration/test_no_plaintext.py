"""An encrypted repository shows nothing of what it stores: no image bytes, names, paths, tags or digests.

An image holds a marker string repeated over MiBs (compressible: zstd keeps one copy of it in a plain
repository), the marker between random bytes (stored raw in a plain repository), a public file (GPL-3, or a
Python stdlib module) at a 4 KiB-aligned offset, and random data. It is snapshotted twice (one region changed)
with a secret name, tags and source path, by a process whose host name is secret (its own UTS namespace), then
the first snapshot is forgotten and pruned: packs, tombstones, prune rewrites, and on S3 index objects all
exist. Then every file of the repository is read, except ``REPO/index/`` (the LMDB index is the local cache: it
holds plaintext metadata by design, as the cache directory of an S3 repository does) and ``REPO/lock`` (the
empty flock file); of an S3 repository every object under its prefix is read, index objects included.

None of these may appear, in any file or object (or its name): the marker; any 64-byte run of the public file
or of the random data; the unkeyed blake3 or sha256 of the public file, of each image, of the marker's first
chunk-sized blocks, or of any stored chunk; the (keyed) chunk ids; the snapshot name, tags, source path and
host name. The control, the same image in an ``init --encryption none`` repository, shows them, so the
scanner can fail.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest

from dedupimg.repo import pack
from dedupimg.repo.repository import Repository
from dedupimg.store import location_spec, open_store
from dedupimg.store.base import Store
from tests.helpers import cli_env, det_bytes, ok
from tests.packfiles import open_file, pack_files, trailer

MARKER = b"DEDUPIMG-SECRET-MARKER-7f3a "
NAME = "secret-vm-name"
TAGS = ("secret-tag-first-4e1d", "secret-tag-second-8a2f")
DIR_NAME = "secret-source-dir-51c9"
FILE_NAME = "secret-image-file-0d7b.img"
SECRET_HOST = "secret-host-name-9b2c"
RUN = 64  # no run this long of a secret source may show
W = 16  # the scanner's stride: any run of 2*W-1 bytes or more covers one aligned W-byte window
MiB = 1 << 20


@dataclass(frozen=True)
class Image:
    v1: Path
    v2: Path
    public: bytes
    random: bytes  # a piece of the image's random data


def public_file() -> bytes:
    gpl = Path("/usr/share/common-licenses/GPL-3")
    return gpl.read_bytes() if gpl.is_file() else Path(json.decoder.__file__).read_bytes()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    public = public_file()
    data = bytearray(det_bytes(31, MiB))
    data += public  # at 1 MiB: 4 KiB-aligned
    data += det_bytes(32, -len(data) % 4096 + 64 * 1024)
    data += MARKER * (3 * MiB // len(MARKER))
    for i in range(4096):  # ~0.5 MiB of the marker between random bytes
        data += MARKER + det_bytes(1000 + i, 100)
    data += det_bytes(33, MiB // 2)
    folder = tmp_path_factory.mktemp("img") / DIR_NAME
    folder.mkdir()
    v1 = folder / FILE_NAME
    v1.write_bytes(data)
    data[256 * 1024 : 320 * 1024] = det_bytes(34, 64 * 1024)  # v2: one region changed
    v2 = folder / ("v2-" + FILE_NAME)
    v2.write_bytes(data)
    return Image(v1, v2, public, det_bytes(31, MiB)[: 64 * 1024])


@functools.cache
def own_host_name() -> str:
    """The host name the CLI runs under: SECRET_HOST in a UTS namespace of its own (root), else this machine's."""
    try:
        proc = subprocess.run(["unshare", "--uts", "sh", "-c", 'hostname "$0" && hostname', SECRET_HOST],
                              capture_output=True, text=True, timeout=30)
    except OSError:
        return os.uname().nodename
    return SECRET_HOST if proc.returncode == 0 and proc.stdout.strip() == SECRET_HOST else os.uname().nodename


def cli(*args: Any, env: dict[str, str] | None = None) -> str:
    """The CLI in a subprocess named :func:`own_host_name`; must exit 0; returns its standard output."""
    command = [sys.executable, "-m", "dedupimg", *map(str, args)]
    if own_host_name() == SECRET_HOST:
        command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', SECRET_HOST, *command]
    return ok(subprocess.run(command, capture_output=True, env=cli_env(**(env or {})), timeout=600))


def history(location: str, image: Image, env: dict[str, str] | None = None, *init: str) -> None:
    """init, a snapshot of each version (the second with both tags), forget the first, prune."""
    cli("-r", location, "init", "--pack-size", str(256 * 1024), *init, env=env)
    first = json.loads(cli("-r", location, "snapshot", image.v1, "--name", NAME, "--tag", TAGS[0], "--json",
                           env=env))
    cli("-r", location, "snapshot", image.v2, "--name", NAME, "--tag", ",".join(TAGS), env=env)
    cli("-r", location, "forget", first["id"], env=env)
    report = json.loads(cli("-r", location, "prune", "--json", env=env))
    assert report["packs_rewritten"] >= 1, report


def chunk_needles(location: str, image: Image, cache: Path) -> dict[bytes, str]:
    """The unkeyed blake3 and sha256 of every chunk of every snapshot the repository holds (the bytes cut from
    the image by its extent map), and the chunk ids the repository gives them."""
    needles: dict[bytes, str] = {}
    with Repository.open(location, cache_dir=cache) as repo:
        records = repo.snapshots()
        assert records
        for rec in records:
            data = (image.v1 if rec.source == str(image.v1) else image.v2).read_bytes()
            offset = 0
            for seg_id, _length in rec.segments:
                for length, id_ in repo.segment(seg_id).extents():
                    if id_ is not None:
                        chunk = data[offset : offset + length]
                        needles[blake3.blake3(chunk).digest()] = f"unkeyed blake3 of the chunk at {offset}"
                        needles[hashlib.sha256(chunk).digest()] = f"sha256 of the chunk at {offset}"
                        needles.setdefault(id_, f"the id of the chunk at {offset}")
                    offset += length
    return needles


def secrets(image: Image) -> tuple[dict[bytes, str], dict[str, bytes]]:
    """(byte strings that must not show, sources no RUN bytes of which may show)."""
    needles = {MARKER.strip(): "the marker", NAME.encode(): "the snapshot name", DIR_NAME.encode(): "the source dir",
               FILE_NAME.encode(): "the source file name", str(image.v1).encode(): "the source path"}
    needles.update({tag.encode(): f"tag {tag}" for tag in TAGS})
    if len(own_host_name()) >= 8:  # a short one (this machine's, without a namespace) shows by chance
        needles[own_host_name().encode()] = "the host name"
    marker_run = image.v1.read_bytes()
    marker_run = marker_run[marker_run.index(MARKER) :]
    for what, data in [("the public file", image.public), ("image v1", image.v1.read_bytes()),
                       ("image v2", image.v2.read_bytes())] + [
                          (f"the marker's first {n} bytes", marker_run[:n]) for n in (4096, 16384, 65536)]:
        for digest, name in ((blake3.blake3(data).digest(), "unkeyed blake3"),
                             (hashlib.sha256(data).digest(), "sha256")):
            needles[digest] = f"the {name} of {what}"
            needles[digest.hex().encode()] = f"the hex {name} of {what}"
    return needles, {"the public file": image.public, "the random data": image.random}


class Scanner:
    """Finds needles (exactly) and runs of RUN bytes of sources in a blob: a dict of every W-byte piece of each,
    looked up at every W-th offset of the blob, each hit checked in full."""

    def __init__(self, needles: dict[bytes, str], sources: dict[str, bytes]) -> None:
        self.short = {n: what for n, what in needles.items() if len(n) < 2 * W - 1}
        self.pieces: dict[bytes, list[tuple[str, bytes, int, int]]] = {}
        for text, what, need in [(n, w, len(n)) for n, w in needles.items() if len(n) >= 2 * W - 1] + [
                (s, w, RUN) for w, s in sources.items()]:
            for i in range(len(text) - W + 1):
                self.pieces.setdefault(text[i : i + W], []).append((what, text, i, need))

    def found(self, data: bytes) -> set[str]:
        out = {what for n, what in self.short.items() if n in data}
        for j in range(0, len(data) - W + 1, W):
            for what, text, i, need in self.pieces.get(data[j : j + W], ()):
                if what in out:
                    continue
                before = 0  # common bytes before the piece
                while before < min(i, j, need) and data[j - before - 1] == text[i - before - 1]:
                    before += 1
                after = W
                while after < need and i + after < len(text) and j + after < len(data) and \
                        data[j + after] == text[i + after]:
                    after += 1
                if before + after >= need:
                    out.add(what)
        return out


def leaks(objects: dict[str, bytes], scanner: Scanner) -> dict[str, set[str]]:
    """What shows in each object (its name included)."""
    out = {}
    for name, data in objects.items():
        found = scanner.found(data) | scanner.found(name.encode())
        if found:
            out[name] = found
    return out


def local_files(root: Path) -> dict[str, bytes]:
    """Every file of a local repository but index/ (the cache) and lock."""
    files = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and name != "lock" and not name.startswith("index/"):
            files[name] = path.read_bytes()
    return files


def store_objects(store: Store, prefix: str = "") -> dict[str, bytes]:
    """Every object of a store, level by level."""
    listing = store.list(prefix)
    objects = {o.name: store.read(o.name) for o in listing.objects}
    for level in listing.dirs:
        objects.update(store_objects(store, level + "/"))
    return objects


def test_encrypted_local_repository_shows_nothing(tmp_path: Path, image: Image) -> None:
    repo = tmp_path / "repo"
    history(str(repo), image)
    files = local_files(repo)
    assert any(n.startswith("packs/") for n in files) and any(n.startswith("keys/") for n in files)
    needles, sources = secrets(image)
    needles.update(chunk_needles(str(repo), image, tmp_path / "unused-cache"))
    assert leaks(files, Scanner(needles, sources)) == {}


def test_encrypted_s3_repository_shows_nothing(s3_server: Any, s3_credentials: None, tmp_path: Path,
                                               image: Image) -> None:
    location = f"s3:{s3_server.endpoint}/{s3_server.bucket}/plaintext-{uuid.uuid4().hex[:12]}"
    history(location, image, {"DEDUPIMG_CACHE_DIR": str(tmp_path / "cache")})
    store = open_store(location_spec(location))
    try:
        objects = store_objects(store)
    finally:
        store.close()
    assert {n.split("/")[0] for n in objects} >= {"config", "keys", "packs", "index"}
    assert not any(n.startswith("locks/") for n in objects)  # every command is over
    needles, sources = secrets(image)
    needles.update(chunk_needles(location, image, tmp_path / "cache"))
    assert leaks(objects, Scanner(needles, sources)) == {}


def test_control_unencrypted_repository_shows_them(tmp_path: Path, image: Image) -> None:
    """The scanner finds what an unencrypted repository shows, in its files and in its blobs as anyone can read
    them (segments and records are zstd frames): it is able to fail the tests above."""
    repo = tmp_path / "plain"
    history(str(repo), image, None, "--encryption", "none")
    files = local_files(repo)
    raws: dict[bytes, bytes] = {}
    deltas = []
    for path in pack_files(repo):
        with open_file(path) as reader:
            for e in trailer(path):
                if e.codec == pack.DELTA:  # decoded below, with its base (docs/format.md §11)
                    deltas.append((path, e))
                    continue
                files[f"{path.name}#{e.offset}"] = raws[e.id] = pack.read_blob(reader, e, path.name)[1]
    for path, e in deltas:
        with open_file(path) as reader:
            files[f"{path.name}#{e.offset}"] = pack.read_blob(reader, e, path.name, bases={e.id: raws[e.base]})[1]
    needles, sources = secrets(image)
    chunks = chunk_needles(str(repo), image, tmp_path / "unused-cache")
    needles.update(chunks)
    found = set().union(*leaks(files, Scanner(needles, sources)).values())
    expected = {"the marker", "the snapshot name", "the source path", "the source file name", "the source dir",
                f"tag {TAGS[0]}", f"tag {TAGS[1]}", "the random data", "the public file",
                "the unkeyed blake3 of image v2"}
    if len(own_host_name()) >= 8:
        expected.add("the host name")
    assert expected <= found, expected - found
    # trailers list chunk ids: the unkeyed blake3 of each chunk
    assert sum(what.startswith("unkeyed blake3 of the chunk") for what in found) >= 10
