"""Every command against a repository in S3 (a real SeaweedFS: tests/s3server.py), with a local index cache.

Issue 13 §2: init (creating the bucket), snapshot, snapshots, restore, verify, info, forget, prune, check
(--read-data), repair index; the cache is rebuilt from the store when deleted; a second cache (another host)
sees the first one's commits without re-uploading its chunks.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from dedupimg.repo.repository import ENCRYPTED_LOCATIONS
from tests.helpers import det_bytes, fails, ok, run_cli


@pytest.fixture
def s3repo(s3_server: Any, s3_credentials: None, tmp_path: Path) -> dict[str, Any]:
    """A fresh s3: location (a new prefix in the session's bucket) and a cache directory per 'host'."""
    bucket = s3_server.bucket
    location = f"s3:{s3_server.endpoint}/{bucket}/cli-{uuid.uuid4().hex[:12]}"
    return {"location": location, "bucket": bucket, "cache_a": tmp_path / "cache-a", "cache_b": tmp_path / "cache-b",
            "endpoint": s3_server.endpoint}


def dd(s3repo: dict[str, Any], *args: Any, host: str = "a", **kw: Any) -> Any:
    env = {"DEDUPIMG_CACHE_DIR": str(s3repo[f"cache_{host}"]), **kw.pop("env", {})}
    return run_cli("-r", s3repo["location"], *args, env=env, **kw)


def image(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def snapshot_json(s3repo: dict[str, Any], path: Path, *extra: str, host: str = "a") -> dict[str, Any]:
    out = json.loads(ok(dd(s3repo, "snapshot", path, "--name", "disk", "--json", *extra, host=host)))
    assert isinstance(out, dict)
    return out


def test_every_command_on_s3(s3repo: dict[str, Any], tmp_path: Path) -> None:
    out = ok(dd(s3repo, "init", "--chunk-size", "4096"))
    assert "created repository" in out and s3repo["location"] in out
    fails(dd(s3repo, "init"), 21, "already")
    v1 = det_bytes(1, 3 << 20)
    v2 = bytearray(v1)
    v2[1 << 20 : (1 << 20) + 5000] = det_bytes(2, 5000)
    s1 = snapshot_json(s3repo, image(tmp_path, "v1.img", v1))
    s2 = snapshot_json(s3repo, image(tmp_path, "v2.img", bytes(v2)))
    assert s2["bytes_new"] < 100_000 < s1["bytes_new"]
    listed = json.loads(ok(dd(s3repo, "snapshots", "--json")))
    assert [s["id"] for s in listed] == [s1["id"], s2["id"]]
    for snap, data in ((s1, v1), (s2, bytes(v2))):
        target = tmp_path / f"r-{snap['id'][:8]}.img"
        ok(dd(s3repo, "restore", snap["id"][:12], target))
        assert target.read_bytes() == data
        ok(dd(s3repo, "verify", snap["id"][:12]))
    info = json.loads(ok(dd(s3repo, "info", "--json")))
    assert info["snapshots"] == 2 and info["path"] == s3repo["location"]
    ok(dd(s3repo, "check", "--read-data"))

    # The cache is only a cache: deleted, the next command rebuilds it from the index objects.
    caches = [p for p in Path(s3repo["cache_a"]).iterdir() if p.name != ENCRYPTED_LOCATIONS]
    assert len(caches) == 1 and (caches[0] / "index" / "data.mdb").is_file()
    assert oct(caches[0].stat().st_mode & 0o777) == "0o700"
    import shutil

    shutil.rmtree(s3repo["cache_a"])
    listed = json.loads(ok(dd(s3repo, "snapshots", "--json")))
    assert len(listed) == 2

    ok(dd(s3repo, "forget", s1["id"][:12]))
    ok(dd(s3repo, "prune"))
    target = tmp_path / "after-prune.img"
    ok(dd(s3repo, "restore", s2["id"][:12], target))
    assert target.read_bytes() == bytes(v2)
    ok(dd(s3repo, "check", "--read-data"))

    report = json.loads(ok(dd(s3repo, "repair", "index", "--json")))
    assert report["snapshots"] == 1
    ok(dd(s3repo, "check", "--read-data"))
    ok(dd(s3repo, "restore", s2["id"][:12], tmp_path / "after-repair.img"))
    assert (tmp_path / "after-repair.img").read_bytes() == bytes(v2)
    # another host (a fresh cache) after repair sees the same
    listed = json.loads(ok(dd(s3repo, "snapshots", "--json", host="b")))
    assert [s["id"] for s in listed] == [s2["id"]]


def test_second_host_sees_commits_and_uploads_nothing_twice(s3repo: dict[str, Any], tmp_path: Path) -> None:
    ok(dd(s3repo, "init", "--chunk-size", "4096"))
    data = det_bytes(7, 2 << 20)
    img = image(tmp_path, "a.img", data)
    first = snapshot_json(s3repo, img, host="a")
    assert first["chunks_new"] > 0
    again = snapshot_json(s3repo, img, "--time", "2026-01-01T00:00:00Z", host="b")
    assert again["chunks_new"] == 0  # host b's cache learnt host a's chunks from the index objects
    listed = json.loads(ok(dd(s3repo, "snapshots", "--json", host="a")))
    assert {s["id"] for s in listed} == {first["id"], again["id"]}
    # host a forgets b's snapshot; b sees it gone at its next command
    ok(dd(s3repo, "forget", again["id"][:12], host="a"))
    listed = json.loads(ok(dd(s3repo, "snapshots", "--json", host="b")))
    assert [s["id"] for s in listed] == [first["id"]]
    ok(dd(s3repo, "prune", host="b"))
    listed = json.loads(ok(dd(s3repo, "snapshots", "--json", host="a")))  # a rebuilds after b's prune
    assert [s["id"] for s in listed] == [first["id"]]
    ok(dd(s3repo, "restore", first["id"][:12], tmp_path / "r.img", host="a"))
    assert (tmp_path / "r.img").read_bytes() == data
    ok(dd(s3repo, "check", "--read-data", host="a"))


def test_s3_location_errors(s3repo: dict[str, Any], tmp_path: Path) -> None:
    fails(run_cli("-r", "s3:http://", "snapshots"), 2, "s3:")
    fails(dd(s3repo, "snapshots"), 10, "not a dedupimg repository")  # nothing at the prefix yet
    env = {"DEDUPIMG_CACHE_DIR": str(tmp_path / "c")}
    fails(run_cli("-r", f"s3:http://127.0.0.1:1/{s3repo['bucket']}/x", "snapshots",
                  env={**env, "DEDUPIMG_S3_MAX_RETRIES": "0", "DEDUPIMG_S3_RETRY_TIMEOUT": "1"}), 17, "S3")
    os.environ.get("X")


def test_unlock_removes_stale_locks(s3repo: dict[str, Any], tmp_path: Path) -> None:
    import socket
    import time

    from dedupimg.store import location_spec
    from dedupimg.store.s3 import S3Store

    ok(dd(s3repo, "init"))
    spec = location_spec(s3repo["location"])
    store = S3Store(spec["endpoint"], spec["bucket"], spec["prefix"])
    here = socket.gethostname()
    dead = subprocess_pid_gone()
    records = {
        "locks/exclusive-elsewhere-1-old": {"host": "elsewhere", "pid": 1, "time": time.time() - 7200,
                                            "mode": "exclusive", "what": "prune"},
        "locks/shared-here-dead": {"host": here, "pid": dead, "time": time.time(), "mode": "shared",
                                   "what": "snapshot"},
        "locks/shared-elsewhere-live": {"host": "elsewhere", "pid": 7, "time": time.time(), "mode": "shared",
                                        "what": "snapshot"},
    }
    for name, rec in records.items():
        store._put(name, json.dumps(rec).encode())
    # the dead process's lock does not stop an exclusive command; the fresh one of another host does
    fails(dd(s3repo, "prune"), 11, "locked by snapshot", "elsewhere")
    out = ok(dd(s3repo, "unlock"))
    assert "2 locks removed" in out and "prune" in out, out
    assert [o.name for o in store.list("locks/").objects] == ["locks/shared-elsewhere-live"]
    assert json.loads(ok(dd(s3repo, "unlock", "--remove-all", "--json")))["removed"]
    assert not store.list("locks/").objects
    ok(dd(s3repo, "prune"))
    local = tmp_path / "local"
    ok(run_cli("-r", local, "init"))
    assert "0 locks removed" in ok(run_cli("-r", local, "unlock"))


def subprocess_pid_gone() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_init_creates_the_bucket(s3repo: dict[str, Any], tmp_path: Path) -> None:
    location = f"s3:{s3repo['endpoint']}/new-{uuid.uuid4().hex[:12]}/vms"
    env = {"DEDUPIMG_CACHE_DIR": str(tmp_path / "c")}
    fails(run_cli("-r", location, "snapshots", env=env), 10, "does not exist", "bucket")
    ok(run_cli("-r", location, "init", env=env))
    (tmp_path / "x.img").write_bytes(det_bytes(5, 100_000))
    ok(run_cli("-r", location, "snapshot", tmp_path / "x.img", env=env))
    assert "1 snapshot" in ok(run_cli("-r", location, "snapshots", env=env))


def test_delta_chunks_on_s3_travel_between_hosts(s3repo: dict[str, Any], tmp_path: Path) -> None:
    """Deltas (docs/format.md §11) in a real object store: written only with DEDUPIMG_REMOTE_DELTAS=1 (reading a
    base back there costs requests), read by a second host through the index objects' 7-field rows, checked,
    and kept by prune while a delta on them lives."""
    on = {"env": {"DEDUPIMG_REMOTE_DELTAS": "1"}}
    ok(dd(s3repo, "init", "--chunk-size", "4096", "--encryption", "none"))
    versions = [bytearray(det_bytes(5, 2 << 20))]
    for v in (1, 2, 3):
        nxt = bytearray(versions[-1])
        for k in range(30):
            pos = (k * 69_621 + v * 1_013) % (len(nxt) - 16)
            nxt[pos : pos + 16] = det_bytes(100 * v + k, 16)
        versions.append(nxt)
    first = json.loads(ok(dd(s3repo, "snapshot", image(tmp_path, "v0.img", bytes(versions[0])), "--name", "disk",
                             "--json", **on)))
    with_deltas = json.loads(ok(dd(s3repo, "snapshot", image(tmp_path, "v1.img", bytes(versions[1])), "--name",
                                   "disk", "--json", **on)))
    whole = json.loads(ok(dd(s3repo, "snapshot", image(tmp_path, "v2.img", bytes(versions[2])), "--name", "disk",
                             "--json")))
    assert with_deltas["chunks_new"] > 20 and whole["chunks_new"] > 20
    assert with_deltas["bytes_stored"] * 3 < whole["bytes_stored"]  # by default: whole chunks in an object store
    ok(dd(s3repo, "forget", first["id"], host="b"))
    ok(dd(s3repo, "prune", "--max-unused", "0", host="b"))  # the first version's chunks that are bases stay
    for snap, data in ((with_deltas, versions[1]), (whole, versions[2])):
        for host in ("a", "b"):
            out = tmp_path / f"r-{host}-{snap['id'][:8]}.img"
            ok(dd(s3repo, "restore", snap["id"][:12], out, host=host))
            assert out.read_bytes() == bytes(data)
    ok(dd(s3repo, "check", "--read-data", host="b"))
