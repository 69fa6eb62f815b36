"""Tag: change the tags of snapshots. A record's id is the hash of its bytes, so a new record (same image,
time and statistics, new tags) replaces the old one: Repository.replace_records writes the new records and a
tombstone of the old ones in one pack, then swaps them in one index transaction (crash-safe: the old or the
new record is listed, never neither or both).

The new record remembers the first record's id (``stats["original"]``, as restic's ``original``) and counts
its replacements (``stats["retagged"]``), so that removing a tag just added never makes a record identical
to the one it replaced, which a tombstone names forever.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dedupimg.core.errors import UsageError
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.ops.selection import select_snapshots
from dedupimg.repo.repository import Repository


@dataclass(frozen=True)
class TagChange:
    old: SnapshotRecord
    new: SnapshotRecord | None  # None: its tags were already as asked (nothing written)


def new_tags(tags: list[str], add: list[str], remove: list[str], set_to: list[str] | None) -> list[str]:
    """The tags after ``--set`` (replace all), then ``--remove`` and ``--add``; order kept, each once."""
    out = list(dict.fromkeys(set_to if set_to is not None else tags))
    out = [t for t in out if t not in remove]
    out += [t for t in dict.fromkeys(add) if t not in out]
    return out


def retag(rec: SnapshotRecord, tags: list[str]) -> SnapshotRecord:
    """A record like ``rec`` with ``tags``: a new id, however often the tags go back and forth."""
    stats = dict(rec.stats)
    stats["original"] = str(rec.stats.get("original", rec.hex_id))
    stats["retagged"] = int(rec.stats.get("retagged", 0)) + 1
    new = replace(rec, tags=list(tags), stats=stats, id=b"")
    new.encode()  # sets the id
    return new


def tag_snapshots(repo: Repository, records: list[SnapshotRecord], add: list[str], remove: list[str],
                  set_to: list[str] | None = None, dry_run: bool = False) -> list[TagChange]:
    """Give each of ``records`` its new tags (the caller holds the exclusive lock); returns what changed."""
    if set_to is None and not add and not remove:
        raise UsageError("nothing to do: give --add, --remove or --set")
    if set_to is not None and (add or remove):
        raise UsageError("--set replaces every tag: give it alone, not with --add or --remove")
    if not records:
        raise UsageError("no snapshot selected")
    changes = []
    for rec in records:
        tags = new_tags(rec.tags, add, remove, set_to)
        changes.append(TagChange(rec, None if tags == rec.tags else retag(rec, tags)))
    if not dry_run:
        repo.replace_records([(c.old, c.new) for c in changes if c.new is not None])
    return changes


def tag_refs(repo: Repository, refs: list[str], add: list[str], remove: list[str], set_to: list[str] | None = None,
             dry_run: bool = False) -> list[TagChange]:
    """``dedupimg tag``: the snapshots ``refs`` name (every reference must resolve), retagged."""
    return tag_snapshots(repo, select_snapshots(repo, refs), add, remove, set_to, dry_run)
