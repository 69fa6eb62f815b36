"""Where the CPU of an S3 snapshot and restore goes, client and server, on one machine (issue 13 §5).

    .venv/bin/python benchmarks/s3_cpu_budget.py [--image benchmarks/work/s3/series/vm/v1.img]

Starts a SeaweedFS (benchmarks/s3.py's), then measures, with the page cache dropped before each step:
the PUT ceiling (32 MiB objects, 4 threads, about 1 GB) and the ranged-GET ceiling; a first snapshot of the
image into an S3 repository and into a local one; a restore of it from each. For each it prints wall seconds,
the client's CPU seconds (rusage of the child, or of this process for the ceilings), SeaweedFS's CPU seconds
(/proc/PID/stat of every `weed server` process) and cores busy (CPU / wall). The upper bound of a first
snapshot's stored MB/s on this machine is then (stored bytes) / ((client + server CPU) / cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import s3 as bench
from measure import MB

HERE = Path(__file__).resolve().parent
DEDUPIMG = HERE.parent / ".venv" / "bin" / "dedupimg"
TICK = os.sysconf("SC_CLK_TCK")


def weed_cpu() -> float:
    pids = subprocess.run(["pgrep", "-f", "weed server"], capture_output=True, text=True).stdout.split()
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def report(what: str, wall: float, client: float, server: float, nbytes: int, unit: str = "MB/s") -> None:
    print(f"{what:34s} {nbytes / MB / wall:7.0f} {unit}  wall {wall:5.2f} s  client {client:5.2f} s  "
          f"server {server:5.2f} s  cores busy {(client + server) / wall:4.2f}", flush=True)


def timed_command(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    bench.drop_caches()
    w0, c0, t0 = weed_cpu(), children_cpu(), time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0, children_cpu() - c0, weed_cpu() - w0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=HERE / "work" / "s3" / "series" / "vm" / "v1.img")
    args = ap.parse_args(argv)
    if not args.image.is_file():
        ap.error(f"{args.image} does not exist: run benchmarks/s3.py once (it builds the series)")
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    work = Path(tempfile.mkdtemp(prefix="s3cpu-", dir="/var/tmp"))
    env = {**os.environ, "DEDUPIMG_PASSWORD": "benchmark", "DEDUPIMG_CACHE_DIR": str(work / "cache")}
    size = args.image.stat().st_size
    try:
        with bench.seaweedfs(work / "weed") as server:
            w0, c0 = weed_cpu(), own_cpu()
            seconds, names = bench.put_ceiling(server, 1024 * MB, 4)
            stored = len(names) * bench.OBJECT
            report("PUT ceiling (stored bytes)", seconds, own_cpu() - c0, weed_cpu() - w0, stored)
            w0, c0 = weed_cpu(), own_cpu()
            seconds = bench.get_ceiling(server, names, 4)
            report("ranged GET ceiling", seconds, own_cpu() - c0, weed_cpu() - w0, stored)
            remote, local = server.url("cpu"), str(work / "local")
            for repo in (remote, local):
                subprocess.run([str(DEDUPIMG), "-r", repo, "init"], env=env, check=True, capture_output=True)
            wall, client, srv = timed_command([str(DEDUPIMG), "-r", remote, "snapshot", str(args.image),
                                               "--name", "vm"], env)
            stored = bench.s3_bytes(server, "cpu")
            report("S3 first snapshot (image bytes)", wall, client, srv, size)
            report("S3 first snapshot (stored bytes)", wall, client, srv, stored)
            cores = os.cpu_count() or 1
            bound = stored / MB / ((client + srv) / cores)
            print(f"{'':34s} at most {bound:.0f} MB/s stored on {cores} cores", flush=True)
            wall, client, srv = timed_command([str(DEDUPIMG), "-r", local, "snapshot", str(args.image), "--name",
                                               "vm"], env)
            report("local first snapshot", wall, client, srv, size)
            for label, repo in (("S3 restore", remote), ("local restore", local)):
                target = work / "restored.img"
                target.unlink(missing_ok=True)
                wall, client, srv = timed_command([str(DEDUPIMG), "-r", repo, "restore", "vm@latest", str(target)],
                                                  env)
                report(label, wall, client, srv, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
