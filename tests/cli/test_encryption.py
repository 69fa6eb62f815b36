"""Encrypted repositories through the CLI: where passwords come from, what a wrong one does, and a config
replaced by an unencrypted one (which would make dedupimg write plaintext) refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dedupimg.core.config import Config
from tests.helpers import det_bytes, fails, ok, run_cli

pytestmark = pytest.mark.encrypted_only


def _env(**changes: str) -> dict[str, str]:
    """This environment without any password (tests/conftest.py sets them), plus ``changes``."""
    env = {k: v for k, v in os.environ.items() if "PASSWORD" not in k and k not in ("DEDUPIMG_REPO", "DEDUPIMG_DEBUG")}
    return {**env, **changes}


def run(*args: str | os.PathLike[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """The CLI with exactly ``env`` (tests.helpers.run_cli adds to this process's, passwords included)."""
    return subprocess.run([sys.executable, "-m", "dedupimg", *map(str, args)], capture_output=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)


def _repo_with_snapshot(tmp_path: Path) -> tuple[Path, Path]:
    repo, image = tmp_path / "repo", tmp_path / "disk.img"
    image.write_bytes(det_bytes(3, 300_000))
    ok(run_cli("-r", repo, "init"))
    ok(run_cli("-r", repo, "snapshot", image, "--name", "disk"))
    return repo, image


def test_password_sources_and_their_order(tmp_path):
    repo, _ = _repo_with_snapshot(tmp_path)  # made with $DEDUPIMG_PASSWORD = test-password (tests/conftest.py)
    right = tmp_path / "right"
    right.write_text("test-password\nsecond line is ignored\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    fails(run("-r", repo, "snapshots", env=_env()), 22, "none was given", "DEDUPIMG_PASSWORD")
    fails(run("-r", repo, "snapshots", env=_env(DEDUPIMG_PASSWORD="nope")), 22, "wrong password")
    ok(run("-r", repo, "snapshots", env=_env(DEDUPIMG_PASSWORD_FILE=str(right))))
    ok(run("-r", repo, "--password-file", right, "snapshots", env=_env()))
    ok(run("-r", repo, "--password-command", f"cat {right}", "snapshots", env=_env()))
    # Given on the command line, a file beats the environment's password (and the reverse fails).
    ok(run("-r", repo, "--password-file", right, "snapshots", env=_env(DEDUPIMG_PASSWORD="nope")))
    fails(run("-r", repo, "--password-file", wrong, "snapshots", env=_env(DEDUPIMG_PASSWORD="test-password")),
          22, "wrong password")
    fails(run("-r", repo, "--password-file", tmp_path / "missing", "snapshots", env=_env()), 22, "cannot read")
    fails(run("-r", repo, "--password-command", "false", "snapshots", env=_env()), 22, "exited with 1")
    fails(run("-r", repo, "snapshots", env=_env(DEDUPIMG_PASSWORD="")), 22, "empty password")


def test_an_unencrypted_repository_never_asks(tmp_path):
    repo, image = tmp_path / "plain", tmp_path / "disk.img"
    image.write_bytes(det_bytes(4, 100_000))
    assert "unencrypted" in ok(run("-r", repo, "init", "--encryption", "none", env=_env()))
    ok(run("-r", repo, "snapshot", image, env=_env()))
    assert "1 snapshot" in ok(run("-r", repo, "snapshots", env=_env()))
    fails(run_cli("-r", tmp_path / "x", "init", "--encryption", "rot13"), 2, "unknown encryption")


def test_a_config_replaced_by_an_unencrypted_one_is_refused(tmp_path):
    repo, image = _repo_with_snapshot(tmp_path)
    sealed = json.loads((repo / "config").read_text())
    (repo / "config").write_bytes(Config(repo_id=sealed["repo_id"]).to_bytes())  # what a hostile storage could do
    fails(run("-r", repo, "snapshot", image, env=_env()), 17, "key objects", "refusing")
    assert not any("plain" in p.name for p in (repo / "packs").rglob("*.tmp"))


def test_copy_and_copied_params_take_the_source_password(tmp_path):
    src, image = _repo_with_snapshot(tmp_path)
    src_pw = tmp_path / "src-pw"
    src_pw.write_text("test-password\n")
    dst = tmp_path / "dst"
    env = _env(DEDUPIMG_PASSWORD="other password")
    fails(run("-r", dst, "init", "--copy-chunker-params-from", src, env=env), 22, "source repository",
          "--from-password-file")
    ok(run("-r", dst, "init", "--copy-chunker-params-from", src, "--from-password-file", src_pw, env=env))
    out = ok(run("-r", dst, "copy", "--from-repo", src, "--from-password-file", src_pw, env=env))
    assert "copied" in out
    restored = tmp_path / "out.img"
    ok(run("-r", dst, "restore", "disk@latest", restored, env=env))
    assert restored.read_bytes() == image.read_bytes()
    # An encrypted source's chunker secrets never go into an unencrypted config.
    fails(run("-r", tmp_path / "plain", "init", "--encryption", "none", "--copy-chunker-params-from", src,
                  "--from-password-file", src_pw, env=env), 2, "encrypted")
    # A repository with its own keys names chunks otherwise: copy says how to make one that can take them.
    other = tmp_path / "other"
    ok(run("-r", other, "init", env=env))
    fails(run("-r", other, "copy", "--from-repo", src, "--from-password-file", src_pw, env=env), 2,
          "--copy-chunker-params-from")
