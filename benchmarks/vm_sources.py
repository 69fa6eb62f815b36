"""VM-native sources (issue 16): an incremental snapshot from a dirty bitmap against a full one, and a full
snapshot over NBD against the same image read as a raw file.

    .venv/bin/python benchmarks/vm_sources.py [--size 4G] [--rounds 3] [--dirty 1] [--cold] [--work DIR]

1. A VM image (benchmarks/series.py's vm kind: text, random, executable-like, zero regions and holes) as a
   sparse raw file. A first snapshot fills the repository (untimed); then, alternating, ``--rounds`` later
   snapshots of the raw file and of the same file through ``qemu-nbd --read-only -f raw`` on a unix socket
   (``nbd+unix://``). Target: NBD at >= 80% of the raw file's speed. Also its CPU bound: both runs keep the same
   cores busy, so NBD cannot beat raw CPU / (client + qemu-nbd CPU) of the raw speed on them.
2. The image as qcow2 with a persistent dirty bitmap (64 KiB granularity, qemu's default). A full snapshot of
   it is the parent; then one 4 KiB write (qemu-io) in ``--dirty`` percent of the 64 KiB blocks, chosen at
   random, so the bitmap marks that share of the disk. Then, alternating, ``--rounds`` incremental snapshots
   (``--parent P --dirty-bitmap b0``, through dedupimg's private qemu-nbd) and full later snapshots of the
   same qcow2. Target: the incremental reads about ``--dirty``% of the disk and is >= 10x faster. Before the
   writes, ``--rounds`` incrementals with nothing dirty give the floor (start-up, key, qemu-nbd, manifest,
   commit) and so the most any incremental can gain on this disk.

An incremental snapshot records a hash derived from its extents (docs/vm-sources.md), so it reads nothing but
the dirty ranges; its manifest is checked equal to the full snapshot's with ``dedupimg diff``.

Every snapshot is the CLI (``dedupimg snapshot ... --json``) in a subprocess, into an encrypted repository
(the default, as the other benchmarks use); wall seconds are medians. By default the page cache is not
dropped: the image is read from memory in every case, so the numbers compare the read paths' CPU. ``--cold``
drops it before each incremental and full snapshot (root), as for a nightly backup whose disk is not cached.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from series import MiB, vm_create

HERE = Path(__file__).resolve().parent
DEDUPIMG = HERE.parent / ".venv" / "bin" / "dedupimg"
BLOCK = 64 << 10  # the dirty bitmap's granularity


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def snapshot(repo: Path, source: str, *extra: str, cpu: list[float] | None = None) -> tuple[float, dict[str, object]]:
    """Wall seconds and --json output of one snapshot; its CPU seconds appended to ``cpu``."""
    started, cpu0 = time.monotonic(), children_cpu()
    out = subprocess.run([str(DEDUPIMG), "-r", str(repo), "snapshot", source, "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    if cpu is not None:
        cpu.append(children_cpu() - cpu0)
    return time.monotonic() - started, json.loads(out)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


class QemuNbd:
    def __init__(self, image: Path, fmt: str, sock: Path) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--shared=4", f"--format={fmt}",
                                      f"--socket={sock}", "--export-name=vm", str(image)])
        while not sock.exists():
            if self.proc.poll() is not None:
                raise SystemExit("qemu-nbd failed to start")
            time.sleep(0.05)
        time.sleep(0.1)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///vm?socket={self.sock}"

    def cpu_seconds(self) -> float:
        """CPU seconds qemu-nbd has used so far (/proc: it runs beside the client on the same cores)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def nbd_vs_raw(work: Path, raw: Path, rounds: int) -> dict[str, object]:
    repo = work / "repo-raw"
    subprocess.run([str(DEDUPIMG), "-r", str(repo), "init"], check=True, capture_output=True)
    log("first snapshot of the raw file (fills the repository, untimed)")
    snapshot(repo, str(raw), "--name", "vm")
    server = QemuNbd(raw, "raw", work / "raw.sock")
    times: dict[str, list[float]] = {"raw file": [], "nbd": []}
    cpu: dict[str, list[float]] = {"raw file": [], "nbd": [], "qemu-nbd": []}
    docs: dict[str, dict[str, object]] = {}
    try:
        for r in range(rounds):
            for kind, source in (("raw file", str(raw)), ("nbd", server.uri)):
                server_cpu = server.cpu_seconds()
                seconds, doc = snapshot(repo, source, "--name", "vm", cpu=cpu[kind])
                if kind == "nbd":
                    cpu["qemu-nbd"].append(server.cpu_seconds() - server_cpu)
                times[kind].append(seconds)
                docs[kind] = doc
                served = f" + qemu-nbd {cpu['qemu-nbd'][-1]:.2f} s" if kind == "nbd" else ""
                log(f"round {r + 1}: later snapshot from {kind}: {seconds:.2f} s, read {doc['bytes_read']}, "
                    f"CPU {cpu[kind][-1]:.2f} s{served}")
    finally:
        server.stop()
    assert docs["raw file"]["blake3"] == docs["nbd"]["blake3"], "NBD and file snapshots differ"
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    size = int(docs["nbd"]["size"])  # type: ignore[call-overload]
    # Both runs keep the same cores busy (CPU / wall about equal): the NBD run cannot be faster, relative to the
    # raw file, than the raw run's CPU over the NBD run's CPU with qemu-nbd's own counted in.
    bound = cpu_med["raw file"] / (cpu_med["nbd"] + cpu_med["qemu-nbd"])
    return {"seconds": times, "median": med, "MB/s": {k: size / 1e6 / v for k, v in med.items()},
            "nbd_vs_raw": med["raw file"] / med["nbd"], "bytes_read": docs["nbd"]["bytes_read"],
            "cpu_seconds": cpu, "cpu_median": cpu_med, "cpu_bound": bound,
            "cores_used": {"raw file": cpu_med["raw file"] / med["raw file"],
                           "nbd": (cpu_med["nbd"] + cpu_med["qemu-nbd"]) / med["nbd"]}}


