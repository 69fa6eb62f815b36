"""Review: repair's salvage scan reads a damaged pack in bounded memory, whatever the file's size claims."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from dedupimg.repo import pack
from tests.helpers import det_bytes, small_repo, snap

SCRIPT = textwrap.dedent("""
    import resource, sys
    limit = 1536 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from dedupimg.ops.repair import repair_index
    report = repair_index(sys.argv[1])
    print(len(report.damaged_packs), len(report.salvaged), len(report.left_out))
""")


def test_salvage_of_a_huge_damaged_file_named_like_a_pack_does_not_read_it_whole(tmp_path):
    """A 3 GiB file (sparse) that starts with the pack magic and is named like a pack: repair reported it and
    rebuilt the index; it read the whole file into memory for the salvage scan (MemoryError under a 1.5 GiB
    address-space limit, an OOM kill on a small machine: repair, the tool of last resort, could never run)."""
    path = tmp_path / "repo"
    with small_repo(path) as repo:
        snap(repo, tmp_path / "a.img", det_bytes(1, 100_000))
    bogus = path / "packs" / "ab" / ("ab" + "00" * 31 + ".pack")
    bogus.parent.mkdir(exist_ok=True)
    with open(bogus, "wb") as f:
        f.write(pack.PLAIN.pack_magic)
        f.truncate(3 << 30)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "0"]
