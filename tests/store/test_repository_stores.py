"""The repository on every store: the same library operations, whatever holds the packs.

A repository whose packs live in a MemoryStore (its index and config stay in the directory) must behave as a
local one does: snapshot, restore and verify, the serving reader, forget, prune (rewrite, orphans, temp
objects), check with data, and the one sealing routine's cleanup when a commit fails. This is what a new
backend (issue 13) must carry besides the contract suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupimg.core.config import ChunkerParams
from dedupimg.core.errors import IntegrityError
from dedupimg.ops.check import check
from dedupimg.ops.forget import forget_snapshots
from dedupimg.ops.prune import prune
from dedupimg.ops.restore import verify
from dedupimg.repo import pack
from dedupimg.repo.repository import Repository
from dedupimg.serve.reader import SnapshotReader
from dedupimg.store.memory import MemoryStore
from tests.helpers import det_bytes, restores, snap, text_bytes


@pytest.fixture(params=["local", "memory"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repository]:
    path = tmp_path / "repo"
    Repository.init(path, ChunkerParams.for_average(1024), pack_size=1 << 16).close()
    store = MemoryStore() if request.param == "memory" else None
    r = Repository(path, Repository.read_config(path), store)
    try:
        yield r
    finally:
        r.close()


def packs_in(repo: Repository) -> list[str]:
    return [o.name for o in pack.list_packs(repo.store)]


def test_snapshot_restore_verify_and_serve(repo: Repository, tmp_path: Path):
    data = text_bytes(1, 300_000) + bytes(100_000) + det_bytes(2, 200_000)
    rec = snap(repo, tmp_path / "a.img", data)
    assert len(packs_in(repo)) > 3 and not (repo.store.list("tmp/").objects)
    if isinstance(repo.store, MemoryStore):
        assert not list((repo.path / "packs").rglob("*.pack"))  # nothing went to the directory
    assert restores(repo, rec, data, tmp_path)
    verify(repo, rec.hex_id)
    repo.start_read_pool()  # a memory store cannot be opened by worker processes: reads stay in this one
    assert repo.parallel_reads == repo.store.cross_process
    reader = SnapshotReader(repo, rec)
    assert reader.read(250_000, 200_000) == data[250_000:450_000]
    report = check(repo, 1.0)
    assert report.ok and report.hints == [], (report.findings, report.hints)


def test_forget_prune_and_leftovers(repo: Repository, tmp_path: Path):
    shared = text_bytes(3, 200_000)
    a = snap(repo, tmp_path / "a.img", shared + det_bytes(4, 200_000))
    b_data = shared + det_bytes(5, 200_000)
    b = snap(repo, tmp_path / "b.img", b_data)
    # What crashes leave: a durable pack no index lists, and a temp object of a writer that never finished.
    orphan = repo.new_pack()
    orphan.add(pack.CHUNK, pack.blob_id(b"orphan"), pack.RAW, b"orphan", 6)
    orphan_id, _ = orphan.finish()
    dead_writer = repo.store.create()
    dead_writer.write(b"partial pack")
    report = check(repo)
    assert report.ok and [h.kind for h in report.hints if h.kind == "orphan-pack"] == ["orphan-pack"]
    forget_snapshots(repo, [a])
    result = prune(repo, max_unused=0.0)
    assert result.outcome is not None and result.orphan_packs == 1 and result.tmp_files == 1
    assert result.packs_to_delete + result.packs_to_rewrite > 0 and result.outcome.bytes_freed > 0
    assert pack.pack_name(orphan_id) not in packs_in(repo) and repo.store.list("tmp/").objects == []
    assert restores(repo, b, b_data, tmp_path)
    assert check(repo, 1.0).ok
    assert [r.id for r in repo.snapshots()] == [b.id]


def test_a_pack_whose_commit_failed_is_removed(repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    snap(repo, tmp_path / "a.img", det_bytes(6, 50_000))
    before = packs_in(repo)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repo.index, "commit_pack", full_disk)
    with pytest.raises(OSError):
        snap(repo, tmp_path / "b.img", det_bytes(7, 50_000))
    assert packs_in(repo) == before and repo.store.list("tmp/").objects == []


def test_a_pack_removed_before_its_commit_is_not_listed(repo: Repository, tmp_path: Path):
    """Found by review: two snapshots can write byte-identical packs (one file); when one's commit failed, it
    removed the file while the other was about to list it. Removal and the other's commit now each happen in
    an index write transaction (one writer at a time), and a commit first checks that its file is there."""
    writer = repo.new_pack()
    data = det_bytes(8, 5000)
    writer.add(pack.CHUNK, repo.chunk_id(data), pack.RAW, data, len(data))
    sealed = repo.seal(writer)
    repo.discard_unlisted(sealed)  # the failed twin: not listed, so removed
    assert packs_in(repo) == []
    with pytest.raises(IntegrityError, match="vanished before its commit"):
        repo.index.commit_pack(sealed, [], None, repo.pack_present(sealed))
    assert repo.index.pack_numbers([sealed.id]) == {}
    again = repo.new_pack()
    again.add(pack.CHUNK, repo.chunk_id(data), pack.RAW, data, len(data))
    sealed = repo.seal(again)
    repo.index.commit_pack(sealed, [], None, repo.pack_present(sealed))
    repo.discard_unlisted(sealed)  # listed by the other's commit: kept
    assert packs_in(repo) == [pack.pack_name(sealed.id)]
    assert check(repo).ok
