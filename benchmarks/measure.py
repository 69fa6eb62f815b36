"""Running a measured command, and the file helpers the harness needs (hash, sparse copy, repository size)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import blake3

MB = 1000 * 1000
COMMAND_TIMEOUT = 4 * 3600

# A forked child starts with its parent's RSS high-water mark (Linux carries it across exec), so each measured
# command is started by this tiny process, as /usr/bin/time would be. It times the command itself too.
LAUNCHER = r"""
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    f.write(f"{wall} {usage.ru_utime} {usage.ru_stime} {usage.ru_maxrss * 1024} {os.waitstatus_to_exitcode(status)}")
"""


@dataclass
class Measurement:
    """One command's cost: wall and CPU seconds, peak RSS, exit code and the end of its output."""

    command: list[str]
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss: int
    exit_code: int
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1][:200] if lines else f"exit code {self.exit_code}"

    def to_json(self) -> dict[str, object]:
        return {
            "command": self.command,
            "wall_s": round(self.wall_s, 4),
            "cpu_s": round(self.cpu_s, 4),
            "user_s": round(self.user_s, 4),
            "sys_s": round(self.sys_s, 4),
            "peak_rss": self.peak_rss,
            "exit_code": self.exit_code,
            "stderr_tail": self.stderr[-2000:],
        }


def sync() -> None:
    subprocess.run(["sync"], check=True)


def run_measured(
    cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, capture_stdout: bool = True
) -> Measurement:
    """Run cmd through the launcher after a sync; a failing command is returned, not raised."""
    sync()
    with tempfile.NamedTemporaryFile("r", prefix="bench-rusage-", suffix=".txt") as report:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, report.name, *cmd],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            timeout=COMMAND_TIMEOUT,
        )
        fields = report.read().split()
    stdout = proc.stdout.decode(errors="replace") if proc.stdout else ""
    stderr = proc.stderr.decode(errors="replace")
    if len(fields) != 5:  # the launcher itself failed (command not found, ...)
        return Measurement(cmd, 0.0, 0.0, 0.0, 0, proc.returncode or 127, stdout, stderr)
    wall, user, system, rss, code = fields
    return Measurement(cmd, float(wall), float(user), float(system), int(rss), int(code), stdout, stderr)


def run_checked(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run an unmeasured helper command; raise with its stderr if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def file_hash(path: Path) -> str:
    """blake3 of a file's contents (memory-mapped, streamed by the kernel; holes read as zeros)."""
    if path.stat().st_size == 0:
        return blake3.blake3().hexdigest()
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(path)).hexdigest()


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def tree_bytes(root: Path) -> tuple[int, int]:
    """(sum of st_size, sum of allocated bytes) of the regular files under root."""
    size = alloc = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                size += st.st_size
                alloc += st.st_blocks * 512
    return size, alloc


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) data extents of an open file, found with SEEK_DATA/SEEK_HOLE."""
    extents = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end - start))
        pos = end
    return extents


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy src over dst (same inode if dst exists) keeping holes as holes and written zeros as written data."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        for offset, length in data_extents(fin.fileno(), size):
            done = 0
            while done < length:
                n = os.copy_file_range(
                    fin.fileno(), fout.fileno(), length - done, offset + done, offset + done
                )
                if n == 0:
                    raise OSError(f"copy_file_range made no progress copying {src}")
                done += n
