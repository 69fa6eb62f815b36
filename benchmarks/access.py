"""Instant access speed: read a past snapshot without restoring it, dedupimg against restic mount.

    .venv/bin/python benchmarks/access.py [--image IMG] [--size-mib 512] [--repeat 3]

Backs up one VM-like image (made with examples/make_vm_image.py unless --image is given) with dedupimg and
restic, then, interleaved and repeated, with a fresh mount or server each time so no page cache helps:
- a sequential read (1 MiB reads) of the snapshot file in `dedupimg mount`;
- `nbdcopy` of the `dedupimg serve` export to `null:` (parallel NBD reads, holes reported by block status);
- a sequential read of the same file in `restic mount`.
Every read is hashed and compared with the image. Prints a Markdown table (MB = 10^6 bytes of image per
wall second, median of the repeats) and writes it to benchmarks/results/access.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import blake3

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = str(ROOT / ".venv" / "bin" / "python")
RESTIC_ENV = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": "/tmp/restic-cache-access"}
READ = 1 << 20


def sh(*cmd: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=3600).stdout


def image_hash(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def timed_read(path: Path) -> tuple[float, str]:
    """Sequential read into one buffer in READ-sized pieces, as dd bs=1M would; returns (seconds, blake3).

    The hash is taken in a second, untimed pass: hashing while timing would take CPU from the file system
    under test on a 2-core machine.
    """
    buf = bytearray(READ)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    seconds = time.perf_counter() - start
    return seconds, image_hash(path)


def wait_for(check: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@contextlib.contextmanager
def background(cmd: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def fuse_mount(cmd: list[str], mnt: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    mnt.mkdir(parents=True, exist_ok=True)
    with background(cmd, env) as proc:
        try:
            wait_for(lambda: os.path.ismount(mnt) or proc.poll() is not None, f"mount at {mnt}")
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} mount failed: {proc.stderr.read().decode()[-300:]}")  # type: ignore[union-attr]
            yield
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def workers_env(workers: int | None) -> dict[str, str] | None:
    """The environment for dedupimg with ``workers`` read worker processes (None: its default)."""
    return None if workers is None else {**os.environ, "DEDUPIMG_READ_WORKERS": str(workers)}


def dedupimg_mount_read(repo: Path, snap_id: str, mnt: Path, workers: int | None = None) -> tuple[float, str]:
    cmd = [PY, "-m", "dedupimg", "-r", str(repo), "mount", str(mnt), "--foreground"]
    with fuse_mount(cmd, mnt, workers_env(workers)):
        return timed_read(mnt / "by-id" / f"{snap_id}.img")


def dedupimg_nbdcopy(repo: Path, snap_id: str, out: Path, workers: int | None = None) -> tuple[float, str]:
    port = free_port()
    cmd = [PY, "-m", "dedupimg", "-r", str(repo), "serve", snap_id, "--listen", f"127.0.0.1:{port}"]
    with background(cmd, workers_env(workers)):
        url = f"nbd://127.0.0.1:{port}/{snap_id}"
        wait_for(lambda: subprocess.run(["nbdinfo", "--size", url], capture_output=True).returncode == 0, "nbd")
        start = time.perf_counter()
        sh("nbdcopy", url, "null:")
        seconds = time.perf_counter() - start
        sh("nbdcopy", url, str(out))  # untimed: proves the same bytes come out
    digest = image_hash(out)
    out.unlink()
    return seconds, digest


def restic_mount_read(repo: Path, image: Path, mnt: Path) -> tuple[float, str]:
    cmd = ["restic", "--repo", str(repo), "mount", str(mnt)]
    with fuse_mount(cmd, mnt, RESTIC_ENV):
        path = mnt / "snapshots" / "latest" / str(image.resolve()).lstrip("/")
        wait_for(path.exists, "restic snapshot tree")
        return timed_read(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "access")
    ap.add_argument("--in-process", action="store_true",
                    help="also time dedupimg with its reads in the serving process (DEDUPIMG_READ_WORKERS=0)")
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = args.image or work / "vm.img"
    if args.image is None:
        sh(PY, str(ROOT / "examples" / "make_vm_image.py"), str(image), "--size-mib", str(args.size_mib))
    size = image.stat().st_size
    want = image_hash(image)

    d_repo, r_repo = work / "dedupimg-repo", work / "restic-repo"
    sh(PY, "-m", "dedupimg", "-r", str(d_repo), "init")
    snap_id = sh(PY, "-m", "dedupimg", "-r", str(d_repo), "snapshot", str(image)).strip()
    sh("restic", "--repo", str(r_repo), "init", env=RESTIC_ENV)
    sh("restic", "--repo", str(r_repo), "backup", "--host", "bench", str(image.resolve()), env=RESTIC_ENV)

    mnt = work / "mnt"
    cases = {
        "dedupimg mount": lambda: dedupimg_mount_read(d_repo, snap_id, mnt),
        "dedupimg serve + nbdcopy": lambda: dedupimg_nbdcopy(d_repo, snap_id, work / "copy.img"),
        "restic mount": lambda: restic_mount_read(r_repo, image, mnt),
    }
    if args.in_process:
        cases["dedupimg mount, reads in process"] = lambda: dedupimg_mount_read(d_repo, snap_id, mnt, 0)
        cases["dedupimg serve + nbdcopy, reads in process"] = lambda: dedupimg_nbdcopy(
            d_repo, snap_id, work / "copy.img", 0)
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            subprocess.run(["sync"], check=True)
            seconds, digest = fn()
            if digest != want:
                raise SystemExit(f"{name}: the bytes read differ from the image")
            runs[name].append(seconds)
            print(f"  {name}: {size / seconds / 1e6:.0f} MB/s", flush=True)

    restic = size / statistics.median(runs["restic mount"]) / 1e6
    lines = [
        "# Instant access: reading a snapshot without restoring it",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({platform.processor() or 'x86_64'});"
        f" image {size / 1e6:.0f} MB logical, {image.stat().st_blocks * 512 / 1e6:.0f} MB allocated;"
        f" {args.repeat} repeats, medians; every read checked bit-exact",
        "",
        "| access | MB/s | vs restic mount |",
        "|---|---:|---:|",
    ]
    for name, secs in runs.items():
        mbs = size / statistics.median(secs) / 1e6
        lines.append(f"| {name} | {mbs:.0f} | {mbs / restic:.2f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "access.md").write_text(report)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
