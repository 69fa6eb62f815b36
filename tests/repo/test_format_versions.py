"""Older repositories still open: tests/data/v1-repository.tar.gz is a format 1 (unencrypted) repository written
by dedupimg before format 2 existed (commit ea3ee06: 1 KiB chunks, 64 KiB packs, two snapshots of "disk").
This dedupimg must list, restore, check, extend and prune it, and keep it format 1."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import blake3
import pytest

from dedupimg.ops.check import check
from dedupimg.ops.forget import execute, plan_ids
from dedupimg.ops.prune import prune
from dedupimg.ops.restore import restore
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo import pack
from dedupimg.repo.repository import Repository

ARCHIVE = Path(__file__).resolve().parent.parent / "data" / "v1-repository.tar.gz"
SNAPSHOTS = {  # snapshot id -> blake3 of the image it was taken of
    "d1dfc1f405c465e22d9cb14419ea6cf71a794a776b015efde1a2e0318d2cd7e0":
        "8d4ecde891f6a47d8bb9f49fc85ed41fde18e5accf85c482378644cd713d195c",
    "ade6bad9fad0da15069e43a2fe865eedf2ea4aeb3505db562f216f3614787cec":
        "a377fa2034e960f63a7f38c677af68ff59329d48ef65c5cf12ff6e804cdbd0a2",
}


@pytest.fixture
def v1_repo(tmp_path: Path) -> Path:
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "repo"


def test_a_version_1_repository_opens_restores_and_takes_new_snapshots(v1_repo: Path, tmp_path: Path) -> None:
    before = (v1_repo / "config").read_bytes()
    with Repository.open(v1_repo) as repo:
        assert repo.config.version == 1 and not repo.config.encrypted and repo.unlocked is None
        assert sorted(r.hex_id for r in repo.snapshots()) == sorted(SNAPSHOTS)
        for sid, image_hash in SNAPSHOTS.items():
            out = tmp_path / f"{sid[:8]}.img"
            restore(repo, sid, str(out))
            assert blake3.blake3(out.read_bytes()).hexdigest() == image_hash
        assert check(repo, read_data=1.0).ok
        # Written to by this version: still format 1, and its new snapshot restores too.
        image = tmp_path / "new.img"
        image.write_bytes((tmp_path / f"{next(iter(SNAPSHOTS))[:8]}.img").read_bytes()[::-1])
        new = take_snapshot(repo, str(image), name="disk").record
        # Its next version, with small writes, would be stored as deltas in format 3 (docs/format.md §11);
        # a format-1 repository gets whole chunks, which an older dedupimg reads.
        poked = bytearray(image.read_bytes())
        for pos in range(1000, len(poked), len(poked) // 8):
            poked[pos : pos + 8] = b"\xa5" * 8
        (tmp_path / "next.img").write_bytes(bytes(poked))
        take_snapshot(repo, str(tmp_path / "next.img"), name="disk")
        codecs = set()
        for obj in pack.list_packs(repo.store):
            with repo.store.open(obj.name) as reader:
                codecs |= {e.codec for e in pack.read_trailer(reader)}
        assert pack.DELTA not in codecs and pack.ZSTD in codecs
        execute(repo, plan_ids(repo, [next(iter(SNAPSHOTS))[:8]]))
        prune(repo)
        out = tmp_path / "new-restored.img"
        restore(repo, new.hex_id, str(out))
        assert out.read_bytes() == image.read_bytes()
        assert check(repo, read_data=1.0).ok
    assert (v1_repo / "config").read_bytes() == before
    assert json.loads(before)["version"] == 1 and not (v1_repo / "keys").exists()
