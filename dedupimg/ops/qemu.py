"""Disk image formats (qcow2, vmdk, vdi, vhdx, ...) read through a private ``qemu-nbd``.

``snapshot disk.qcow2`` recognises the format by its magic (as qemu-img does) and stores the guest-visible
disk: dedupimg starts ``qemu-nbd --read-only`` on a unix socket in a private directory, reads the export as an
NBD source (holes and zero clusters never read) and stops it. qemu opens the backing chain itself, so the
snapshot is what ``qemu-img convert -O raw`` would write. An image a running VM holds is refused by qemu's
image locking (snapshot the guest through its own NBD export instead: docs/vm-sources.md).

Only regular files are probed: a raw disk whose guest wrote a qcow2 header at offset 0 would otherwise be
read as qcow2 (with a backing file of the guest's choosing); ``--source-format raw`` turns probing off.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from dedupimg.core.errors import SourceError, UsageError
from dedupimg.core.nbdclient import Address
from dedupimg.ops.nbdsource import NbdSource
from dedupimg.ops.source import FileState

START_TIMEOUT = 30.0

# qemu's own probes, by the bytes at the start of the file.
MAGICS: list[tuple[bytes, str]] = [
    (b"QFI\xfb", "qcow2"),  # qcow2 and qcow (version 1: told apart below)
    (b"QED\x00", "qed"),
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
]
VDI_SIGNATURE = (0x40, b"\x7f\x10\xda\xbe")
FORMATS = sorted({f for _, f in MAGICS} | {"qcow", "vdi", "raw"})


def detect_format(path: str) -> str | None:
    """The image format of the regular file ``path`` from its first bytes, or None (raw, or not a file)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None  # Source.open says what is wrong with it
    for magic, fmt in MAGICS:
        if head.startswith(magic):
            if fmt == "qcow2" and head[4:8] == b"\x00\x00\x00\x01":
                return "qcow"
            return fmt
    off, sig = VDI_SIGNATURE
    if head[off : off + 4] == sig:
        return "vdi"
    return None


def open_image(path: str, fmt: str, name: str | None, bitmap: str | None = None) -> NbdSource:
    """An NBD source reading the guest-visible disk of image ``path`` through a private qemu-nbd.

    qemu-nbd serves one client and exits when it disconnects (no --persistent), so it ends with dedupimg even
    when dedupimg is killed; otherwise closing the source stops it.
    """
    qemu_nbd = shutil.which("qemu-nbd")
    if qemu_nbd is None:
        raise SourceError(f"{path} is a {fmt} image, and reading it needs qemu-nbd (Debian: apt install "
                          f"qemu-utils), or convert it first: qemu-img convert -O raw")
    before = FileState.of(os.stat(path))
    workdir = tempfile.mkdtemp(prefix="dedupimg-qemu-nbd-")
    sock = os.path.join(workdir, "nbd.sock")
    cmd = [qemu_nbd, "--read-only", "--shared=1", f"--format={fmt}", f"--socket={sock}", "--export-name=disk"]
    if bitmap:
        cmd.append(f"--bitmap={bitmap}")
    cmd.append(os.path.abspath(path))
    errlog = open(os.path.join(workdir, "stderr"), "w+b")  # noqa: SIM115 (closed by stop)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog,
                            start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errlog.close()
        shutil.rmtree(workdir, ignore_errors=True)

    def failed() -> SourceError:
        errlog.seek(0)
        text = " ".join(errlog.read().decode(errors="replace").split())
        return SourceError(f"qemu-nbd cannot open {path} as {fmt}: {text or f'exit {proc.returncode}'}")

    deadline = time.monotonic() + START_TIMEOUT
    try:
        try:
            return NbdSource(Address("disk", socket_path=sock), name or Path(path).name, os.path.abspath(path),
                             bitmap=bitmap, changes=lambda: before.differences(FileState.of(os.stat(path))),
                             on_close=stop,
                             retry_while=lambda: proc.poll() is None and time.monotonic() < deadline)
        except SourceError:
            try:
                proc.wait(1)  # it failed: its own message says why
            except subprocess.TimeoutExpired:
                raise
            raise failed() from None
    except BaseException:
        stop()
        raise


def check_format(fmt: str) -> str:
    if fmt not in (*FORMATS, "auto"):
        raise UsageError(f"--source-format {fmt!r}: give auto or one of {', '.join(FORMATS)}")
    return fmt

