"""Which snapshots a command works on: references (ids, prefixes, latest, NAME@latest) and filters (name,
host, tags), as ``snapshots``, ``stats``, ``forget`` and ``tag`` take them."""

from __future__ import annotations

from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.retention import SnapshotFilter
from dedupimg.repo.repository import Repository


def fields_of(rec: SnapshotRecord) -> tuple[str, str, list[str]]:
    return rec.name, rec.host, rec.tags


def select_snapshots(repo: Repository, refs: list[str] | None = None,
                     where: SnapshotFilter | None = None) -> list[SnapshotRecord]:
    """The snapshots ``refs`` name (each must resolve; none given: every snapshot) that match ``where``,
    oldest first, each once."""
    where = where or SnapshotFilter()
    if refs:
        chosen = {repo.resolve(ref).id for ref in refs}
        records = [r for r in repo.snapshots() if r.id in chosen]
    else:
        records = repo.snapshots()
    return where.select(records, fields_of)
