"""Review: a remote repository's salvaged pack after the repairing host's cache is rebuilt."""

from __future__ import annotations

import os
from pathlib import Path

from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.progress import NoProgress
from dedupimg.core.retention import Policy
from dedupimg.ops.check import check
from dedupimg.ops.forget import forget_and_prune
from dedupimg.ops.prune import prune
from dedupimg.repo import pack
from dedupimg.repo.repair import _repair_under_lock
from dedupimg.repo.repository import cache_home
from tests.helpers import MemoryRemote, det_bytes, restores, snap, text_bytes


def test_the_repairing_hosts_cache_rebuild_keeps_the_salvaged_mark(tmp_path: Path) -> None:
    """Host 0 repairs and salvages a pack of a's own chunks (trailer cut). Host 1 forgets and prunes b, which
    replaces the one index object the repair wrote: host 0's cache is rebuilt from the objects at its next
    command, and the rebuild dropped every meta key, the salvaged mark with them. Host 0's prune then no
    longer rewrites the pack (it stays damaged), and once a is forgotten it stopped at the pack's cut trailer:
    no host could prune any more, until a new repair."""
    world = MemoryRemote(tmp_path)
    store, config, host = world.store, world.config, world.host

    images = {"a": det_bytes(10, 150_000) + text_bytes(1, 120_000), "b": det_bytes(20, 150_000),
              "c": text_bytes(1, 120_000)}
    with host(0) as repo:
        recs = {n: snap(repo, tmp_path / f"{n}.img", data, name=None) for n, data in images.items()}

        def chunks(r: SnapshotRecord) -> set[bytes]:
            return {c for sid, _ in r.segments for c in repo.segment(sid).chunk_ids()}

        mine = chunks(recs["a"]) - chunks(recs["b"]) - chunks(recs["c"])
        victim = None
        for row in repo.index.pack_rows():
            with store.open(pack.pack_name(row.id)) as reader:
                entries = pack.read_trailer(reader, repo.blobs)
            if all(e.type == pack.CHUNK and e.id in mine for e in entries):
                victim = pack.pack_name(row.id)
                break
    assert victim is not None
    store._objects[victim] = store._objects[victim][: entries[-1].end]  # trailer and footer cut
    home = cache_home(tmp_path / "host0", config.repo_id)
    os.makedirs(home / "tmp", exist_ok=True)
    report = _repair_under_lock(home, store, NoProgress(), pack.PLAIN, remote=True)
    assert len(report.salvaged) == 1 and report.left_out == []

    with host(1) as repo:
        forget_and_prune(repo, [recs["b"].hex_id], Policy(), and_prune=True)
    with host(0) as repo:
        assert repo.index.salvaged_packs() != []  # (the cache was rebuilt: host 1 replaced the index object)
        forget_and_prune(repo, [recs["a"].hex_id], Policy())
        prune(repo, 0.0)
        assert victim not in {o.name for o in store.list("packs/").objects}
        assert check(repo, 1.0).ok
        assert restores(repo, recs["c"], images["c"], tmp_path)
