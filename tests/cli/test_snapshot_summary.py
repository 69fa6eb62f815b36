"""`snapshot` prints the id alone on stdout (for ID=$(dedupimg snapshot ...)) and one human line on stderr:
id, name, bytes read, new, added to the repository, time (restic's "Added to the repository"); -q drops it."""

from __future__ import annotations

import re

from tests.helpers import det_bytes, ok, run_cli


def test_snapshot_prints_the_id_and_one_summary_line(tmp_path):
    repo = tmp_path / "repo"
    ok(run_cli("init", "-r", repo))
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(1, 3 << 20) + bytes(1 << 20))
    proc = run_cli("-r", repo, "snapshot", image, "--name", "web01", text=True)
    snap_id = ok(proc).strip()
    assert re.fullmatch(r"[0-9a-f]{64}", snap_id)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(rf"snapshot {snap_id[:8]} of web01 saved: 4\.0 MiB read, 3\.[0-9] MiB new, "
                        r"[0-9.]+ MiB added to the repository, in [0-9.]+ s", lines[0]), lines[0]
    again = run_cli("-r", repo, "snapshot", image, "--name", "web01", text=True)
    assert " 0 B new, " in again.stderr  # the same image: nothing new
    quiet = run_cli("-r", repo, "snapshot", image, "--name", "web01", "-q", text=True)
    assert re.fullmatch(r"[0-9a-f]{64}\n", ok(quiet)) and quiet.stderr == ""
