"""An index file cut short is refused (IntegrityError: exit 17), never read into a fault or an LMDB abort.

LMDB maps its file and trusts it: a page past the end faults (SIGBUS), and a zeroed page read as a tree page
trips a C assertion (abort). repo/lmdbpages.py walks the trees first when the file is shorter than its meta
page says; here the file is cut by every number of pages in turn, and each cut must either open with every
row readable or be refused, in a process of its own (a fault or an abort kills it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo import lmdbpages
from dedupimg.repo.index import DATA_FILE
from tests.helpers import ROOT, det_bytes, small_repo, text_bytes

READ_ALL = """
import sys
from pathlib import Path
from dedupimg.core.errors import IntegrityError
from dedupimg.repo.index import Index
try:
    index = Index(Path(sys.argv[1]))
    rows = list(index.iter_blob_rows())
    index.snapshots(); index.pack_rows(); index.dead_rows(); index.garbage_bytes()
    [raw for _, raw in index.iter_segments()]
    index.close()
except IntegrityError as exc:
    print("refused:", exc)
    sys.exit(17)
print(len(rows))
"""


def test_every_cut_of_an_index_file_is_refused_or_readable(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    with small_repo(repo_path, avg=1024) as repo:
        for n in range(4):
            (tmp_path / "img").write_bytes(text_bytes(n, 400_000) + det_bytes(n, 400_000))
            take_snapshot(repo, str(tmp_path / "img"), name=f"s{n}",
                          when=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=n))
    data = repo_path / "index" / DATA_FILE
    pages = os.path.getsize(data) // 4096
    outcomes = set()
    for cut in range(1, pages - 2, max(1, pages // 24)):
        copy = tmp_path / f"cut{cut}"
        shutil.copytree(repo_path / "index", copy)
        os.truncate(copy / DATA_FILE, (pages - cut) * 4096)
        os.chmod(copy / DATA_FILE, 0o400)  # read-only: the gap is not filled with zeros, every cut stays short
        proc = subprocess.run([sys.executable, "-c", READ_ALL, str(copy)], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert proc.returncode in (0, 17), (cut, proc.returncode, proc.stderr[-500:])
        outcomes.add(proc.returncode)
    assert 17 in outcomes  # cuts that remove referenced pages are found


def test_the_walk_finds_nothing_wrong_in_a_healthy_file_and_a_zeroed_page_in_a_damaged_one(tmp_path: Path) -> None:
    with small_repo(tmp_path / "repo", avg=1024) as repo:
        (tmp_path / "img").write_bytes(det_bytes(5, 600_000))
        take_snapshot(repo, str(tmp_path / "img"), name="s")
        root = repo.index._main_root(repo.index._path / DATA_FILE, 4096)
    data = tmp_path / "repo" / "index" / DATA_FILE
    with open(data, "rb") as f:
        assert lmdbpages.problem(f.fileno(), 4096, [("main", root)]) is None
    # Zero the last page any tree points at: the walk names it (LMDB would abort reading it).
    with open(data, "r+b") as f:
        pages = os.fstat(f.fileno()).st_size // 4096
        for pgno in range(pages - 1, 1, -1):
            before = os.pread(f.fileno(), 4096, pgno * 4096)
            os.pwrite(f.fileno(), bytes(4096), pgno * 4096)
            if lmdbpages.problem(f.fileno(), 4096, [("main", root)]) is not None:
                break
            os.pwrite(f.fileno(), before, pgno * 4096)  # a free page: nothing points at it
        else:
            raise AssertionError("no referenced page found")
