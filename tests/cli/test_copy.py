"""`dedupimg copy` in a subprocess: local -> S3 -> local (a real SeaweedFS: tests/s3server.py) restores bit-exact
with the same ids, re-copies are skipped, `init --copy-chunker-params-from` makes repositories whose snapshots
share every chunk, and the usage errors."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import check_clean, det_bytes, fails, ok, run_cli, text_bytes

V1 = text_bytes(1, 600_000) + bytes(300_000) + det_bytes(2, 900_000)


@pytest.fixture
def s3(s3_server: Any, s3_credentials: None, tmp_path: Path) -> dict[str, str]:
    """A way to reach fresh s3: locations (new prefixes in the session's bucket), with one cache directory."""
    return {"base": f"s3:{s3_server.endpoint}/{s3_server.bucket}/copy-{uuid.uuid4().hex[:12]}",
            "DEDUPIMG_CACHE_DIR": str(tmp_path / "cache")}


def dd(s3: dict[str, str], *args: Any) -> Any:
    return run_cli(*args, env={"DEDUPIMG_CACHE_DIR": s3["DEDUPIMG_CACHE_DIR"]})


def snapshot_id(s3: dict[str, str], repo: str | Path, image: Path, data: bytes, *extra: str) -> str:
    image.write_bytes(data)
    doc = json.loads(ok(dd(s3, "-r", repo, "snapshot", image, "--name", "disk", "--json", *extra)))
    return str(doc["id"])


def copy_json(s3: dict[str, str], dst: str | Path, src: str | Path, *refs: str) -> dict[str, Any]:
    doc = json.loads(ok(dd(s3, "-r", dst, "copy", "--from-repo", src, "--json", *refs)))
    assert isinstance(doc, dict)
    return doc


def listed(s3: dict[str, str], repo: str | Path) -> list[str]:
    return sorted(s["id"] for s in json.loads(ok(dd(s3, "-r", repo, "snapshots", "--json"))))


@pytest.mark.slow
def test_local_to_s3_to_local_round_trip(s3, tmp_path):
    local, remote, back = tmp_path / "local", f"{s3['base']}/remote", tmp_path / "back"
    ok(run_cli("-r", local, "init", "--chunk-size", "4096"))
    v2 = V1[:100_000] + det_bytes(3, 5000) + V1[105_000:1_500_000] + det_bytes(4, 5000) + V1[1_505_000:]
    s1 = snapshot_id(s3, local, tmp_path / "disk.img", V1)
    s2 = snapshot_id(s3, local, tmp_path / "disk.img", v2)

    ok(dd(s3, "-r", remote, "init", "--copy-chunker-params-from", local))
    first = copy_json(s3, remote, local, s1[:12])  # one snapshot by prefix
    assert first["copied"] == 1 and [s["id"] for s in first["snapshots"]] == [s1]
    assert first["chunks_new"] > 50 and first["bytes_stored"] > 0
    # The rest: the first is skipped and the second sends only the chunks it changed.
    rest = copy_json(s3, remote, local)
    assert (rest["copied"], rest["skipped"]) == (1, 1)
    skipped, copied = rest["snapshots"]
    assert (skipped["id"], skipped["copied"], skipped["skipped"]) == (s1, False, "already in the destination")
    # Two 5000-byte changes: each dirties at most the chunks it overlaps (min 1 KiB: 6-7) and the one after it.
    # (An encrypted repository's cut points depend on its random key: the exact count varies between runs.)
    assert copied["id"] == s2 and 0 < copied["chunks_new"] <= 18
    out = ok(dd(s3, "-r", remote, "copy", "--from-repo", local))
    assert out.splitlines() == [f"skipped disk@{s1[:8]}: already in the destination",
                                f"skipped disk@{s2[:8]}: already in the destination"]
    assert listed(s3, remote) == sorted([s1, s2])
    ok(dd(s3, "-r", remote, "check", "--read-data"))

    # Encrypted repositories name chunks with their id key: the copy back needs the same one (its own AEAD key).
    ok(dd(s3, "-r", back, "init", "--copy-chunker-params-from", remote))
    out = ok(dd(s3, "-r", back, "copy", "--from-repo", remote))
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith("copied disk@") and "new chunks" in line for line in lines)
    assert listed(s3, back) == sorted([s1, s2])
    for sid, data in ((s1, V1), (s2, v2)):
        target = tmp_path / f"r-{sid[:8]}.img"
        ok(run_cli("-r", back, "restore", sid, target))
        assert target.read_bytes() == data
    check_clean(back, "--read-data")


@pytest.mark.slow
def test_copied_chunker_params_share_every_chunk(s3, tmp_path):
    a, b, c = tmp_path / "a", f"{s3['base']}/b", tmp_path / "c"
    ok(run_cli("-r", a, "init", "--chunk-size", "2048"))
    ok(dd(s3, "-r", b, "init", "--copy-chunker-params-from", a))  # from a directory
    ok(dd(s3, "-r", c, "init", "--copy-chunker-params-from", b))  # from S3
    for repo in (b, c):
        info = json.loads(ok(dd(s3, "-r", repo, "info", "--json")))
        assert info["chunk_size"] == 2048
    image = tmp_path / "disk.img"
    ids = [snapshot_id(s3, repo, image, V1, "--time", f"2026-01-0{i}T00:00:00Z") for i, repo in
           enumerate((a, b, c), start=1)]
    # Each repository snapshotted the image itself: copying the others' snapshots sends no chunk.
    for dst, src in ((b, a), (c, b), (a, c), (b, c)):
        doc = copy_json(s3, dst, src)
        assert doc["chunks_new"] == 0 and doc["bytes_new"] == 0 and doc["copied"] >= 1, doc
    assert listed(s3, a) == listed(s3, b) == listed(s3, c) == sorted(ids)
    # Without copied parameters an encrypted repository names chunks with its own key: copy says what to do.
    ok(run_cli("-r", tmp_path / "d", "init"))
    fails(run_cli("-r", tmp_path / "d", "copy", "--from-repo", a), 2, "--copy-chunker-params-from")
    fails(run_cli("-r", tmp_path / "e", "init", "--chunk-size", "4096", "--copy-chunker-params-from", a), 2,
          "--chunk-size", "--copy-chunker-params-from")
    fails(run_cli("-r", tmp_path / "e", "init", "--copy-chunker-params-from", tmp_path / "none"), 10, "none")
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_copy_usage_errors(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    ok(run_cli("-r", src, "init"))
    ok(run_cli("-r", dst, "init", "--copy-chunker-params-from", src))
    assert ok(run_cli("-r", dst, "copy", "--from-repo", src)).strip() == "no snapshots to copy"
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(5, 100_000))
    ok(run_cli("-r", src, "snapshot", image))
    fails(run_cli("-r", src, "copy", "--from-repo", src), 2, "same repository")
    fails(run_cli("-r", dst, "copy"), 2, "--from-repo")
    fails(run_cli("-r", dst, "copy", "--from-repo", src, "ffffffff"), 13, "ffffffff")
    fails(run_cli("-r", dst, "copy", "--from-repo", tmp_path / "none"), 10, "none")
    assert ok(run_cli("-r", dst, "snapshots", "--json")).strip() == "[]"
    out = ok(run_cli("copy", "-r", dst, "--from-repo", src, "disk.img@latest"))
    assert out.startswith("copied disk.img@") and "new chunks" in out and "uploaded" in out
