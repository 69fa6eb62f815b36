"""Tampered packs of an encrypted repository: every command fails with exit 17 or gives the right bytes.

Each case starts from a fresh copy of one repository (1 KiB chunks, 64 KiB packs, AES-256-GCM) with two
snapshots of unrelated images, A and B, and damages one pack that holds only chunks of A, in place on disk:
a flipped byte inside a blob; the pack cut inside a blob; bytes taken out of a blob; two blobs of equal span
swapped (the trailer still lists the old places); the pack replaced by a valid pack of B; B's sealed trailer and
footer spliced onto A's blobs (as they are, and with the footer made to fit). A blob is sealed with its id and
type as associated data, so a blob moved, swapped or taken from another pack fails authentication like an
altered one.

Then: ``restore`` of A exits 17 with one line on stderr and leaves nothing in the target's directory (when A's
blobs are all intact, as after a trailer splice, it may instead restore A bit-exact: its bytes are verified);
``check --read-data`` exits 17 and names the damaged pack; ``restore`` of B is bit-exact.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dedupimg.repo import pack
from tests.helpers import det_bytes, fails, ok, run_cli, text_bytes
from tests.packfiles import pack_files, trailer


@dataclass(frozen=True)
class Snap:
    id: str
    data: bytes
    packs: list[Path]  # the packs its snapshot wrote that hold only chunks (relative to the repository)


@dataclass(frozen=True)
class Template:
    root: Path
    a: Snap
    b: Snap


@dataclass(frozen=True)
class Case:
    repo: Path
    a: Snap
    b: Snap

    def pack_of(self, snap: Snap, i: int = 0) -> Path:
        return self.repo / snap.packs[i]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    tmp = tmp_path_factory.mktemp("tamper")
    root = tmp / "repo"
    ok(run_cli("-r", root, "init", "--encryption", "aes-256-gcm", "--chunk-size", "1024", "--pack-size", "65536"))
    snaps = []
    for name, data in (("a", text_bytes(1, 150_000) + det_bytes(2, 350_000)),
                       ("b", det_bytes(3, 350_000) + text_bytes(4, 150_000))):
        image = tmp / f"{name}.img"
        image.write_bytes(data)
        before = set(pack_files(root))
        sid = json.loads(ok(run_cli("-r", root, "snapshot", image, "--name", name, "--json")))["id"]
        new = sorted(set(pack_files(root)) - before)
        only_chunks = [p.relative_to(root) for p in new if all(e.type == pack.CHUNK for e in trailer(p))]
        assert len(only_chunks) >= 3, new
        snaps.append(Snap(sid, data, only_chunks))
    return Template(root, *snaps)


@pytest.fixture
def case(template: Template, tmp_path: Path) -> Case:
    """A fresh copy of the template repository."""
    shutil.copytree(template.root, tmp_path / "repo", symlinks=True)
    return Case(tmp_path / "repo", template.a, template.b)


def trailer_offset(data: bytes) -> int:
    return int(pack.FOOTER.unpack(data[-pack.FOOTER.size :])[0])


def chunk_in_the_middle(path: Path) -> pack.BlobEntry:
    entries = trailer(path)
    return entries[len(entries) // 2]


def flip_byte(c: Case) -> Path:
    path = c.pack_of(c.a)
    e = chunk_in_the_middle(path)
    data = bytearray(path.read_bytes())
    data[e.data_offset + e.stored_len // 2] ^= 0x40
    path.write_bytes(data)
    return path


def cut_inside_blob(c: Case) -> Path:
    path = c.pack_of(c.a)
    e = chunk_in_the_middle(path)
    with open(path, "r+b") as f:
        f.truncate(e.offset + pack.blob_span(e.stored_len) // 2)
    return path


def bytes_taken_out_of_blob(c: Case) -> Path:
    path = c.pack_of(c.a)
    e = chunk_in_the_middle(path)
    assert e.stored_len > 200
    data = path.read_bytes()
    path.write_bytes(data[: e.data_offset + 50] + data[e.data_offset + 150 :])
    return path


def swap_blobs(c: Case) -> Path:
    """Two blobs of one span exchange places; the first pack of A that has two such blobs."""
    for rel in c.a.packs:
        path = c.repo / rel
        by_span: dict[int, pack.BlobEntry] = {}
        for e in trailer(path):
            other = by_span.setdefault(e.stored_len, e)
            if other is not e:
                data = bytearray(path.read_bytes())
                first, second = data[other.offset : other.end], data[e.offset : e.end]
                data[other.offset : other.end], data[e.offset : e.end] = second, first
                path.write_bytes(data)
                return path
    raise AssertionError("no pack of A has two blobs of one span")


def replace_by_other_pack(c: Case) -> Path:
    path = c.pack_of(c.a)
    shutil.copyfile(c.pack_of(c.b), path)
    return path


def splice_trailer(c: Case) -> Path:
    path = c.pack_of(c.a)
    mine, theirs = path.read_bytes(), c.pack_of(c.b).read_bytes()
    path.write_bytes(mine[: trailer_offset(mine)] + theirs[trailer_offset(theirs) :])
    return path


def splice_trailer_with_fitting_footer(c: Case) -> Path:
    """B's sealed trailer after A's blobs, under a footer that finds it, and rows that fit within A's blobs (B's
    shortest pack onto A's longest): only the pack's name (A's trailer hash) and the blobs' authentication
    can tell."""
    path = max((c.repo / p for p in c.a.packs), key=lambda p: trailer_offset(p.read_bytes()))
    other = min((c.repo / p for p in c.b.packs), key=lambda p: trailer_offset(p.read_bytes()))
    mine, theirs = path.read_bytes(), other.read_bytes()
    t_off = trailer_offset(mine)
    assert trailer_offset(theirs) <= t_off
    _off, t_len, count, t_hash, magic = pack.FOOTER.unpack(theirs[-pack.FOOTER.size :])
    sealed = theirs[trailer_offset(theirs) : -pack.FOOTER.size]
    path.write_bytes(mine[:t_off] + sealed + pack.FOOTER.pack(t_off, t_len, count, t_hash, magic))
    return path


CASES: dict[str, Callable[[Case], Path]] = {
    "flip": flip_byte,
    "cut": cut_inside_blob,
    "hole": bytes_taken_out_of_blob,
    "swap": swap_blobs,
    "replaced": replace_by_other_pack,
    "trailer": splice_trailer,
    "trailer-fitted": splice_trailer_with_fitting_footer,
}
BLOBS_INTACT = {"trailer", "trailer-fitted"}  # A's blobs are where the index says, as written


@pytest.mark.parametrize("how", list(CASES))
def test_tampered_pack_never_gives_wrong_bytes(case: Case, tmp_path: Path, how: str) -> None:
    damaged = CASES[how](case)

    out = tmp_path / "out-a"
    out.mkdir()
    proc = run_cli("-r", case.repo, "restore", case.a.id, out / "a.img")
    if how in BLOBS_INTACT and proc.returncode == 0:
        assert (out / "a.img").read_bytes() == case.a.data
    else:
        fails(proc, 17)
        assert list(out.iterdir()) == []  # no target, no temporary file

    check = run_cli("-r", case.repo, "check", "--read-data")
    fails(check, 17)
    report = check.stdout.decode()
    assert damaged.name in report and f"a@{case.a.id[:8]}" in report and f"b@{case.b.id[:8]}" not in report, report

    ok(run_cli("-r", case.repo, "restore", case.b.id, tmp_path / "b.img"))
    assert (tmp_path / "b.img").read_bytes() == case.b.data
