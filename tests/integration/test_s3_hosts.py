"""Several hosts on one S3 repository, as real concurrent processes (issue 13 §2).

Each "host" is a process with its own cache directory. Two snapshots at the same time both succeed; a prune
started while a snapshot runs waits for it (the snapshot's SHARED lock object against prune's EXCLUSIVE one),
and a snapshot started while a prune runs waits for the prune: afterwards every snapshot restores bit-exact
and check is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from dedupimg.store import location_spec
from dedupimg.store.base import write_object
from dedupimg.store.s3 import S3Store
from tests.helpers import cli_env, det_bytes, ok, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def s3loc(s3_server: Any, s3_credentials: None) -> str:
    return f"s3:{s3_server.endpoint}/{s3_server.bucket}/hosts-{uuid.uuid4().hex[:12]}"


def host_env(tmp_path: Path, host: str) -> dict[str, str]:
    return {"DEDUPIMG_CACHE_DIR": str(tmp_path / f"cache-{host}")}


def start(tmp_path: Path, host: str, *args: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "dedupimg", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(**host_env(tmp_path, host)))


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (proc.args, proc.returncode, err.decode()[-2000:])
    return out.decode()


def wait_for_lock(loc: str, proc: subprocess.Popen[bytes]) -> None:
    """Until ``proc`` holds a lock object in the store (and is still running: the test is meaningful)."""
    spec = location_spec(loc)
    store = S3Store(spec["endpoint"], spec["bucket"], spec["prefix"])
    deadline = time.monotonic() + 60
    while not store.list("locks/").objects:
        assert proc.poll() is None and time.monotonic() < deadline, "the command ended before it was seen locked"
        time.sleep(0.02)
    assert proc.poll() is None, "the command ended too soon for the test to mean anything: use a larger image"


def restore_equals(loc: str, tmp_path: Path, host: str, snap: str, data: bytes) -> None:
    target = tmp_path / f"restore-{snap[:8]}-{host}.img"
    ok(run_cli("-r", loc, "restore", snap, target, env=host_env(tmp_path, host)))
    assert target.read_bytes() == data
    target.unlink()


def test_two_hosts_snapshot_at_once_and_prune_waits(s3loc: str, tmp_path: Path) -> None:
    ok(run_cli("-r", s3loc, "init", "--chunk-size", "4096", env=host_env(tmp_path, "a")))
    shared = det_bytes(1, 4 << 20)
    images = {h: shared + det_bytes(ord(h), 12 << 20) for h in "ab"}
    for h, data in images.items():
        (tmp_path / f"{h}.img").write_bytes(data)
    procs = {h: start(tmp_path, h, "-r", s3loc, "snapshot", tmp_path / f"{h}.img", "--name", h, "--json")
             for h in "ab"}
    ids = {h: json.loads(finish(p))["id"] for h, p in procs.items()}
    for h in "ab":  # each host sees both snapshots, and each restores on the other host
        listed = json.loads(ok(run_cli("-r", s3loc, "snapshots", "--json", env=host_env(tmp_path, h))))
        assert {s["id"] for s in listed} == set(ids.values())
    restore_equals(s3loc, tmp_path, "b", ids["a"], images["a"])
    restore_equals(s3loc, tmp_path, "a", ids["b"], images["b"])

    # Forget a's snapshot (garbage for the prune), then prune from b while host a snapshots again.
    ok(run_cli("-r", s3loc, "forget", ids["a"], env=host_env(tmp_path, "a")))
    new_a = det_bytes(9, 64 << 20)
    (tmp_path / "a2.img").write_bytes(new_a)
    snap = start(tmp_path, "a", "-r", s3loc, "snapshot", tmp_path / "a2.img", "--name", "a", "--json")
    wait_for_lock(s3loc, snap)
    prune = start(tmp_path, "b", "-r", s3loc, "prune", "--lock-wait", "300")
    snap_id = json.loads(finish(snap))["id"]
    finish(prune)
    listed = json.loads(ok(run_cli("-r", s3loc, "snapshots", "--json", env=host_env(tmp_path, "b"))))
    assert {s["id"] for s in listed} == {ids["b"], snap_id}
    restore_equals(s3loc, tmp_path, "b", snap_id, new_a)
    restore_equals(s3loc, tmp_path, "a", ids["b"], images["b"])

    # And the other way round: a snapshot started during a prune waits for it (--lock-wait).
    ok(run_cli("-r", s3loc, "forget", snap_id, env=host_env(tmp_path, "b")))
    prune = start(tmp_path, "b", "-r", s3loc, "prune")
    wait_for_lock(s3loc, prune)
    again = start(tmp_path, "a", "-r", s3loc, "snapshot", tmp_path / "a2.img", "--name", "a", "--json",
                  "--lock-wait", "300")
    finish(prune)
    again_id = json.loads(finish(again))["id"]
    restore_equals(s3loc, tmp_path, "b", again_id, new_a)
    for h in "ab":
        ok(run_cli("-r", s3loc, "check", "--read-data", env=host_env(tmp_path, h)))


def test_a_snapshot_whose_lock_was_removed_is_not_listed(s3loc: str, tmp_path: Path) -> None:
    """Found by review: host b's `unlock --remove-all` and prune while host a's snapshot runs. The prune deletes
    the chunks of a forgotten snapshot that a's snapshot deduplicated against; a's snapshot must then fail
    ("lock ... was lost", exit 11) rather than list a record that cannot restore."""
    ok(run_cli("-r", s3loc, "init", "--encryption", "none", env=host_env(tmp_path, "a")))
    data = det_bytes(3, 24 << 20)
    (tmp_path / "img").write_bytes(data)
    first = ok(run_cli("-q", "-r", s3loc, "snapshot", tmp_path / "img", "--name", "img",
                       env=host_env(tmp_path, "a"))).strip()
    ok(run_cli("-r", s3loc, "forget", first, env=host_env(tmp_path, "a")))  # its chunks are garbage now
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    snap = subprocess.Popen([sys.executable, "-m", "dedupimg", "-r", s3loc, "snapshot", "-", "--name", "img"],
                            stdin=os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(**host_env(tmp_path, "a")))
    with open(fifo, "wb") as feed:
        feed.write(data[: 16 << 20])  # deduplicated against the forgotten snapshot's chunks
        feed.flush()
        wait_for_lock(s3loc, snap)
        ok(run_cli("-r", s3loc, "unlock", "--remove-all", env=host_env(tmp_path, "b")))
        pruned = ok(run_cli("-r", s3loc, "prune", env=host_env(tmp_path, "b")))
        assert "0 packs to delete" not in pruned, pruned  # the forgotten snapshot's packs are gone
        feed.write(data[16 << 20 :])
    _out, err = snap.communicate(timeout=300)
    assert snap.returncode == 11, err.decode()
    assert "was lost" in err.decode() and len(err.decode().strip().splitlines()) == 1, err.decode()
    for host in "ab":
        listed = json.loads(ok(run_cli("-r", s3loc, "snapshots", "--json", env=host_env(tmp_path, host))))
        assert listed == []
    again = ok(run_cli("-q", "-r", s3loc, "snapshot", tmp_path / "img", "--name", "img",
                       env=host_env(tmp_path, "a"))).strip()
    restore_equals(s3loc, tmp_path, "b", again, data)
    ok(run_cli("-r", s3loc, "check", "--read-data", env=host_env(tmp_path, "a")))


@pytest.mark.parametrize("new_id", [False, True], ids=["same-id", "new-id"])
def test_a_host_refuses_an_encrypted_repository_made_unencrypted(s3loc: str, tmp_path: Path, new_id: bool) -> None:
    """The storage provider replaces the config of an encrypted repository by an unencrypted one and deletes its
    keys and index objects: a host that used it must not store plaintext there. Found by review: with a config
    naming another repository id, the host looked in another cache, found no marker and stored plaintext."""
    pw = {"DEDUPIMG_PASSWORD": "correct horse"}
    ok(run_cli("-r", s3loc, "init", env={**host_env(tmp_path, "a"), **pw}))
    (tmp_path / "img").write_bytes(det_bytes(5, 1 << 20))
    ok(run_cli("-r", s3loc, "snapshot", tmp_path / "img", env={**host_env(tmp_path, "a"), **pw}))
    ok(run_cli("-r", s3loc + "-plain", "init", "--encryption", "none", env=host_env(tmp_path, "p")))
    spec, plain = location_spec(s3loc), location_spec(s3loc + "-plain")
    store = S3Store(spec["endpoint"], spec["bucket"], spec["prefix"])
    config = json.loads(S3Store(plain["endpoint"], plain["bucket"], plain["prefix"]).read("config"))
    if not new_id:
        config["repo_id"] = json.loads(store.read("config"))["repo_id"]
    store.delete([o.name for d in ("keys/", "index/") for o in store.list(d).objects])
    write_object(store, "config", json.dumps(config).encode())
    packs = {o.name for d in store.list("packs/").dirs for o in store.list(d + "/").objects}
    (tmp_path / "secret").write_bytes(b"plaintext nobody may read " * 50_000)
    out = run_cli("-r", s3loc, "snapshot", tmp_path / "secret", env=host_env(tmp_path, "a"))
    assert out.returncode == 17, out.stderr.decode()
    assert "was encrypted when this host last used it" in out.stderr.decode()
    assert {o.name for d in store.list("packs/").dirs for o in store.list(d + "/").objects} == packs