def drop_caches() -> None:
    """Page cache dropped (root only): the next read of the image comes from the disk, as a nightly one does."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def same_manifest(repo: Path, a: str, b: str) -> bool:
    """Whether two snapshots have the same extents (``dedupimg diff`` finds no changed range)."""
    out = subprocess.run([str(DEDUPIMG), "-r", str(repo), "diff", a, b, "--json"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)["bytes_changed"] == 0


def incremental_vs_full(work: Path, raw: Path, rounds: int, dirty: float, cold: bool) -> dict[str, object]:
    repo = work / "repo-qcow2"
    subprocess.run([str(DEDUPIMG), "-r", str(repo), "init"], check=True, capture_output=True)
    image = work / "vm.qcow2"
    log("converting to qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    log("full snapshot of the qcow2 (the parent, untimed)")
    _, parent = snapshot(repo, str(image), "--name", "vm")
    size = int(parent["size"])  # type: ignore[call-overload]
    times: dict[str, list[float]] = {"incremental": [], "full": [], "nothing dirty": []}
    # The floor: incremental snapshots while the bitmap is still empty (start-up, key derivation, the private
    # qemu-nbd, the parent's manifest walked, a commit: everything but the changed data).
    for r in range(rounds):
        if cold:
            drop_caches()
        seconds, doc = snapshot(repo, str(image), "--name", "vm", "--parent", str(parent["id"]), "--dirty-bitmap", "b0")
        times["nothing dirty"].append(seconds)
        log(f"round {r + 1}: incremental with nothing dirty: {seconds:.2f} s, read {doc['bytes_read']}")
    blocks = size // BLOCK
    rng = random.Random(16)
    chosen = rng.sample(range(blocks), max(1, int(blocks * dirty / 100)))
    log(f"writing 4 KiB into {len(chosen)} of {blocks} 64 KiB blocks ({dirty}%)")
    commands = []
    for n, b in enumerate(chosen):
        commands += ["-c", f"write -P {n % 251 + 1} {b * BLOCK + rng.randrange(16) * 4096} 4k"]
    for i in range(0, len(commands), 2000):
        subprocess.run(["qemu-io", "-f", "qcow2", *commands[i : i + 2000], str(image)], check=True,
                       capture_output=True)
    docs: dict[str, dict[str, object]] = {}
    for r in range(rounds):
        for kind, extra in (("incremental", ["--parent", str(parent["id"]), "--dirty-bitmap", "b0"]),
                            ("full", [])):
            if cold:
                drop_caches()
            seconds, doc = snapshot(repo, str(image), "--name", "vm", *extra)
            times[kind].append(seconds)
            docs[kind] = doc
            log(f"round {r + 1}: {kind}: {seconds:.2f} s, read {doc['bytes_read']}")
    assert docs["incremental"]["hash_of"] == "extents" and docs["full"]["hash_of"] == "image"
    assert same_manifest(repo, str(docs["incremental"]["id"]), str(docs["full"]["id"])), \
        "incremental and full snapshots differ"
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": times, "median": med, "speedup": med["full"] / med["incremental"], "cold": cold,
            "speedup_bound": med["full"] / med["nothing dirty"],
            "bytes_read": {k: d["bytes_read"] for k, d in docs.items()},
            "read_share": int(docs["incremental"]["bytes_read"]) / size,  # type: ignore[call-overload]
            "dirty_blocks": len(chosen), "size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dirty", type=float, default=1.0, help="percent of 64 KiB blocks written")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "vm_sources")
    ap.add_argument("--part", choices=["all", "nbd", "incremental"], default="all")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before each snapshot (root): the image is read from the disk")
    args = ap.parse_args()
    os.environ.setdefault("DEDUPIMG_PASSWORD", "bench")
    size = parse_size(args.size)
    args.work.mkdir(parents=True, exist_ok=True)
    raw = args.work / f"vm-{size // MiB}M.raw"
    if not raw.exists():
        log(f"generating a {size // MiB} MiB VM image")
        vm_create(raw, size)
    for old in ("repo-raw", "repo-qcow2", "vm.qcow2"):
        shutil.rmtree(args.work / old, ignore_errors=True) if old.startswith("repo") else \
            (args.work / old).unlink(missing_ok=True)
    results: dict[str, object] = {"size": size}
    if args.part in ("all", "nbd"):
        results["nbd_vs_raw"] = nbd_vs_raw(args.work, raw, args.rounds)
    if args.part in ("all", "incremental"):
        results["incremental"] = incremental_vs_full(args.work, raw, args.rounds, args.dirty, args.cold)
    print(json.dumps(results, indent=2))
    if "nbd_vs_raw" in results:
        n: dict[str, float] = results["nbd_vs_raw"]  # type: ignore[assignment]
        print(f"full snapshot over NBD: {n['nbd_vs_raw']:.0%} of the raw file's speed (target >= 80%); CPU bound on "
              f"these cores: {n['cpu_bound']:.0%} (raw CPU / (client + qemu-nbd CPU))")
    if "incremental" in results:
        i: dict[str, float] = results["incremental"]  # type: ignore[assignment]
        print(f"incremental ({args.dirty}% dirty): {i['speedup']:.1f}x faster than a full one (target >= 10x), "
              f"read {i['read_share']:.2%} of the disk; with nothing dirty {i['speedup_bound']:.1f}x (the bound)")
    for old in ("repo-raw", "repo-qcow2"):
        shutil.rmtree(args.work / old, ignore_errors=True)
    (args.work / "vm.qcow2").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
