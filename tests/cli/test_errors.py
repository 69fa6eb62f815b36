"""Errors that say exactly what happened (issue 11 §5, and §4b's init inside a repository), through the CLI.

Exit codes: README's table, ``errors.EXIT_CODES`` and the error classes agree; every command's ``--help`` lists
the codes every command, every repository-opening and every locking command can return; an unreadable
repository or index is "permission denied" (16); ``-r`` works after the command as before it; ``init`` refuses
a path inside another repository; library argument checks raise UsageError, not ValueError.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from dedupimg.core import errors
from dedupimg.core.errors import EXIT_CODES, DedupimgError, UsageError
from tests.helpers import ROOT, det_bytes, fails, ok, run_cli, small_repo

# -- the tables ------------------------------------------------------------------------------------------------


def _error_classes() -> list[type[DedupimgError]]:
    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, DedupimgError)]


def _readme_codes() -> dict[int, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.+) \|$", section, re.M)}


def test_readme_table_exit_codes_and_classes_agree():
    readme = _readme_codes()
    assert sorted(readme) == sorted(EXIT_CODES), "README's exit code table and errors.EXIT_CODES differ"
    classes = _error_classes()
    for cls in classes:
        assert cls.exit_code in EXIT_CODES, f"{cls.__name__}: exit code {cls.exit_code} is not documented"
        # Each class says what its code means, in its own docstring (not inherited).
        assert (cls.__dict__.get("__doc__") or "").strip(), f"{cls.__name__} has no docstring of its own"
    used = {cls.exit_code for cls in classes}
    # Every documented failure code belongs to a class (0 is success; 16 and 18 are also what main makes of
    # a raw EACCES/ENOSPC, but they have classes too).
    assert set(EXIT_CODES) - {0} <= used, f"codes without a class: {sorted(set(EXIT_CODES) - {0} - used)}"


def test_a_code_is_shared_only_by_classes_of_one_meaning():
    # A script tells codes apart, not classes: where classes share a code, the table says so by listing them
    # here, and adding a class to a code is a decision this test makes visible.
    by_code: dict[int, set[str]] = {}
    for cls in _error_classes():
        by_code.setdefault(cls.exit_code, set()).add(cls.__name__)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert shared == {
        10: {"RepositoryNotFound", "NotARepository"},  # no repository at the path
        16: {"SourceError", "TargetError", "PermissionDenied", "UnusablePath"},  # a path cannot be read or written
        17: {"IntegrityError", "CheckFailed"},  # damage found (the index's: "run repair index")
    }, shared
    assert by_code[21] == {"RepositoryExists"}  # init's refusals, apart from "no repository here" (10)


def test_library_modules_raise_usage_error_not_value_error():
    # ValueError is raised only inside the decoders, which turn it into their own errors before returning.
    internal = {"config.py", "pack.py", "manifest.py", "readpool.py", "crypto.py"}
    offenders = []
    for path in sorted((ROOT / "dedupimg").rglob("*.py")):
        if path.name in internal:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name) and target.id == "ValueError":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_library_argument_checks_are_usage_errors(tmp_path):
    from dedupimg.ops.check import check
    from dedupimg.repo.compaction import plan
    from dedupimg.store.lock import LockMode, RepositoryLock

    with small_repo(tmp_path / "repo") as repo:
        with pytest.raises(UsageError, match="max_unused"):
            plan(repo, 1.5)
        with pytest.raises(UsageError, match="share of packs"):
            check(repo, 2.0)
    with pytest.raises(UsageError, match="lock wait"):
        RepositoryLock(tmp_path / "repo", LockMode.SHARED, -1)


# -- every command's help --------------------------------------------------------------------------------------


def _commands() -> Iterator[tuple[str, ...]]:
    from dedupimg.cli.main import app  # importing main registers every command

    def walk(cmd: object, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        subs = getattr(cmd, "commands", None)
        if subs is None:
            yield path
            return
        for name, sub in subs.items():
            yield from walk(sub, (*path, name))

    yield from walk(typer.main.get_command(app), ())


LOCKING = {("snapshot",), ("restore",), ("verify",), ("mount",), ("serve",), ("check",), ("forget",), ("tag",),
           ("prune",), ("repair", "index")}
NOT_OPENING = {("init",)}  # makes a repository
NO_INDEX = {("init",), ("repair", "index")}  # repair rebuilds a missing or damaged index: no "run repair index"


@pytest.mark.slow
def test_every_command_help_lists_the_codes_it_can_return():
    commands = set(_commands())
    assert commands >= {("init",), ("snapshot",), ("snapshots",), ("restore",), ("verify",), ("info",),
                        ("forget",), ("prune",), ("check",), ("repair", "index"), ("mount",), ("serve",)}
    for command in sorted(commands):
        out = ok(run_cli(*command, "--help", env={"COLUMNS": "200"}))
        text = " ".join(out.split())
        assert "Exit codes: " in text, (command, out)
        epilog = text.split("Exit codes: ", 1)[1]
        listed = {int(c) for c in re.findall(r"(?:^|; )(\d+) ", epilog)}
        assert listed <= set(EXIT_CODES), (command, listed)
        expected = {0, 1, 2, 130}
        if command not in NOT_OPENING:
            expected |= {10, 12, 16}  # no repository there, a damaged config, permission denied
        if command not in NO_INDEX:
            expected |= {17}  # "run repair index" (and damage found)
        if command in LOCKING:
            expected |= {11}
        assert expected <= listed, (command, sorted(expected - listed))
        assert "--repo" in text, (command, "no -r/--repo after the command")
    restore = " ".join(ok(run_cli("restore", "--help", env={"COLUMNS": "200"})).split())
    assert all(f"{c} " in restore.split("Exit codes: ", 1)[1] for c in (13, 14, 15, 18))
    assert "21 init" in " ".join(ok(run_cli("init", "--help", env={"COLUMNS": "200"})).split())


# -- -r after the command -----------------------------------------------------------------------------------------


@pytest.fixture
def repo_with_snapshot(tmp_path: Path) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    ok(run_cli("init", "-r", repo, "--chunk-size", "4096"))
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(1, 100_000))
    ok(run_cli("snapshot", image, "-r", repo))
    return repo, image


@pytest.mark.slow
def test_repo_option_after_the_command(repo_with_snapshot, tmp_path):
    repo, image = repo_with_snapshot
    assert "1 snapshot\n" in ok(run_cli("snapshots", "-r", repo))
    assert '"name": "disk.img"' in ok(run_cli("snapshots", f"--repo={repo}", "--json"))
    assert "snapshots    1" in ok(run_cli("info", "--repo", repo))
    ok(run_cli("snapshot", "--name", "disk.img", "--repo", repo, image))
    ok(run_cli("snapshot", "--name", "disk.img", image, "-r", repo))
    # restore's positional arguments around the option, and after "--"
    ok(run_cli("restore", "latest", "-r", repo, tmp_path / "a.img"))
    assert (tmp_path / "a.img").read_bytes() == image.read_bytes()
    ok(run_cli("restore", "-r", repo, "--", "latest", tmp_path / "b.img"))
    assert (tmp_path / "b.img").read_bytes() == image.read_bytes()
    restored = subprocess.run(
        [sys.executable, "-m", "dedupimg", "restore", "latest", "-", "-r", str(repo)],
        capture_output=True, env={k: v for k, v in os.environ.items() if k != "DEDUPIMG_REPO"}, timeout=600,
    )
    assert restored.returncode == 0 and restored.stdout == image.read_bytes(), restored.stderr
    ok(run_cli("verify", "latest", "-r", repo))
    ok(run_cli("check", "-r", repo))
    ok(run_cli("forget", "--keep-last", "1", "-r", repo))
    ok(run_cli("prune", "--dry-run", "-r", repo))
    ok(run_cli("repair", "index", "-r", repo))
    assert "1 snapshot\n" in ok(run_cli("snapshots", "-r", repo))


def test_repo_option_after_the_command_overrides_the_environment(repo_with_snapshot, tmp_path):
    repo, _ = repo_with_snapshot
    assert "1 snapshot\n" in ok(run_cli("snapshots", "-r", repo, env={"DEDUPIMG_REPO": str(tmp_path / "none")}))
    # The same path before and after is fine; two different ones are a usage error.
    assert "1 snapshot\n" in ok(run_cli("-r", repo, "snapshots", "-r", repo))
    fails(run_cli("-r", tmp_path / "other", "snapshots", "-r", repo), 2, "two repositories given")
    # A "-r" given as an option's value is that value, not a repository.
    out = ok(run_cli("snapshots", "--name", "-r", "-r", repo))
    assert "0 snapshots" in out


# -- permission denied ---------------------------------------------------------------------------------------------


OTHER_UID = 1234


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory another user can reach (pytest's own tmp_path is root's alone)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:  # as CI runs: root, util-linux from setup.sh
        pytest.fail("these tests run the CLI as another user: they need root and setpriv (util-linux)")
    path = Path(tempfile.mkdtemp(prefix="dedupimg-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_other_user(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    return run_cli(*args, user=OTHER_UID, cwd="/")


def open_to_all(repo: Path) -> None:
    """Every directory and file of the repository readable and writable by anyone."""
    for dirpath, dirnames, filenames in os.walk(repo):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666)
    repo.chmod(0o777)


@pytest.mark.slow
def test_unreadable_repository_or_index_is_permission_denied(shared_tmp):
    repo = shared_tmp / "repo"
    ok(run_cli("init", "-r", repo))
    image = shared_tmp / "disk.img"
    image.write_bytes(det_bytes(2, 50_000))
    ok(run_cli("snapshot", "-r", repo, image))

    # The repository is its owner's alone (0700): another user cannot read it.
    fails(as_other_user("-r", repo, "snapshots"), 16, "permission denied")
    fails(as_other_user("info", "-r", repo), 16, "permission denied")

    # Everything readable but the index directory.
    open_to_all(repo)
    assert "1 snapshot\n" in ok(as_other_user("-r", repo, "snapshots"))
    (repo / "index").chmod(0o000)
    for command in (["snapshots"], ["info"], ["check"], ["verify", "latest"], ["snapshot", image]):
        fails(as_other_user("-r", repo, *command), 16, "permission denied")

    # The index directory readable, its data file not.
    (repo / "index").chmod(0o777)
    (repo / "index" / "data.mdb").chmod(0o000)
    for command in (["snapshots"], ["info"], ["restore", "latest", shared_tmp / "out.img"]):
        fails(as_other_user("-r", repo, *command), 16, "permission denied")
    assert not (shared_tmp / "out.img").exists()


@pytest.mark.slow
def test_unreadable_pack_is_permission_denied_not_damage(shared_tmp):
    # Taken for damage, an unreadable pack would make check exit 17 and repair leave out its snapshots.
    repo = shared_tmp / "repo"
    ok(run_cli("init", "-r", repo))
    image = shared_tmp / "disk.img"
    image.write_bytes(det_bytes(3, 50_000))
    ok(run_cli("snapshot", "-r", repo, image))
    open_to_all(repo)
    for p in (repo / "packs").rglob("*.pack"):
        p.chmod(0o000)
    for command in (["verify", "latest"], ["check", "--read-data"], ["repair", "index"]):
        fails(as_other_user("-r", repo, *command), 16, "permission denied")
    assert "1 snapshot\n" in ok(run_cli("-r", repo, "snapshots"))  # repair gave up without touching the index
    ok(run_cli("-r", repo, "check", "--read-data"))


# -- init inside a repository ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_init_inside_another_repository_is_refused(tmp_path):
    repo = tmp_path / "repo"
    ok(run_cli("init", "-r", repo))
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    fails(run_cli("init", "-r", repo / "packs" / "x"), 21, f"is inside the dedupimg repository {repo}")
    fails(run_cli("init", "-r", repo / "sub" / "deeper"), 21, f"is inside the dedupimg repository {repo}")
    fails(run_cli("init", "-r", repo / "packs" / ".." / "y"), 21, "is inside the dedupimg repository")
    (tmp_path / "link").symlink_to(repo)
    fails(run_cli("init", "-r", tmp_path / "link" / "z"), 21, "is inside the dedupimg repository")
    fails(run_cli("init", "-r", repo), 21, "is a dedupimg repository already")
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before  # nothing made inside it

    (tmp_path / "file").write_text("x")
    fails(run_cli("init", "-r", tmp_path / "file"), 21, "not a directory")
    # Beside a repository is fine.
    ok(run_cli("init", "-r", tmp_path / "second"))


def test_hostile_input_found_by_review_gets_one_line(repo_with_snapshot, tmp_path):
    """What a review of the CLI broke: each now one clear line and a documented code, nothing stored."""
    repo, image = repo_with_snapshot
    env = {"DEDUPIMG_PASSWORD": "pw", "DEDUPIMG_ENCRYPTION": "aes-256-gcm"}
    for bad in ("abc", "1000", "-1"):  # read at import: was a ValueError traceback, or 1000 worker processes
        fails(run_cli("-r", repo, "snapshots", env={"DEDUPIMG_READ_WORKERS": bad}), 2, "DEDUPIMG_READ_WORKERS")
    for var in ("DEDUPIMG_NBD_MAX_CONNECTIONS", "DEDUPIMG_NBD_NEGOTIATION_SECONDS"):  # serve's limits
        fails(run_cli("-r", repo, "serve", "--listen", "127.0.0.1:0", env={var: "0"}), 2, var)
    fails(run_cli("-r", repo, "check", "--lock-wait", "nan"), 2, "--lock-wait")  # waited for ever
    before = ok(run_cli("-r", repo, "snapshots", "--json"))
    weird = Path(os.fsdecode(bytes(tmp_path) + b"/src\xff.img"))
    weird.write_bytes(det_bytes(2, 50_000))  # failed only after the image was stored (UnicodeEncodeError)
    fails(run_cli("-r", repo, "snapshot", weird, "--name", "w"), 2, "not valid UTF-8")
    fails(run_cli("-r", repo, "snapshot", image, "--name", "two\nlines"), 2, "control characters")
    assert ok(run_cli("-r", repo, "snapshots", "--json")) == before
    fails(run_cli("-r", Path(os.fsdecode(bytes(tmp_path) + b"/repo\xff")), "init", "--encryption", "none"), 2,
          "not printable UTF-8")
    assert not Path(os.fsdecode(bytes(tmp_path) + b"/repo\xff")).exists()  # was half made, then refused again
    enc = tmp_path / "enc"
    ok(run_cli("-r", enc, "init", env=env))
    fails(run_cli("-r", enc, "--password-command", "cat /dev/zero", "snapshots"), 22, "longer than")  # grew
    assert subprocess.run([sys.executable, "-m", "dedupimg", "-r", str(repo), "snapshots"], stdin=subprocess.DEVNULL,
                          capture_output=True, close_fds=True).returncode == 0
    closed = subprocess.run(f"{sys.executable} -m dedupimg -r {repo} snapshots <&-", shell=True, capture_output=True)
    assert closed.returncode == 0, closed.stderr  # stdin closed: was AttributeError on sys.stdin.isatty()


def test_an_index_that_is_a_file_is_a_missing_index(tmp_path):
    """Found by review: index/ replaced by a file was exit 1 "Not a directory", not 17 with the repair hint."""
    repo = tmp_path / "repo"
    ok(run_cli("-r", repo, "init", "--encryption", "none"))
    shutil.rmtree(repo / "index")
    (repo / "index").write_text("x")
    fails(run_cli("-r", repo, "snapshots"), 17, "repair index")
