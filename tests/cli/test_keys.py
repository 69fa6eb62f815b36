"""`dedupimg key list / add / remove / passwd` on encrypted repositories (local and S3), their refusals, and
`repair index` of an encrypted repository (it needs the password)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli_env, det_bytes, fails, ok, run_cli, text_bytes

pytestmark = pytest.mark.encrypted_only  # keys exist only in encrypted repositories

FIRST = "test-password"  # tests/conftest.py: every CLI test's DEDUPIMG_PASSWORD


def keys_json(repo: Path | str, password: str, **env: str) -> list[dict[str, Any]]:
    doc = json.loads(ok(run_cli("-r", repo, "key", "list", "--json", env={"DEDUPIMG_PASSWORD": password, **env})))
    assert isinstance(doc, list)
    return doc


def current(keys: list[dict[str, Any]]) -> str:
    [key] = [k["short_id"] for k in keys if k["current"]]
    return str(key)


def snapshot_two(repo: Path, tmp_path: Path) -> dict[str, bytes]:
    """Two snapshots of different images; returns id -> image bytes."""
    taken = {}
    for n, data in enumerate((text_bytes(1, 300_000) + det_bytes(2, 200_000), det_bytes(3, 400_000))):
        image = tmp_path / f"disk{n}.img"
        image.write_bytes(data)
        doc = json.loads(ok(run_cli("-r", repo, "snapshot", image, "--name", f"disk{n}", "--json")))
        taken[doc["id"]] = data
    return taken


def restores_bit_exact(repo: Path, taken: dict[str, bytes], tmp_path: Path, password: str) -> None:
    env = {"DEDUPIMG_PASSWORD": password}
    listed = json.loads(ok(run_cli("-r", repo, "snapshots", "--json", env=env)))
    assert sorted(s["id"] for s in listed) == sorted(taken)
    for sid, data in taken.items():
        out = tmp_path / f"restored-{sid[:8]}.img"
        ok(run_cli("-r", repo, "restore", sid, out, "--force", env=env))
        assert out.read_bytes() == data
        out.unlink()


@pytest.mark.slow
def test_add_list_remove_passwd(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    taken = snapshot_two(repo, tmp_path)
    [first] = keys_json(repo, FIRST)
    assert first["current"] and re.fullmatch("[0-9a-f]{64}", first["id"]) and first["id"][:8] == first["short_id"]
    assert first["user"] and first["host"] and first["created"]

    # A second password: both keys listed, each password marks its own as current.
    second = ok(run_cli("-r", repo, "key", "add", env={"DEDUPIMG_NEW_PASSWORD": "second"})).strip()
    assert re.fullmatch("[0-9a-f]{8}", second) and second != first["short_id"]
    listed = keys_json(repo, FIRST)
    assert sorted(k["short_id"] for k in listed) == sorted([first["short_id"], second])
    assert current(listed) == first["short_id"]
    assert current(keys_json(repo, "second")) == second
    table = ok(run_cli("-r", repo, "key", "list"))
    marked = [line.split() for line in table.splitlines() if line.split()[:1] == ["*"]]
    assert [m[1] for m in marked] == [first["short_id"]] and "2 keys" in table

    # The first key is removed while opened with the second password; the first no longer opens anything.
    fails(run_cli("-r", repo, "key", "remove", first["short_id"]), 2, "opened with", "another password")
    assert "removed key " + first["short_id"] in ok(
        run_cli("-r", repo, "key", "remove", first["short_id"][:5], env={"DEDUPIMG_PASSWORD": "second"}))
    fails(run_cli("-r", repo, "snapshots"), 22, "wrong password")
    assert [k["short_id"] for k in keys_json(repo, "second")] == [second]

    # passwd: the new password (from --new-password-file, over $DEDUPIMG_NEW_PASSWORD) replaces the current one.
    (tmp_path / "third.txt").write_text("third\n")
    out = ok(run_cli("-r", repo, "key", "passwd", "--new-password-file", tmp_path / "third.txt",
                     env={"DEDUPIMG_PASSWORD": "second", "DEDUPIMG_NEW_PASSWORD": "not-this"}))
    [third] = keys_json(repo, "third")
    assert third["current"] and third["short_id"] != second
    assert f"added key {third['short_id']}" in out and f"removed key {second}" in out
    for old in (FIRST, "second", "not-this"):
        fails(run_cli("-r", repo, "snapshots", env={"DEDUPIMG_PASSWORD": old}), 22, "wrong password")
    restores_bit_exact(repo, taken, tmp_path, "third")
    ok(run_cli("-r", repo, "check", "--read-data", env={"DEDUPIMG_PASSWORD": "third"}))


def test_refusals(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    [only] = keys_json(repo, FIRST)
    # The last key: never removed, whatever password opened it.
    fails(run_cli("-r", repo, "key", "remove", only["short_id"]), 2, "only key")
    fails(run_cli("-r", repo, "key", "remove", "0" * 64), 2, "no key")
    fails(run_cli("-r", repo, "key", "remove", "xyz"), 2, "no key")
    fails(run_cli("-r", repo, "key", "list", env={"DEDUPIMG_PASSWORD": "wrong"}), 22, "wrong password")
    # No new password and no terminal to ask on: nothing written.
    fails(run_cli("-r", repo, "key", "add", input=b""), 22, "none was given", "--new-password-file")
    fails(run_cli("-r", repo, "key", "add", env={"DEDUPIMG_NEW_PASSWORD": ""}), 22, "empty password")
    assert len(keys_json(repo, FIRST)) == 1
    # After a second key, removing the last one is still refused, from either password.
    second = ok(run_cli("-r", repo, "key", "add", env={"DEDUPIMG_NEW_PASSWORD": "second"})).strip()
    ok(run_cli("-r", repo, "key", "remove", only["short_id"], env={"DEDUPIMG_PASSWORD": "second"}))
    fails(run_cli("-r", repo, "key", "remove", second, env={"DEDUPIMG_PASSWORD": "second"}), 2, "only key")
    assert [k["short_id"] for k in keys_json(repo, "second")] == [second]


@pytest.mark.slow
def test_key_changes_take_the_exclusive_lock(tmp_path: Path) -> None:
    from dedupimg.store.lock import LockMode, RepositoryLock

    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    with RepositoryLock(repo, LockMode.SHARED, what="snapshot"):
        new = {"DEDUPIMG_NEW_PASSWORD": "second"}
        fails(run_cli("-r", repo, "key", "add", env=new), 11, "locked")
        fails(run_cli("-r", repo, "key", "passwd", "--lock-wait", "0.2", env=new), 11, "waited")
        fails(run_cli("-r", repo, "key", "remove", "abcd"), 11, "locked")
        assert len(keys_json(repo, FIRST)) == 1  # list takes no lock
    ok(run_cli("-r", repo, "key", "add", env={"DEDUPIMG_NEW_PASSWORD": "second"}))
    assert len(keys_json(repo, FIRST)) == 2


def test_key_commands_on_an_unencrypted_repository(tmp_path: Path) -> None:
    repo = tmp_path / "plain"
    ok(run_cli("-r", repo, "init", "--encryption", "none"))
    for args in (["list"], ["list", "--json"], ["add"], ["remove", "abcd"], ["passwd"]):
        fails(run_cli("-r", repo, "key", *args, env={"DEDUPIMG_NEW_PASSWORD": "x"}), 2, "is not encrypted",
              "no keys")
    assert not (repo / "keys").exists()


@pytest.mark.slow
def test_repair_index_of_an_encrypted_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    taken = snapshot_two(repo, tmp_path)
    shutil.rmtree(repo / "index")
    fails(run_cli("-r", repo, "snapshots"), 17, "repair index")
    # Without a password (no variable, file, command, or terminal): exit 22, one line, nothing rebuilt.
    monkeypatch.delenv("DEDUPIMG_PASSWORD")
    for var in ("DEDUPIMG_PASSWORD_FILE", "DEDUPIMG_PASSWORD_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    fails(run_cli("-r", repo, "repair", "index", input=b""), 22, "none was given")
    fails(run_cli("-r", repo, "repair", "index", env={"DEDUPIMG_PASSWORD": "wrong"}), 22, "wrong password")
    assert not (repo / "index").exists()
    (tmp_path / "pw").write_text(FIRST + "\n")
    ok(run_cli("-r", repo, "--password-file", tmp_path / "pw", "repair", "index"))
    restores_bit_exact(repo, taken, tmp_path, FIRST)


@pytest.mark.slow
def test_keys_on_s3(s3_server: Any, s3_credentials: None, tmp_path: Path) -> None:
    location = f"s3:{s3_server.endpoint}/{s3_server.bucket}/keys-{uuid.uuid4().hex[:12]}"
    env = {"DEDUPIMG_CACHE_DIR": str(tmp_path / "cache")}
    ok(run_cli("-r", location, "init", "--chunk-size", "4096", env=env))
    image = tmp_path / "disk.img"
    data = det_bytes(7, 300_000)
    image.write_bytes(data)
    sid = json.loads(ok(run_cli("-r", location, "snapshot", image, "--name", "disk", "--json", env=env)))["id"]
    [first] = keys_json(location, FIRST, **env)
    second = ok(run_cli("-r", location, "key", "add", env={**env, "DEDUPIMG_NEW_PASSWORD": "second"})).strip()
    assert len(keys_json(location, "second", **env)) == 2
    ok(run_cli("-r", location, "key", "remove", first["short_id"], env={**env, "DEDUPIMG_PASSWORD": "second"}))
    fails(run_cli("-r", location, "snapshots", env=env), 22, "wrong password")
    assert [k["short_id"] for k in keys_json(location, "second", **env)] == [second]
    out = tmp_path / "restored.img"
    ok(run_cli("-r", location, "restore", sid, out, env={**env, "DEDUPIMG_PASSWORD": "second"}))
    assert out.read_bytes() == data


@pytest.mark.slow
def test_passwd_killed_at_random_points_always_leaves_a_password_that_opens(tmp_path: Path) -> None:
    """kill -9 of `key passwd` at random moments (while it derives keys, writes the new key object, between adding
    it and removing the old one): afterwards the old or the new password opens the repository, never neither (a
    lost key is every snapshot lost), a finished run leaves only the new one, and every snapshot restores."""
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--chunk-size", "4096"))
    taken = snapshot_two(repo, tmp_path)
    rng = random.Random(14)
    password, outcomes = FIRST, set()
    for round_ in range(10):
        new = f"password-{round_}"
        (tmp_path / "new").write_text(new + "\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dedupimg", "-r", str(repo), "key", "passwd", "--new-password-file",
             str(tmp_path / "new")], env=cli_env(DEDUPIMG_PASSWORD=password), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.9))  # start-up, two argon2id derivations, a durable write, a delete
        proc.kill()
        finished = proc.wait() == 0
        opens = {p: run_cli("-r", repo, "snapshots", "--json", env={"DEDUPIMG_PASSWORD": p}).returncode
                 for p in (password, new)}
        assert set(opens.values()) <= {0, 22} and 0 in opens.values(), (round_, opens)
        if finished:
            assert opens == {password: 22, new: 0}
        outcomes.add((finished, opens[password], opens[new]))
        password = new if opens[new] == 0 else password
    assert len(outcomes) >= 2, outcomes  # the kills did land at different moments
    restores_bit_exact(repo, taken, tmp_path, password)
    ok(run_cli("-r", repo, "check", "--read-data", env={"DEDUPIMG_PASSWORD": password}))
