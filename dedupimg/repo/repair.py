"""``repair index``: rebuild the whole LMDB index from the pack files alone.

Packs are self-describing (docs/format.md §4): their trailers list every blob, segments and snapshot records
are blobs too, and ``forget`` writes a tombstone blob naming the records it dropped. So the index
(locations, segments, records, reference counts, the dead list, garbage) can be derived again:

1. every pack's trailer is read and checked and the pack registered with all its blobs (``commit_pack``, one
   transaction per pack); a damaged pack is reported, never fatal, and registered with the blobs a forward
   scan finds intact (salvaged, :func:`_salvage`);
2. every segment, snapshot record and tombstone blob is read and verified; a segment all of whose chunks are
   indexed is stored (which counts its chunk references), one transaction per pack;
3. every record that no tombstone names and whose segments are all stored is listed (which counts its
   segment references); records that name a missing or incomplete segment are reported, left out and
   marked so (prune keeps what they still have until they are forgotten); tombstoned records' rows go to the
   dead list.

The new index is built in ``tmp/index-rebuild-<pid>/`` and swapped in crash-safely (see :func:`_swap_in`).
The repair never opens the old index, which may be missing or damaged. Memory: one pack's trailer and
metadata blobs at a time, plus the set of segment ids and the list of records.
"""

from __future__ import annotations

import os
import shutil
import time as _time
from dataclasses import dataclass, field
from pathlib import Path

from dedupimg.core.errors import IntegrityError
from dedupimg.core.fsutil import DIR_MODE, fsync_dir
from dedupimg.core.manifest import SnapshotRecord, decode_segment, decode_tombstone
from dedupimg.core.progress import NoProgress, Progress
from dedupimg.repo import indexobjects, integrity, keys, pack
from dedupimg.repo.index import DATA_FILE, DeferredLinks, Index, NewSegment, NewSnapshot, SealedPack
from dedupimg.repo.repository import INDEX, TMP, Repository, cache_home
from dedupimg.store import Store, location_spec
from dedupimg.store.base import NotAnObject, StoreError
from dedupimg.store.local import unusable_tmp
from dedupimg.store.lock import LockMode


@dataclass(frozen=True)
class LeftOut:
    """A snapshot record found in a pack but not listed: its data is incomplete."""

    id: bytes
    name: str
    time: str
    reason: str


@dataclass(frozen=True)
class Salvaged:
    """A damaged pack (trailer cut or damaged) whose intact blobs a forward scan found and verified."""

    name: str  # file name
    blobs: int  # registered
    deltas: int  # DELTA chunks passed over: their base is named only by the lost trailer
    damaged: int  # blobs that did not verify
    bytes_lost: int  # bytes of the pack not in a registered blob (the cut blob, the trailer, the passed over)


@dataclass
class RepairReport:
    packs: int = 0  # packs registered
    damaged_packs: list[tuple[str, str]] = field(default_factory=list)  # (file name, why damaged)
    salvaged: list[Salvaged] = field(default_factory=list)  # damaged packs registered with their intact blobs
    skipped: list[str] = field(default_factory=list)  # where directories named like packs are: left alone
    damaged_blobs: list[str] = field(default_factory=list)  # metadata blobs that could not be read
    segments: int = 0
    snapshots: int = 0  # records listed again
    forgotten: int = 0  # records a tombstone names, left out
    left_out: list[LeftOut] = field(default_factory=list)
    leftovers_removed: list[str] = field(default_factory=list)  # tmp/ dirs of earlier interrupted repairs
    seconds: float = 0.0


def repair_index(location: Path | str, lock_wait: float = 0.0, progress: Progress | None = None) -> RepairReport:
    """Rebuild the index of the repository at ``location`` from its packs under an EXCLUSIVE lock; returns what
    was found. Local: ``path/index``. Remote: this host's cache, and the store's index objects are replaced
    by one listing every pack registered."""
    started = _time.monotonic()
    spec = location_spec(str(location))
    progress = progress or NoProgress()
    # A missing or non-repository path fails before any lock file is made; an encrypted one needs its password.
    config, unlocked, store = Repository.read_config_and_keys(location)
    fmt = pack.PLAIN if unlocked is None else keys.blob_format(config, unlocked.master)
    path = Path(spec["root"]) if spec["kind"] == "local" else Path()
    try:
        with store.lock(LockMode.EXCLUSIVE, lock_wait, "repair index"):
            if spec["kind"] != "local":
                path = cache_home(None, config.repo_id)
                os.makedirs(path / TMP, DIR_MODE, exist_ok=True)
            report = _repair_under_lock(path, store, progress, fmt, remote=spec["kind"] != "local")
    finally:
        store.close()
    report.seconds = _time.monotonic() - started
    return report


