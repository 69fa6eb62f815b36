"""The installed command in a subprocess: every command, every documented error, exit codes and messages."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import pytest

from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes, fails, ok, run_cli, text_bytes


@pytest.fixture
def env(tmp_path: Path):
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    image = tmp_path / "disk.img"
    image.write_bytes(text_bytes(1, 300_000) + det_bytes(2, 200_000))
    return repo, image


@pytest.mark.encrypted_only
def test_init_creates_owner_only_repository(tmp_path):
    repo = tmp_path / "repo"
    out = ok(run_cli("-r", repo, "init"))
    assert "created repository" in out
    assert stat.S_IMODE(repo.stat().st_mode) == 0o700
    assert stat.S_IMODE((repo / "config").stat().st_mode) == 0o600
    doc = json.loads((repo / "config").read_text())
    assert doc["encryption"] in ("aes-256-gcm", "chacha20-poly1305") and doc["version"] == 2 and set(doc) == {
        "format", "version", "repo_id", "encryption", "sealed"}  # nothing else shows: the rest is sealed
    assert [p.name for p in (repo / "keys").iterdir()] and stat.S_IMODE((repo / "keys").stat().st_mode) == 0o700
    plain = tmp_path / "plain"
    assert "unencrypted" in ok(run_cli("-r", plain, "init", "--encryption", "none"))
    assert json.loads((plain / "config").read_text())["chunker"]["avg_size"] == 16384


def test_init_refuses_non_empty_directory(tmp_path):
    (tmp_path / "x").write_text("hi")
    fails(run_cli("-r", tmp_path, "init"), 21, "not empty")


def test_init_rejects_bad_chunk_size(tmp_path):
    fails(run_cli("-r", tmp_path / "r", "init", "--chunk-size", "1000"), 2, "power of two")


def test_repository_from_environment(tmp_path):
    repo = tmp_path / "envrepo"
    ok(run_cli("init", env={"DEDUPIMG_REPO": str(repo)}))
    assert (repo / "config").is_file()


def test_no_repository_given(tmp_path):
    fails(run_cli("snapshots"), 2, "no repository given")


@pytest.mark.slow
def test_snapshot_list_restore_info(env, tmp_path):
    repo, image = env
    sid = ok(run_cli("-r", repo, "snapshot", image)).strip()
    assert len(sid) == 64
    doc = json.loads(ok(run_cli("-r", repo, "snapshot", image, "--name", "vm", "--tag", "nightly", "--tag", "a",
                                "--time", "2026-01-02T03:04:05+01:00", "--json")))
    for key in ("id", "name", "time", "size", "bytes_read", "bytes_new", "bytes_stored", "seconds"):
        assert key in doc
    assert doc["name"] == "vm" and doc["size"] == 500_000 and doc["bytes_read"] == 500_000
    assert doc["bytes_new"] == 0  # same content as the first snapshot
    assert doc["time"] == "2026-01-02T03:04:05+01:00"

    listing = json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))
    assert [s["name"] for s in listing] == ["vm", "disk.img"]  # oldest first: --time put vm in January
    assert listing[0]["tags"] == ["a", "nightly"]
    assert json.loads(ok(run_cli("-r", repo, "snapshots", "--name", "vm", "--json")))[0]["id"] == doc["id"]
    table = ok(run_cli("-r", repo, "snapshots"))
    assert doc["id"][:8] in table and sid[:8] in table and "2 snapshots" in table

    out = tmp_path / "out.img"
    ok(run_cli("-r", repo, "restore", doc["id"][:10], out))
    assert out.read_bytes() == image.read_bytes()
    ok(run_cli("-r", repo, "restore", "latest", out, "--force", "--name", "vm"))
    assert out.read_bytes() == image.read_bytes()
    piped = run_cli("-r", repo, "restore", "disk.img@latest", "-")  # `latest` alone: two names, ambiguous
    assert piped.returncode == 0 and piped.stdout == image.read_bytes()

    info = json.loads(ok(run_cli("-r", repo, "info", "--json")))
    assert info["snapshots"] == 2 and info["logical_bytes"] == 1_000_000
    assert info["dedup_ratio"] >= 1.9 and info["compression_ratio"] > 1.0
    assert "dedup ratio" in ok(run_cli("-r", repo, "info"))


def test_restore_delta_json(env, tmp_path):
    repo, image = env
    sid = ok(run_cli("-r", repo, "snapshot", image)).strip()
    target = tmp_path / "t.img"
    data = bytearray(image.read_bytes())
    data[1000:1010] = b"0123456789"
    target.write_bytes(bytes(data))
    doc = json.loads(ok(run_cli("-r", repo, "restore", sid, target, "--delta", "--json")))
    assert doc["id"] == sid and doc["delta"] is True
    assert doc["bytes_read"] == len(data) and 0 < doc["bytes_written"] <= 8192
    assert target.read_bytes() == image.read_bytes()
    fails(run_cli("-r", repo, "restore", sid, "-", "--delta"), 2, "--delta needs a file")


def test_verify(env, tmp_path):
    repo, image = env
    sid = ok(run_cli("-r", repo, "snapshot", image)).strip()
    assert "verified" in ok(run_cli("-r", repo, "verify", sid[:12]))
    # Damage one stored chunk: verify names the image range and exits 17.
    from dedupimg.repo import pack
    from tests.packfiles import trailer

    pack_file = next(p for p in (repo / "packs").rglob("*.pack")
                     if any(e.type == pack.CHUNK for e in trailer(p)))
    entry = next(e for e in trailer(pack_file) if e.type == pack.CHUNK)
    data = bytearray(pack_file.read_bytes())
    data[entry.data_offset + 10] ^= 0xFF
    pack_file.write_bytes(bytes(data))
    fails(run_cli("-r", repo, "verify", "latest"), 17, "damaged data in image range")


def test_snapshot_from_stdin(env, tmp_path):
    repo, image = env
    doc = json.loads(ok(run_cli("-r", repo, "snapshot", "-", "--name", "piped", "--json", input=image.read_bytes())))
    assert doc["size"] == image.stat().st_size
    out = tmp_path / "o.img"
    ok(run_cli("-r", repo, "restore", "piped@latest", out))
    assert out.read_bytes() == image.read_bytes()


def test_python_dash_m_and_help_lists_exit_codes():
    out = ok(run_cli("restore", "--help"))
    assert "Exit codes" in out and "15" in out


# -- errors -------------------------------------------------------------------------------------------------


def test_missing_repository(tmp_path):
    fails(run_cli("-r", tmp_path / "nope", "snapshots"), 10, "does not exist")


def test_directory_that_is_not_a_repository(tmp_path):
    fails(run_cli("-r", tmp_path, "snapshots"), 10, "not a dedupimg repository")


def test_unsupported_format_version(env):
    repo, _ = env
    doc = json.loads((repo / "config").read_text())
    doc["version"] = 7
    (repo / "config").write_text(json.dumps(doc))
    fails(run_cli("-r", repo, "snapshots"), 12, "version 7 is not supported")


def test_garbage_config(env):
    repo, _ = env
    (repo / "config").write_bytes(b"\x00garbage")
    fails(run_cli("-r", repo, "info"), 12, "damaged or unknown repository config")


def test_unknown_snapshot(env, tmp_path):
    repo, image = env
    ok(run_cli("-r", repo, "snapshot", image))
    fails(run_cli("-r", repo, "restore", "deadbeef", tmp_path / "o"), 13, "no snapshot matches")
    fails(run_cli("-r", repo, "restore", "latest", tmp_path / "o", "--name", "other"), 13, "no snapshot named")


def test_ambiguous_snapshot(env, tmp_path):
    repo, image = env
    with Repository.open(repo) as r:
        from datetime import datetime, timedelta

        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        ids = [take_snapshot(r, str(image), when=t0 + timedelta(hours=i)).record.hex_id for i in range(17)]
    first = [i[0] for i in ids]
    dup = next(c for c in first if first.count(c) > 1)  # 17 ids, 16 hex digits: two share a first digit
    fails(run_cli("-r", repo, "restore", dup, tmp_path / "o"), 14, "ambiguous")


def test_existing_target(env, tmp_path):
    repo, image = env
    ok(run_cli("-r", repo, "snapshot", image))
    target = tmp_path / "exists.img"
    target.write_bytes(b"precious")
    fails(run_cli("-r", repo, "restore", "latest", target), 15, "exists")
    assert target.read_bytes() == b"precious"


def test_missing_source(env, tmp_path):
    repo, _ = env
    fails(run_cli("-r", repo, "snapshot", tmp_path / "missing.img"), 16, "does not exist")


def test_directory_as_source(env, tmp_path):
    repo, _ = env
    fails(run_cli("-r", repo, "snapshot", tmp_path), 16, "is a directory")


def test_unreadable_source(env, tmp_path):
    repo, _ = env
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"x" * 1000)
    os.chmod(secret, 0)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    proc = subprocess.run([*prefix, sys.executable, "-m", "dedupimg", "-r", str(repo), "snapshot", str(secret)],
                          capture_output=True, timeout=60)
    fails(proc, 16, "permission denied")


def test_stdin_without_name(env):
    repo, _ = env
    fails(run_cli("-r", repo, "snapshot", "-", input=b"abc"), 2, "needs --name")


def test_bad_time(env):
    repo, image = env
    fails(run_cli("-r", repo, "snapshot", image, "--time", "yesterday"), 2, "ISO 8601")


def test_unknown_option_is_one_line(env):
    repo, _ = env
    fails(run_cli("-r", repo, "snapshots", "--bogus"), 2, "--bogus")


@pytest.mark.slow
def test_commands_wait_for_an_exclusive_lock_then_fail_with_code_11(env, tmp_path):
    from dedupimg.store.lock import LockMode, RepositoryLock

    repo, image = env
    ok(run_cli("-r", repo, "snapshot", image))
    with RepositoryLock(repo, LockMode.EXCLUSIVE, what="prune"):
        fails(run_cli("-r", repo, "snapshot", image), 11, "locked")
        fails(run_cli("-r", repo, "restore", "latest", tmp_path / "out.img"), 11, "prune")
        fails(run_cli("-r", repo, "verify", "latest", "--lock-wait", "0.3"), 11, "waited")
    assert not (tmp_path / "out.img").exists()
    ok(run_cli("-r", repo, "verify", "latest"))  # released: no stale lock


@pytest.mark.slow
def test_lock_wait_succeeds_once_the_holder_lets_go(env):
    repo, image = env
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from dedupimg.store.lock import LockMode, RepositoryLock\n"
         "with RepositoryLock(sys.argv[1], LockMode.EXCLUSIVE, what='prune'):\n"
         "    print('held', flush=True); time.sleep(1.0)",
         str(repo)],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        ok(run_cli("-r", repo, "snapshot", image, "--lock-wait", "20"))
    finally:
        holder.wait(timeout=30)


def test_shared_commands_run_side_by_side(env, tmp_path):
    from dedupimg.store.lock import LockMode, RepositoryLock

    repo, image = env
    with RepositoryLock(repo, LockMode.SHARED, what="restore"):
        ok(run_cli("-r", repo, "snapshot", image))
        ok(run_cli("-r", repo, "restore", "latest", tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()


def _three_snapshots(repo, image):
    for day in ("01", "02", "03"):
        image.write_bytes(image.read_bytes()[:-1000] + det_bytes(int(day), 1000))
        ok(run_cli("-r", repo, "snapshot", image, "--name", "disk", "--time", f"2026-11-{day}T22:00:00+00:00",
                   *(["--tag", "gold"] if day == "01" else [])))
    return json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))


@pytest.mark.slow
def test_forget_policy_lists_reasons_and_prune_frees_space(env):
    repo, image = env
    snaps = _three_snapshots(repo, image)
    dry = json.loads(ok(run_cli("-r", repo, "forget", "--keep-last", "1", "--keep-tag", "gold", "--dry-run",
                                "--json")))
    (group,) = dry["groups"]
    assert group["name"] == "disk" and dry["dry_run"] is True
    assert [k["reasons"] for k in group["keep"]] == [["last snapshot"], ["has tags [gold]"]]
    assert [r["id"] for r in group["remove"]] == [snaps[1]["id"]]
    assert len(json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))) == 3  # dry run: nothing removed
    out = ok(run_cli("-r", repo, "forget", "--keep-last", "1", "--keep-tag", "gold", "--prune"))
    assert "removed 1 snapshot\n" in out and "pruned:" in out
    left = json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))
    assert [s["id"] for s in left] == [snaps[0]["id"], snaps[2]["id"]]


@pytest.mark.slow
def test_forget_by_id_then_prune_json(env):
    repo, image = env
    snaps = _three_snapshots(repo, image)
    ok(run_cli("-r", repo, "forget", snaps[0]["id"][:12]))
    report = json.loads(ok(run_cli("-r", repo, "prune", "--max-unused", "0%", "--json")))
    assert report["records_dropped"] == 1 and report["bytes_freed"] >= 0
    assert report["dry_run"] is False
    for s in json.loads(ok(run_cli("-r", repo, "snapshots", "--json"))):
        ok(run_cli("-r", repo, "verify", s["id"]))


@pytest.mark.slow
def test_forget_and_prune_bad_input(env):
    repo, image = env
    _three_snapshots(repo, image)
    fails(run_cli("-r", repo, "forget"), 2, "no keep rule")
    fails(run_cli("-r", repo, "forget", "abc", "--keep-last", "1"), 2, "not both")
    fails(run_cli("-r", repo, "forget", "--keep-within", "3x"), 2, "3x")
    fails(run_cli("-r", repo, "forget", "--keep-daily", "-2"), 2, "keep-daily")
    fails(run_cli("-r", repo, "forget", "ffffffffffff"), 13, "ffffffffffff")
    fails(run_cli("-r", repo, "prune", "--max-unused", "lots"), 2, "--max-unused")
    fails(run_cli("-r", repo, "prune", "--max-unused", "150"), 2, "0 to 100")
    assert len(json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))) == 3


@pytest.mark.slow
def test_prune_waits_for_shared_lock_holders(env):
    from dedupimg.store.lock import LockMode, RepositoryLock

    repo, image = env
    _three_snapshots(repo, image)
    with RepositoryLock(repo, LockMode.SHARED, what="restore"):
        fails(run_cli("-r", repo, "prune"), 11, "locked")
        fails(run_cli("-r", repo, "forget", "--keep-last", "1"), 11, "locked")
    assert len(json.loads(ok(run_cli("-r", repo, "snapshots", "--json")))) == 3
    ok(run_cli("-r", repo, "prune"))
