"""What one benchmark run measured: a dataclass per operation, grouped per tool and per series."""

from __future__ import annotations

from dataclasses import dataclass, field

from measure import Measurement
from series import Series


@dataclass
class BackupRun:
    """One backup of one image version, and the repository's size after it."""

    version: int
    snapshot_id: str | None
    measurement: Measurement
    repo_bytes: int  # sum of st_size of the repository's files
    repo_allocated: int  # sum of their allocated blocks

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "snapshot_id": self.snapshot_id, "repo_bytes": self.repo_bytes,
                "repo_allocated": self.repo_allocated, **self.measurement.to_json()}


@dataclass
class RestoreRun:
    """A full restore of one version into an empty directory, checked against the source image's blake3."""

    version: int
    measurement: Measurement | None  # None: not attempted (its backup failed)
    bit_exact: bool
    note: str = ""

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"version": self.version, "bit_exact": self.bit_exact, "note": self.note}
        if self.measurement:
            doc.update(self.measurement.to_json())
        return doc


@dataclass
class DeltaRun:
    """dedupimg's delta restore of the last version onto a copy of the previous one."""

    available: bool  # False: the --delta option is missing (n/a), not a failure
    measurement: Measurement | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
    bit_exact: bool = False
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.available and not self.bit_exact

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"available": self.available, "bytes_read": self.bytes_read,
                                  "bytes_written": self.bytes_written, "bit_exact": self.bit_exact,
                                  "note": self.note}
        if self.measurement:
            doc.update(self.measurement.to_json())
        return doc


@dataclass
class ToolRun:
    """Everything one tool did on one series."""

    tool: str
    backups: list[BackupRun] = field(default_factory=list)
    restores: list[RestoreRun] = field(default_factory=list)
    delta: DeltaRun | None = None

    def backup(self, version: int) -> BackupRun | None:
        return next((b for b in self.backups if b.version == version), None)

    def restore(self, version: int) -> RestoreRun | None:
        return next((r for r in self.restores if r.version == version), None)

    def failures(self) -> list[str]:
        out = [f"backup v{b.version}: {b.measurement.error_line()}" for b in self.backups if not b.measurement.ok]
        out += [f"restore v{r.version}: {r.note or 'not bit-exact'}" for r in self.restores if not r.bit_exact]
        if self.delta and self.delta.failed:
            out.append(f"delta restore: {self.delta.note or 'not bit-exact'}")
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "backups": [b.to_json() for b in self.backups],
            "restores": [r.to_json() for r in self.restores],
            "delta_restore": self.delta.to_json() if self.delta else None,
        }


@dataclass
class SeriesResult:
    series: Series
    runs: dict[str, ToolRun]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.series.name,
            "description": self.series.description,
            "versions": [v.to_json() for v in self.series.versions],
            "tools": {name: run.to_json() for name, run in self.runs.items()},
        }
