"""`key passwd` killed at its two steps (the new key object written, the old one deleted): never a repository
that no password opens. The random kill -9 test in tests/cli/test_keys.py rarely lands between the steps (a
delete right after a durable write); these stop the command exactly there."""

from __future__ import annotations

from pathlib import Path

import pytest

from dedupimg.ops import keys as key_ops
from dedupimg.repo import keys as repo_keys
from dedupimg.repo.repository import Repository
from tests.helpers import det_bytes, ok, run_cli

pytestmark = pytest.mark.encrypted_only


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs, not even an ordinary exception's cleanup."""


def _opens(repo: Path, password: str) -> bool:
    return run_cli("-r", repo, "snapshots", env={"DEDUPIMG_PASSWORD": password}).returncode == 0


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str, bytes]:
    path = tmp_path / "repo"
    ok(run_cli("-r", path, "init", "--chunk-size", "4096", env={"DEDUPIMG_PASSWORD": "old"}))
    data = det_bytes(5, 200_000)
    (tmp_path / "d.img").write_bytes(data)
    sid = ok(run_cli("-r", path, "snapshot", tmp_path / "d.img", env={"DEDUPIMG_PASSWORD": "old"})).strip()
    return path, sid, data


def _passwd_killed(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDUPIMG_PASSWORD", "old")
    monkeypatch.setenv("DEDUPIMG_NEW_PASSWORD", "new")
    with Repository.open(path) as r, pytest.raises(Killed):
        key_ops.change_password(r)
    monkeypatch.undo()


def test_killed_after_the_new_key_is_durable_both_passwords_open(repo, tmp_path, monkeypatch):
    path, sid, data = repo
    monkeypatch.setattr(repo_keys, "remove_key", lambda store, name: (_ for _ in ()).throw(Killed()))
    _passwd_killed(path, monkeypatch)
    assert _opens(path, "old") and _opens(path, "new")
    # A second passwd with either password finishes the change; the other key stays until removed.
    ok(run_cli("-r", path, "restore", sid, tmp_path / "out.img", env={"DEDUPIMG_PASSWORD": "new"}))
    assert (tmp_path / "out.img").read_bytes() == data


def test_killed_while_the_new_key_is_written_the_old_password_still_opens(repo, tmp_path, monkeypatch):
    path, sid, data = repo

    def killing_write(store: object, name: str, payload: bytes) -> None:
        writer = store.create()  # type: ignore[attr-defined]
        writer.write(payload[: len(payload) // 2])
        raise Killed  # no commit: the temporary file stays behind, as after kill -9

    monkeypatch.setattr(repo_keys, "write_object", killing_write)
    _passwd_killed(path, monkeypatch)
    assert _opens(path, "old") and not _opens(path, "new")
    ok(run_cli("-r", path, "restore", sid, tmp_path / "out.img", env={"DEDUPIMG_PASSWORD": "old"}))
    assert (tmp_path / "out.img").read_bytes() == data
    ok(run_cli("-r", path, "check", env={"DEDUPIMG_PASSWORD": "old"}))  # a leftover temporary file is a hint