def _repair_under_lock(path: Path, store: Store, progress: Progress, fmt: pack.BlobFormat, remote: bool
                       ) -> RepairReport:
    report = RepairReport()
    tmp = path / TMP
    # Under the exclusive lock no other repair runs: any rebuild or old index in tmp/ is a leftover.
    try:
        names = os.listdir(tmp)
    except (FileNotFoundError, NotADirectoryError):
        raise unusable_tmp(path) from None
    for name in sorted(names):
        if name.startswith((integrity.REBUILD_PREFIX, integrity.OLD_PREFIX)):
            _remove(tmp / name)
            report.leftovers_removed.append(name)
    work = tmp / f"{integrity.REBUILD_PREFIX}{os.getpid()}"
    os.mkdir(work, DIR_MODE)
    try:
        index = Index(work, create=True)
        try:
            try:
                listings = _rebuild(store, index, report, progress, fmt, collect=remote)
            except StoreError as exc:
                # A pack that cannot be read (an I/O error, a server that does not answer) may be intact:
                # skipping it as damaged would leave out its snapshots, and prune would then delete the rest
                # of them. Stop before anything is replaced.
                raise StoreError(exc.where, f"{exc.reason}; repair index stopped and changed nothing (run it "
                                 "again once this reads, or move the pack out of the repository to rebuild "
                                 "without it)", exc.strerror) from None
            old: set[str] = set()
            if remote:
                # One index object lists every pack registered; it is durable before the old ones go, so
                # other hosts always find each live pack listed (their caches rebuild: the old names vanish).
                old = indexobjects.names(store)
                name = indexobjects.publish(store, listings, fmt)
                index.replace_objects([], {name: [sealed.id for sealed, _ in listings]})
                old.discard(name)
        finally:
            index.close()
        store.delete(sorted(old))
        _swap_in(path, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone after a successful swap
    return report


Listing = tuple[SealedPack, dict[bytes, tuple[int, bytes]]]


def _rebuild(store: Store, index: Index, report: RepairReport, progress: Progress, fmt: pack.BlobFormat,
             collect: bool = False) -> list[Listing]:
    """Fill ``index`` from the packs of ``store``; returns each registered pack, with its metadata blobs when
    ``collect`` (a remote repository's new index object needs them: then all of them are held in memory)."""
    skipped: list[str] = []
    names = [obj.name for obj in pack.list_packs(store, skipped)]
    report.skipped = [store.location(d) for d in skipped]
    metadata: list[tuple[str, list[pack.BlobEntry]]] = []
    listings: dict[str, Listing] = {}
    progress.start("repair index: read pack trailers", len(names))
    links = DeferredLinks()  # delta chunks: linked to their bases once every pack is registered
    for name in names:
        sealed, entries = _register(index, store, name, report, fmt, links)
        if sealed is not None:
            listings[name] = (sealed, {})
        if entries:
            metadata.append((name, entries))
        progress.advance(1)
    progress.finish()
    for delta in index.link_deltas(links):
        report.damaged_blobs.append(f"chunk {delta.hex()[:16]} is stored as a delta on a chunk that no readable "
                                    "pack holds")

    segments: set[bytes] = set()  # stored: every chunk they list is indexed
    incomplete: set[bytes] = set()  # read, but listing a chunk that is not indexed
    records: dict[bytes, tuple[SnapshotRecord, bytes]] = {}
    forgotten: set[bytes] = set()
    done: set[bytes] = set()
    read: dict[bytes, bytes] = {}  # (collect) metadata read so far: a second copy's listing needs it too
    progress.start("repair index: read manifests", len(metadata))
    for name, entries in metadata:
        new_segments: list[NewSegment] = []
        if collect:
            listings[name][1].update((e.id, (pack.RAW, read[e.id])) for e in entries if e.id in read)
        for entry, raw in integrity.read_blobs(store, name, [e for e in entries if e.id not in done], fmt):
            if isinstance(raw, str):
                report.damaged_blobs.append(raw)
                continue  # another copy, in another pack, may still read
            done.add(entry.id)
            if collect:
                listings[name][1][entry.id] = (pack.RAW, raw)
                read[entry.id] = raw
            try:
                if entry.type == pack.SEGMENT:
                    chunk_ids = decode_segment(raw).chunk_ids()
                    if all(index.has_blobs(chunk_ids)):
                        new_segments.append(NewSegment(entry.id, raw, chunk_ids))
                        segments.add(entry.id)
                    else:
                        incomplete.add(entry.id)
                elif entry.type == pack.SNAPSHOT:
                    records[entry.id] = (SnapshotRecord.decode(raw), raw)
                else:
                    forgotten.update(decode_tombstone(raw))
            except IntegrityError as exc:
                report.damaged_blobs.append(f"{integrity.base_name(name)}: blob {entry.id.hex()[:16]}: {exc}")
        if new_segments:
            index.add_references(new_segments, [])
        progress.advance(1)
    progress.finish()
    report.segments = len(segments)

    live: list[NewSnapshot] = []
    for rec_id, (rec, raw) in sorted(records.items(), key=lambda kv: (kv[1][0].datetime, kv[0])):
        if rec_id in forgotten:
            report.forgotten += 1
            continue
        missing = [sid for sid, _ in rec.segments if sid not in segments]
        if missing:
            why = "lists a manifest segment that is " + (
                "missing chunks" if any(s in incomplete for s in missing) else "not in any readable pack")
            report.left_out.append(LeftOut(rec_id, rec.name, rec.time, why))
            continue
        live.append(NewSnapshot(rec_id, raw, [sid for sid, _ in rec.segments]))
    index.add_references([], live)
    index.note_left_out(r.id for r in report.left_out)  # prune keeps what they have until they are forgotten
    report.snapshots = len(live)
    index.note_forgotten(forgotten)
    dead = sorted(forgotten)
    index.mark_dead([i for i, known in zip(dead, index.has_blobs(dead), strict=True) if known])
    return list(listings.values())


def _register(index: Index, store: Store, name: str, report: RepairReport, fmt: pack.BlobFormat,
              links: DeferredLinks) -> tuple[SealedPack | None, list[pack.BlobEntry]]:
    """Register one pack with all its blobs; returns it and its metadata entries (None, [] when skipped)."""
    file_name = integrity.base_name(name)
    try:
        info = integrity.read_pack_info(store, name, fmt)
    except IntegrityError as exc:
        if isinstance(exc, StoreError) and not isinstance(exc, NotAnObject):
            raise  # unreadable is not damaged: what it holds is unknown (see _repair_under_lock)
        report.damaged_packs.append((file_name, str(exc).replace(f"{store.location(name)}: ", "")))
        if isinstance(exc, NotAnObject):
            return None, []  # a FIFO, a directory: no bytes to salvage
        return _salvage(index, store, name, report, fmt)
    problems = integrity.layout_problems(info)
    if info.id != integrity.pack_file_id(name):
        problems.insert(0, "its trailer hash does not match its name")
    if problems:
        report.damaged_packs.append((file_name, "; ".join(problems)))
        return _salvage(index, store, name, report, fmt)
    sealed = SealedPack.from_entries(info.id, info.size, info.entries)
    index.commit_pack(sealed, [], links=links)
    report.packs += 1
    return sealed, [e for e in info.entries if e.type in integrity.META_TYPES]


def _salvage(index: Index, store: Store, name: str, report: RepairReport, fmt: pack.BlobFormat
             ) -> tuple[SealedPack | None, list[pack.BlobEntry]]:
    """Register the intact blobs of a damaged pack, found by a forward scan (as restic's ``repair packs``
    salvages, but in place: repair writes and deletes no pack). The pack keeps its name and is marked
    salvaged, so that prune copies those blobs into a new pack through the one commit routine and deletes
    it. Delta chunks are never registered: the base each was compressed against is named only in the
    trailer row, which is gone, and a delta linked to a guessed base would be a wrong registration.

    A pack named unlike a pack (no id to register it under) or not starting with the pack magic (not this
    repository's kind of pack) is left as it is, an unlisted damaged file that prune refuses to delete."""
    pack_id = integrity.pack_file_id(name)
    if pack_id is None:
        return None, []
    found = integrity.salvage_pack(store, name, fmt)
    if found is None:
        return None, []
    size = store.size(name)
    sealed = SealedPack.from_entries(pack_id, size, found.entries)
    index.commit_pack(sealed, [])  # no DELTA rows: nothing to link
    index.note_salvaged([pack_id])
    kept = sum(pack.blob_span(e.stored_len) for e in found.entries)
    report.salvaged.append(Salvaged(integrity.base_name(name), len(found.entries), found.deltas, found.damaged,
                                    size - len(fmt.pack_magic) - kept))
    report.packs += 1
    return sealed, [e for e in found.entries if e.type in integrity.META_TYPES]


def _swap_in(path: Path, work: Path) -> None:
    """Replace ``path/index`` with the finished ``work`` index so that a crash at any step is harmless.

    1. fsync the new environment's files and directory;
    2. rename ``index/`` (if any) to ``tmp/index-old-<pid>``;
    3. rename ``work`` to ``index/``;
    4. fsync ``tmp/`` and the repository directory;
    5. delete the old index.

    A crash before 2 leaves the old index in place plus a partial or complete rebuild in ``tmp/``; between 2
    and 3 (or before 4 made both renames durable) ``index/`` may be missing, which every command reports as
    "run 'dedupimg repair index'" (Index refuses a missing data.mdb; it never creates an empty index), never
    as an empty repository; after 3 the new index is in place and only ``tmp/index-old-*`` is left. Each
    repair first deletes such leftovers (it holds the exclusive lock, so none is in use), so re-running it
    always works.
    """
    for name in (DATA_FILE, "lock.mdb"):
        f = work / name
        if f.exists():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(work)
    index_dir = path / INDEX
    old = path / TMP / f"{integrity.OLD_PREFIX}{os.getpid()}"
    moved = index_dir.exists() or index_dir.is_symlink()
    if moved:
        os.rename(index_dir, old)
    try:
        os.rename(work, index_dir)
    except BaseException:
        if moved:
            os.rename(old, index_dir)  # put the old one back rather than leave none
        raise
    fsync_dir(path / TMP)
    fsync_dir(path)
    if moved:
        _remove(old)
        fsync_dir(path / TMP)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)
