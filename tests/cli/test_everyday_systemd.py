"""Issue 17 item 6: examples/systemd (service, timer, OnFailure= hook) and the cron line run as written: each
ExecStart of the service, then the cron line, against a real repository; systemd-analyze finds nothing to say."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, check_clean, cli_env, det_bytes, ok, run_cli

UNITS = ROOT / "examples" / "systemd"
DEDUPIMG = "/usr/local/bin/dedupimg"


def _env_file(tmp_path: Path) -> dict[str, str]:
    """examples/systemd/backup.env with this test's repository and image in place of the example paths."""
    values = dict(line.split("=", 1) for line in (UNITS / "backup.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert set(values) == {"DEDUPIMG_REPO", "DEDUPIMG_PASSWORD_FILE", "SOURCE", "NAME", "CHECK_SUBSET"}
    password = tmp_path / "password"
    password.write_text(os.environ["DEDUPIMG_PASSWORD"] + "\n")
    values.update(DEDUPIMG_REPO=str(tmp_path / "repo"), DEDUPIMG_PASSWORD_FILE=str(password),
                  SOURCE=str(tmp_path / "web.img"))
    return values


def _exec_starts(unit: str, env: dict[str, str]) -> list[list[str]]:
    """The ExecStart command lines of ``unit`` as systemd runs them (``${VAR}`` is one word), dedupimg run
    from this tree."""
    lines = re.findall(r"^ExecStart=(.+)$", (UNITS / unit).read_text(), re.M)
    out = []
    for line in lines:
        argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], word) for word in shlex.split(line)]
        assert argv[0] == DEDUPIMG
        out.append([sys.executable, "-m", "dedupimg", *argv[1:]])
    return out


@pytest.mark.slow
def test_service_steps_and_cron_line_run_as_written(tmp_path):
    env = _env_file(tmp_path)
    service = (UNITS / "dedupimg-backup.service").read_text()
    assert "OnFailure=dedupimg-failure@%n.service" in service and "Type=oneshot" in service
    timer = (UNITS / "dedupimg-backup.timer").read_text()
    assert "OnCalendar=" in timer and "Persistent=true" in timer and "WantedBy=timers.target" in timer
    assert os.access(UNITS / "dedupimg-notify-failure", os.X_OK)
    ok(run_cli("-r", env["DEDUPIMG_REPO"], "init", "--chunk-size", "4096"))
    image = Path(env["SOURCE"])
    run_env = cli_env(**env)
    run_env.pop("DEDUPIMG_PASSWORD", None)  # the password comes from the env file's DEDUPIMG_PASSWORD_FILE
    steps = _exec_starts("dedupimg-backup.service", env)
    assert [s[3] for s in steps] == ["snapshot", "forget", "check"]
    assert "--prune" in steps[1] and "--read-data-subset" in steps[2]
    taken = []
    for night in range(2):
        image.write_bytes(det_bytes(night, 60_000))
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True, env=run_env, cwd=ROOT, timeout=120)
            assert proc.returncode == 0, (argv, proc.stderr)
            if argv[3] == "snapshot":
                taken.append(proc.stdout.strip())
    listing = json.loads(ok(run_cli("-r", env["DEDUPIMG_REPO"], "snapshots", "--json")))
    assert [s["id"] for s in listing] == taken  # one day: the newest (daily) and the oldest (restic's rule) stay
    assert all(s["name"] == "web" and s["tags"] == ["nightly"] for s in listing)

    # The cron line: its command, as cron's /bin/sh runs it, with the env file at its place and dedupimg on PATH.
    (cron,) = [ln for ln in (UNITS / "dedupimg.cron").read_text().splitlines() if ln and not ln.startswith("#")]
    fields = cron.split(None, 6)
    assert fields[:5] == ["30", "2", "*", "*", "*"] and fields[5] == "root"
    envfile = tmp_path / "backup.env"
    envfile.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "dedupimg").write_text(f'#!/bin/sh\nexec {sys.executable} -m dedupimg "$@"\n')
    (bindir / "dedupimg").chmod(0o755)
    command = fields[6].replace("/etc/dedupimg/backup.env", str(envfile))
    image.write_bytes(det_bytes(9, 60_000))
    proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**run_env, "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    newest = proc.stdout.splitlines()[0]
    listing = json.loads(ok(run_cli("-r", env["DEDUPIMG_REPO"], "snapshots", "--json")))
    assert [s["id"] for s in listing] == [taken[0], newest]  # forget --prune ran: the middle one went
    assert "removed 1 snapshot" in proc.stdout and "pruned:" in proc.stdout
    assert "checked" not in proc.stdout  # check -q: only problems, so a clean night mails forget's lines only
    check_clean(Path(env["DEDUPIMG_REPO"]))


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed to verify the example units"
    units = []
    for name in ("dedupimg-backup.service", "dedupimg-backup.timer", "dedupimg-failure@.service"):
        text = (UNITS / name).read_text().replace(DEDUPIMG, shutil.which("true") or "/bin/true")
        text = text.replace("/usr/local/sbin/dedupimg-notify-failure", str(UNITS / "dedupimg-notify-failure"))
        (tmp_path / name).write_text(text.replace("/etc/dedupimg/backup.env", str(UNITS / "backup.env")))
        units.append(str(tmp_path / name))
    proc = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
