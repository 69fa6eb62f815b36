"""The backup tools under test: one small class each, with the same init / backup / restore interface."""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from importlib.util import find_spec
from pathlib import Path

import blake3
from measure import Measurement, run_checked, run_measured, tree_bytes
from results import BackupRun


class Tool:
    """A backup tool with its repository (and caches) in its own home directory."""

    name = ""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.repo = home / "repo"

    # -- what each tool defines

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str:
        raise NotImplementedError

    def init_cmd(self) -> list[str]:
        raise NotImplementedError

    def backup_cmd(self, image: Path, version: int) -> list[str]:
        raise NotImplementedError

    def snapshot_id(self, stdout: str, version: int) -> str:
        raise NotImplementedError

    def restore_cmd(self, snapshot_id: str, image: Path, out_dir: Path) -> list[str]:
        raise NotImplementedError

    def restored_path(self, image: Path, out_dir: Path) -> Path:
        return out_dir / image.name

    # -- the shared operations

    def init(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        run_checked(self.init_cmd(), cwd=self.home, env=self.env())

    def backup(self, image: Path, version: int) -> BackupRun:
        """Back up image (run from its directory, named relatively) as version; measured."""
        m = run_measured(self.backup_cmd(image, version), cwd=image.parent, env=self.env())
        snapshot_id = self.snapshot_id(m.stdout, version) if m.ok else None
        return BackupRun(version, snapshot_id, m, *tree_bytes(self.repo))

    def restore(self, snapshot_id: str, image: Path, out_dir: Path) -> tuple[Measurement, Path]:
        """Restore the snapshot of image into the empty directory out_dir; measured. Returns the restored file."""
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        # Timed until the restored image is on disk (`sync`): dedupimg fsyncs its target before it exits,
        # restic and borg do not, and a restore is done when a crash can no longer lose it.
        durable = ["sh", "-c", '"$@" && sync', "sh", *self.restore_cmd(snapshot_id, image, out_dir)]
        m = run_measured(durable, cwd=out_dir, env=self.env(), capture_stdout=False)
        return m, self.restored_path(image, out_dir)


class Dedupimg(Tool):
    name = "dedupimg"

    def __init__(self, home: Path, binary: Path) -> None:
        super().__init__(home)
        self.binary = str(binary)

    def version(self) -> str:
        try:
            number = package_version("dedupimg")
        except PackageNotFoundError:
            number = "(version unknown)"
        return f"dedupimg {number} (source {source_fingerprint()})"

    def env(self) -> dict[str, str]:
        # Encrypted, as init makes it by default (and as restic always is): each command derives its key first.
        return {**os.environ, "DEDUPIMG_PASSWORD": "benchmark"}

    def init_cmd(self) -> list[str]:
        return [self.binary, "-r", str(self.repo), "init"]

    def backup_cmd(self, image: Path, version: int) -> list[str]:
        return [self.binary, "-r", str(self.repo), "snapshot", image.name, "--name", image.stem, "--json"]

    def snapshot_id(self, stdout: str, version: int) -> str:
        return str(parse_json_output(stdout)["id"])

    def restore_cmd(self, snapshot_id: str, image: Path, out_dir: Path) -> list[str]:
        return [self.binary, "-r", str(self.repo), "restore", snapshot_id, image.name]

    def delta_restore_cmd(self, snapshot_id: str, target: Path) -> list[str]:
        return [self.binary, "-r", str(self.repo), "restore", snapshot_id, str(target), "--delta", "--json"]


class Restic(Tool):
    name = "restic"

    def env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": "benchmark", "RESTIC_CACHE_DIR": str(self.home / "cache")}

    def version(self) -> str:
        return " ".join(run_checked(["restic", "version"]).split()[:2])

    def init_cmd(self) -> list[str]:
        return ["restic", "--repo", str(self.repo), "init"]

    def backup_cmd(self, image: Path, version: int) -> list[str]:
        return ["restic", "--repo", str(self.repo), "backup", "--json", "--host", "bench", image.name]

    def snapshot_id(self, stdout: str, version: int) -> str:
        for line in stdout.splitlines():
            if line.startswith("{") and '"summary"' in line:
                return str(json.loads(line)["snapshot_id"])
        raise ValueError("restic backup printed no summary")

    def restore_cmd(self, snapshot_id: str, image: Path, out_dir: Path) -> list[str]:
        return ["restic", "--repo", str(self.repo), "restore", snapshot_id, "--target", str(out_dir)]


class Borg(Tool):
    name = "borg"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BORG_BASE_DIR": str(self.home / "base"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def version(self) -> str:
        return run_checked(["borg", "--version"]).strip()

    def init_cmd(self) -> list[str]:
        return ["borg", "init", "--encryption=none", str(self.repo)]

    def backup_cmd(self, image: Path, version: int) -> list[str]:
        return ["borg", "create", "--compression", "zstd,3", f"{self.repo}::v{version}", image.name]

    def snapshot_id(self, stdout: str, version: int) -> str:
        return f"v{version}"

    def restore_cmd(self, snapshot_id: str, image: Path, out_dir: Path) -> list[str]:
        return ["borg", "extract", "--sparse", f"{self.repo}::{snapshot_id}"]


class Bup(Tool):
    """bup (git packfiles, rolling-hash chunks of about 8 KiB): the peer for stored bytes per new version.

    Each version is saved on its own branch (``v1``, ``v2``, ...), so any one restores by name; branches share
    every object, as one branch's history would."""

    name = "bup"

    def env(self) -> dict[str, str]:
        return {**os.environ, "BUP_DIR": str(self.repo)}

    def version(self) -> str:
        return "bup " + run_checked(["bup", "--version"], env=self.env()).strip()

    def init_cmd(self) -> list[str]:
        return ["bup", "init"]

    def backup_cmd(self, image: Path, version: int) -> list[str]:
        # bup saves what its index lists: index the one file, then save it (under its absolute path).
        return ["sh", "-c", 'bup index "$1" >/dev/null && bup save -q -n "$2" "$1"', "sh", image.name, f"v{version}"]

    def snapshot_id(self, stdout: str, version: int) -> str:
        return f"v{version}"

    def restore_cmd(self, snapshot_id: str, image: Path, out_dir: Path) -> list[str]:
        return ["bup", "restore", "-q", "--sparse", "-C", str(out_dir), f"/{snapshot_id}/latest{image.resolve()}"]


def source_fingerprint() -> str:
    """A short blake3 of the dedupimg package's .py files: tells apart working-tree states of one version."""
    spec = find_spec("dedupimg")
    if spec is None or not spec.submodule_search_locations:
        return "unknown"
    root = Path(list(spec.submodule_search_locations)[0])
    digest = blake3.blake3()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


TOOL_NAMES = ["dedupimg", "restic", "borg", "bup"]


def make_tool(name: str, home: Path, dedupimg_binary: Path) -> Tool:
    if name == "dedupimg":
        return Dedupimg(home, dedupimg_binary)
    return {"restic": Restic, "borg": Borg, "bup": Bup}[name](home)


def parse_json_output(stdout: str) -> dict[str, object]:
    """The JSON object a command printed (the whole output, or its last line that is one)."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        lines = [line for line in stdout.splitlines() if line.lstrip().startswith("{")]
        if not lines:
            raise ValueError(f"no JSON in output: {stdout[-200:]!r}") from None
        doc = json.loads(lines[-1])
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    return doc
