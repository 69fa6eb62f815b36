"""A remote repository's index cache is rebuilt from the index objects when some it holds are gone (a prune
of another host rewrote them). Any command of this host may do that rebuild, unlocked ones too (`snapshots`,
`info`), while a mount or a restore of the same host is open on that cache and holds pack numbers: a rebuild
must give every pack the number it had, and never give a gone pack's number to another one."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dedupimg.core.config import ChunkerParams, Config
from dedupimg.ops.forget import execute, plan_ids
from dedupimg.ops.prune import prune
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo import pack
from dedupimg.repo.repository import Repository, read_remote_config
from dedupimg.serve.reader import SnapshotReader
from dedupimg.store.base import write_object
from dedupimg.store.local import LocalStore
from dedupimg.store.memory import MemoryStore
from tests.helpers import det_bytes, open_remote

# Another process of the host, as `dedupimg snapshots` is (LMDB must not be opened twice in one process).
LIST_SNAPSHOTS = """
import sys
from pathlib import Path
from dedupimg.repo.repository import Repository, cache_home, read_remote_config
from dedupimg.store.local import LocalStore
store = LocalStore(sys.argv[1])
config = read_remote_config(store)
repo = Repository(cache_home(Path(sys.argv[2]), config.repo_id), config, store, owns_store=False, remote=True)
report = repo.sync()
print(report.packs, " ".join(r.hex_id for r in repo.snapshots()))
repo.close()
"""


def test_a_reader_open_across_a_cache_rebuild_reads_the_right_packs(tmp_path: Path) -> None:
    made = MemoryStore()
    Repository._init_remote(made, Config(chunker=ChunkerParams.for_average(1024), pack_size=1 << 14),
                            tmp_path / "host-a").close()
    (tmp_path / "bucket").mkdir()
    store = LocalStore(tmp_path / "bucket")  # an object store in all but name: index objects, host caches
    store.initialize(pack.pack_levels())
    for obj in made.list("").objects:
        write_object(store, obj.name, made.read(obj.name))
    config = read_remote_config(store)
    images = [det_bytes(1, 300_000), det_bytes(2, 300_000)]
    b = open_remote(store, config, tmp_path / "host-b")
    records = []
    for n, data in enumerate(images):
        (tmp_path / "img").write_bytes(data)
        records.append(take_snapshot(b, str(tmp_path / "img"), name=f"disk{n}",
                                     when=datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=n)).record)
    b.close()

    mounted = open_remote(store, config, tmp_path / "host-a")  # a mount on host a, open from now on
    readers = [SnapshotReader(mounted, rec) for rec in records]
    assert [r.read(0, len(d)) for r, d in zip(readers, images, strict=True)] == images
    before = {row.id: row.pack_no for row in mounted.index.pack_rows()}

    b = open_remote(store, config, tmp_path / "host-b")  # host b forgets the first image and prunes its packs,
    execute(b, plan_ids(b, [records[0].hex_id]))       # which rewrites the index objects host a's cache holds
    prune(b, max_unused=0.0)
    b.close()

    listed = subprocess.run([sys.executable, "-c", LIST_SNAPSHOTS, str(tmp_path / "bucket"), str(tmp_path / "host-a")],
                            capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert listed[1:] == [records[1].hex_id] and int(listed[0]) > 0  # a rebuild: every object read again
    after = {row.id: row.pack_no for row in mounted.index.pack_rows()}
    assert len(after) < len(before)
    assert {i: no for i, no in after.items() if i in before} == {i: before[i] for i in after if i in before}
    assert not {no for i, no in after.items() if i not in before} & set(before.values())

    assert SnapshotReader(mounted, records[1]).read(0, len(images[1])) == images[1]
    assert readers[1].read(0, len(images[1])) == images[1]
    mounted.close()
