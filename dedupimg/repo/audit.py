"""The audit behind ``check``: prove the repository consistent, and optionally that its data is intact.

It compares the index with the packs row by row, so it lives in the repository layer (``Repository.audit``);
``ops/check.py`` is the operation users run.

Structure (always; reads the index and every pack's trailer, no data):

* every indexed pack file exists, has the recorded size, a sound footer and trailer whose hash is its name,
  trailer rows that tile the file, and the recorded blob count; ``pack_ids`` and ``meta`` agree with ``packs``;
* every ``blobs`` row points at a listed pack, at a blob that pack's trailer lists at that offset with the
  same type, codec and lengths; every trailer blob no row points at is counted as garbage, and the recorded
  garbage of a pack never exceeds its size;
* every snapshot record and stored segment hashes to its key and decodes; every segment a record lists is
  stored with the listed length and has a row; every chunk a stored segment lists has a row;
* reference counts are exact (segment: listings by live records; chunk: listings by stored segments; record
  rows 0; tombstones 1), and ``dead`` holds exactly the counted rows at 0 and the record rows not live;
* no live snapshot is named by a tombstone.

Data (``read_data``: a fraction of the packs, 1.0 = all): each chosen pack is read sequentially in large
runs; every blob's header must match its trailer row, every blob the index points at must decompress and
hash to its id, and segment and record blobs must equal their index copies.

Hints (not errors): orphan packs (durable but never committed: an interrupted snapshot), ``tmp/`` leftovers,
garbage a prune could reclaim. Findings name the snapshots they affect, worked out (only when something is
wrong) by walking records -> segments -> chunks. All index reads that are compared with each other come from
one read transaction, so a snapshot committing meanwhile (check holds only a SHARED lock) cannot cause a
false finding; under that lock, rows of packs already indexed never change place.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import blake3

from dedupimg.core.errors import IntegrityError, UsageError
from dedupimg.core.manifest import SnapshotRecord, decode_segment, decode_tombstone
from dedupimg.core.parallel import started_ahead, worker_count
from dedupimg.core.progress import NoProgress, Progress
from dedupimg.repo import integrity, pack
from dedupimg.repo.index import BlobLocation, PackRow
from dedupimg.store.base import ObjectMissing, StoreError

if TYPE_CHECKING:  # the repository calls in (Repository.audit)
    from dedupimg.repo.repository import Repository

TICK = 1024  # index entries per progress update
MAX_PER_KIND = 20  # findings listed one by one per kind; the rest are summed up in one more finding
WORKERS = worker_count()  # packs read and verified in parallel (zstd/blake3 drop the GIL)
TYPE_NAMES = {pack.CHUNK: "chunk", pack.SEGMENT: "segment", pack.SNAPSHOT: "snapshot record",
              pack.TOMBSTONE: "tombstone"}

Key = tuple[str, bytes | int]  # ("blob", id) or ("pack", pack number): what a finding is about


@dataclass(frozen=True)
class SnapshotRef:
    id: bytes
    name: str
    time: str

    @property
    def hex_id(self) -> str:
        return self.id.hex()

    @property
    def short_id(self) -> str:
        return self.id.hex()[:8]


@dataclass
class Finding:
    """Something wrong. ``kind`` is one of the names in docs/reliability.md; ``snapshots`` those affected."""

    kind: str
    message: str
    snapshots: list[SnapshotRef] = field(default_factory=list)
    keys: set[Key] = field(default_factory=set, repr=False, compare=False)


@dataclass(frozen=True)
class Hint:
    """Worth knowing, not wrong: orphan packs, tmp leftovers, garbage for prune."""

    kind: str
    message: str


@dataclass
class CheckCounts:
    snapshots: int = 0
    segments: int = 0
    chunks: int = 0
    blobs: int = 0
    packs: int = 0
    pack_bytes: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    orphan_packs: int = 0
    dead_rows: int = 0
    garbage_bytes: int = 0


@dataclass
class CheckReport:
    findings: list[Finding]
    hints: list[Hint]
    counts: CheckCounts
    read_data: float

    @property
    def ok(self) -> bool:
        return not self.findings


class _Findings:
    def __init__(self) -> None:
        self.items: list[Finding] = []
        self._per_kind: Counter[str] = Counter()
        self._overflow: dict[str, Finding] = {}

    def add(self, kind: str, message: str, *keys: Key, snapshots: list[SnapshotRef] | None = None) -> None:
        self._per_kind[kind] += 1
        if self._per_kind[kind] <= MAX_PER_KIND:
            self.items.append(Finding(kind, message, list(snapshots or []), set(keys)))
            return
        more = self._overflow.get(kind)
        if more is None:
            more = self._overflow[kind] = Finding(kind, "")
            self.items.append(more)
        more.keys.update(keys)
        more.snapshots.extend(snapshots or [])
        more.message = f"... and {self._per_kind[kind] - MAX_PER_KIND} more {kind} problems like the above"


def audit(repo: Repository, read_data: float = 0.0, progress: Progress | None = None,
          seed: bytes | None = None) -> CheckReport:
    """Check ``repo`` (open with at least a SHARED lock). ``read_data``: share of packs whose data is read
    (0 none, 1.0 all), chosen by a hash of ``seed`` and the pack id (default seed: the repository id and
    today's UTC date, so reruns on one day read the same packs and days rotate)."""
    if not 0.0 <= read_data <= 1.0:
        raise UsageError(f"the share of packs to read must be within 0..1, not {read_data}")
    return _Checker(repo, progress or NoProgress()).run(read_data, seed)


class _Checker:
    def __init__(self, repo: Repository, progress: Progress) -> None:
        self.repo = repo
        self.index = repo.index
        self.progress = progress
        self.findings = _Findings()
        self.hints: list[Hint] = []
        self.counts = CheckCounts()
        # From the scan (one read transaction):
        self.chunk_listings: Counter[bytes] = Counter()  # chunk id -> listings by stored segments
        self.segment_listings: Counter[bytes] = Counter()  # segment id -> listings by live records
        self.stored_segments: dict[bytes, int] = {}  # segment id -> length
        self.links: dict[bytes, bytes] = {}  # delta chunk id -> base chunk id (each counts as a base's reference)
        self.unlinked: dict[bytes, bytes] = {}  # links not yet matched with a delta row
        self.records: dict[bytes, SnapshotRef] = {}
        self.record_rows: set[bytes] = set()
        self.segment_rows: set[bytes] = set()
        self.meta_pack: dict[bytes, int] = {}  # segment/record id -> pack number of its row
        self.tombstones: list[bytes] = []
        self.unlisted: list[bytes] = []  # record rows neither live nor dead
        self.rows_per_pack: Counter[int] = Counter()
        self.packs: dict[int, PackRow] = {}
        self.done_items = 0

    # -- driver --------------------------------------------------------------------------------------------

    def run(self, read_data: float, seed: bytes | None) -> CheckReport:
        totals = self.index.entry_counts()
        self.progress.start("check index", totals["blobs"] + totals["segments"] + totals["snapshots"])
        packs, pack_ids, next_pack, garbage = self.index.scan(self._on_segment, self._on_snapshot, self._on_blob,
                                                              self._on_link)
        self.progress.advance(self.done_items % TICK)
        self.progress.finish()
        self.packs = {p.pack_no: p for p in packs}
        self._after_scan(pack_ids, next_pack, garbage)
        self._check_unlisted()
        self._check_tombstones()

        self.progress.start("check packs", len(packs))
        mismatched: dict[int, dict[bytes, int]] = {}
        for row in packs:
            self._check_pack(row, garbage.get(row.pack_no, 0), mismatched)
            self.progress.advance(1)
        self.progress.finish()
        if mismatched:
            self._stray_rows(mismatched)
        self._check_files(set(pack_ids))

        chosen = choose_packs(packs, read_data, seed or _default_seed(self.repo))
        if chosen:
            self._read_data(chosen)
        self._hint_garbage(garbage)
        self._name_snapshots()
        self.counts.snapshots = len(self.records)
        self.counts.segments = len(self.stored_segments)
        self.counts.packs = len(packs)
        self.counts.pack_bytes = sum(p.size for p in packs)
        return CheckReport(self.findings.items, self.hints, self.counts, read_data)

    def add(self, kind: str, message: str, *keys: Key, snapshots: list[SnapshotRef] | None = None) -> None:
        self.findings.add(kind, message, *keys, snapshots=snapshots)

    def _tick(self) -> None:
        self.done_items += 1
        if self.done_items % TICK == 0:
            self.progress.advance(TICK)

    # -- the index, in one read transaction -------------------------------------------------------------------

    def _on_segment(self, seg_id: bytes, raw: bytes) -> None:
        self._tick()
        key: Key = ("blob", seg_id)
        if blake3.blake3(raw).digest() != seg_id:
            self.add("segment-damaged", f"stored manifest segment {seg_id.hex()[:16]} does not match its id", key)
            return
        try:
            segment = decode_segment(raw)
        except IntegrityError as exc:
            self.add("segment-damaged", f"stored manifest segment {seg_id.hex()[:16]}: {exc}", key)
            return
        self.stored_segments[seg_id] = segment.size
        self.chunk_listings.update(segment.chunk_ids())

    def _on_snapshot(self, rec_id: bytes, raw: bytes) -> None:
        self._tick()
        key: Key = ("blob", rec_id)
        try:
            rec = SnapshotRecord.decode(raw)
        except IntegrityError as exc:
            self.records[rec_id] = SnapshotRef(rec_id, "?", "?")
            self.add("record-damaged", f"snapshot record {rec_id.hex()[:16]} in the index: {exc}", key)
            return
        self.records[rec_id] = SnapshotRef(rec_id, rec.name, rec.time)
        if rec.id != rec_id:
            self.add("record-damaged", f"snapshot record {rec_id.hex()[:16]} in the index does not match its id",
                     key)
            return
        for seg_id, length in rec.segments:
            self.segment_listings[seg_id] += 1
            stored = self.stored_segments.get(seg_id)
            if stored is None:
                self.add("segment-missing", f"snapshot {rec_id.hex()[:8]} lists manifest segment "
                         f"{seg_id.hex()[:16]}, which is not stored in the index", key, ("blob", seg_id))
            elif stored != length:
                self.add("segment-damaged", f"manifest segment {seg_id.hex()[:16]} is {stored} bytes long, snapshot "
                         f"{rec_id.hex()[:8]} lists it as {length}", key, ("blob", seg_id))

    def _on_link(self, delta: bytes, base: bytes) -> None:
        self.links[delta] = self.unlinked[delta] = base
        self.chunk_listings[base] += 1  # a base is referenced by each delta on it, as by a segment listing it

    def _on_blob(self, blob_id: bytes, loc: BlobLocation | None, dead: bool) -> None:
        self._tick()
        key: Key = ("blob", blob_id)
        short = blob_id.hex()[:16]
        if loc is None:
            self.add("dead", f"dead list names blob {short}, which has no index row", key)
            return
        self.counts.blobs += 1
        self.rows_per_pack[loc.pack_no] += 1
        kind = TYPE_NAMES.get(loc.type, f"type-{loc.type} blob")
        if loc.type == pack.CHUNK:
            self.counts.chunks += 1
            expected = self.chunk_listings.pop(blob_id, 0)
            base = self.unlinked.pop(blob_id, None)
            if (loc.codec == pack.DELTA) != (base is not None):
                self.add("index-mismatch", f"chunk {short} is stored as a delta but the index names no base for it"
                         if base is None else f"the index names a base for chunk {short}, which is not a delta", key)
        elif loc.type == pack.SEGMENT:
            self.segment_rows.add(blob_id)
            self.meta_pack[blob_id] = loc.pack_no
            expected = self.segment_listings.pop(blob_id, 0)
        elif loc.type == pack.SNAPSHOT:
            expected = 0
            if blob_id in self.records:
                self.record_rows.add(blob_id)
                self.meta_pack[blob_id] = loc.pack_no
        elif loc.type == pack.TOMBSTONE:
            expected = 1
            self.tombstones.append(blob_id)
        else:
            self.add("index-mismatch", f"index row of blob {short} has unknown type {loc.type}", key)
            return
        if loc.refcount != expected:
            self.add("refcount", f"reference count of {kind} {short} is {loc.refcount}, but it is referenced "
                     f"{expected} times", key)
        if loc.type in (pack.CHUNK, pack.SEGMENT):
            should_be_dead = loc.refcount == 0
        else:
            should_be_dead = loc.type == pack.SNAPSHOT and blob_id not in self.records
        if dead != should_be_dead:
            if loc.type == pack.SNAPSHOT and not dead:
                self.unlisted.append(blob_id)  # named after the scan, from its blob
            else:
                state = "in" if dead else "missing from"
                self.add("dead", f"{kind} {short} with reference count {loc.refcount} is {state} the dead list", key)
        if dead:
            self.counts.dead_rows += 1

    def _after_scan(self, pack_ids: dict[bytes, int], next_pack: int, garbage: dict[int, int]) -> None:
        for delta in self.unlinked:
            self.add("index-mismatch", f"the index names a base for chunk {delta.hex()[:16]}, which is not indexed",
                     ("blob", delta))
        for chunk_id, n in self.chunk_listings.items():
            self.add("chunk-missing", f"chunk {chunk_id.hex()[:16]}, listed {n} times by stored segments, is not "
                     "indexed", ("blob", chunk_id))
        self.chunk_listings.clear()
        # Segments listed by records but without a segment row: either not stored (reported with the record)
        # or stored without a row (reported here).
        self.segment_listings.clear()
        for seg_id in self.stored_segments.keys() - self.segment_rows:
            self.add("segment-missing", f"stored manifest segment {seg_id.hex()[:16]} has no segment row",
                     ("blob", seg_id))
        for rec_id in self.records.keys() - self.record_rows:
            self.add("record-damaged", f"snapshot record {rec_id.hex()[:16]} has no index row (its blob in a pack "
                     "is what 'repair index' rebuilds it from)", ("blob", rec_id))
        for pack_no, row in self.packs.items():
            if pack_ids.get(row.id) != pack_no:
                self.add("index-mismatch", f"pack_ids does not map pack {row.id.hex()[:16]} to number {pack_no}",
                         ("pack", pack_no))
            if pack_no >= next_pack:
                self.add("index-mismatch", f"pack number {pack_no} is not below next_pack {next_pack}",
                         ("pack", pack_no))
        for pid, pack_no in pack_ids.items():
            if pack_no not in self.packs:
                self.add("index-mismatch", f"pack_ids maps {pid.hex()[:16]} to number {pack_no}, which packs does "
                         "not list")
        for pack_no in self.rows_per_pack.keys() - self.packs.keys():
            self.add("index-mismatch", f"{self.rows_per_pack[pack_no]} index rows point at pack number {pack_no}, "
                     "which the index does not list", ("pack", pack_no))
        for pack_no in garbage.keys() - self.packs.keys():
            self.add("index-mismatch", f"garbage is recorded for pack number {pack_no}, which is not listed")

    def _check_unlisted(self) -> None:
        """Record rows neither live nor dead: what 'repair index' leaves when a snapshot's data is incomplete."""
        marked = set(self.repo.index.left_out()) if self.unlisted else set()
        for rec_id in self.unlisted:
            ref = SnapshotRef(rec_id, "?", "?")
            try:
                rec = SnapshotRecord.decode(self.repo.read_blobs([rec_id])[0])
                ref = SnapshotRef(rec_id, rec.name, rec.time)
            except IntegrityError:
                pass
            why = ("left out by 'repair index': its data is incomplete; prune keeps what it has until the missing "
                   "packs are recovered and repaired, or 'forget --left-out' removes it") if rec_id in marked else \
                "left out by 'repair index' because its data is incomplete?"
            self.add("record-unlisted", f"snapshot {rec_id.hex()[:8]} has its record indexed but is neither listed nor "
                     f"forgotten ({why})", snapshots=[ref])

    def _check_tombstones(self) -> None:
        """Tombstones live only in packs: read them (few and small) and make sure no live record is named."""
        if not self.tombstones:
            return
        try:
            raws = self.repo.read_blobs(self.tombstones)
        except IntegrityError as exc:
            self.add("blob-damaged", f"cannot read tombstones: {exc}", *(("blob", t) for t in self.tombstones))
            return
        for tomb_id, raw in zip(self.tombstones, raws, strict=True):
            try:
                forgotten = decode_tombstone(raw)
            except IntegrityError as exc:
                self.add("blob-damaged", f"tombstone {tomb_id.hex()[:16]}: {exc}", ("blob", tomb_id))
                continue
            for rec_id in forgotten:
                if rec_id in self.records:
                    self.add("forgotten-live", f"snapshot {rec_id.hex()[:8]} was forgotten (tombstone "
                             f"{tomb_id.hex()[:16]}) but is still listed", ("blob", rec_id))

    # -- packs ---------------------------------------------------------------------------------------------

    def _check_pack(self, row: PackRow, garbage: int, mismatched: dict[int, dict[bytes, int]]) -> None:
        store, stored_as = self.repo.store, pack.pack_name(row.id)
        key: Key = ("pack", row.pack_no)
        name = pack.pack_file_name(row.id)
        try:
            size = store.size(stored_as)
        except ObjectMissing:
            self.add("pack-missing", f"pack {name} is missing", key)
            return
        except StoreError as exc:
            self.add("pack-missing", f"pack {name} cannot be read: {exc.strerror}", key)
            return
        if size != row.size:
            self.add("pack-size", f"pack {name} is {size} bytes, the index says {row.size}", key)
        try:
            info = integrity.read_pack_info(store, stored_as, self.repo.blobs)
        except IntegrityError as exc:
            self.add("pack-damaged", str(exc).replace(store.location(stored_as), f"pack {name}"), key)
            return
        if info.id != row.id:
            self.add("pack-damaged", f"pack {name}: its trailer hash is {info.id.hex()[:16]}, not its name", key)
        for problem in integrity.layout_problems(info):
            self.add("pack-damaged", f"pack {name}: {problem}", key)
        if len(info.entries) != row.blob_count:
            self.add("index-mismatch", f"pack {name} holds {len(info.entries)} blobs, the index says "
                     f"{row.blob_count}", key)
        matched = unreferenced = 0
        locs = self.index.lookup_blobs([e.id for e in info.entries])
        for e, loc in zip(info.entries, locs, strict=True):
            if loc is None or loc.pack_no != row.pack_no or loc.offset != e.offset:
                unreferenced += pack.blob_span(e.stored_len)
                continue
            matched += 1
            if (loc.type, loc.codec, loc.stored_len, loc.raw_len) != (e.type, e.codec, e.stored_len, e.raw_len):
                self.add("index-mismatch", f"index row of blob {e.id.hex()[:16]} disagrees with the trailer of pack "
                         f"{name} (type, codec or lengths)", ("blob", e.id), key)
            elif e.codec == pack.DELTA and self.links.get(e.id) != e.base:
                self.add("index-mismatch", f"the index names another base for delta chunk {e.id.hex()[:16]} than "
                         f"the trailer of pack {name}", ("blob", e.id), key)
        if matched != self.rows_per_pack.get(row.pack_no, 0):
            mismatched[row.pack_no] = {e.id: e.offset for e in info.entries}
        if garbage > row.size:
            self.add("garbage", f"pack {name}: recorded garbage {garbage} bytes exceeds its size {row.size}", key)
        elif garbage != unreferenced:
            self.hints.append(Hint("garbage-accounting", f"pack {name}: {unreferenced} bytes of it no row points at, "
                                   f"{garbage} recorded as garbage"))

    def _stray_rows(self, mismatched: dict[int, dict[bytes, int]]) -> None:
        """Rows that point into a pack at a blob its trailer does not list there (the rare slow path)."""
        for blob_id, loc in self.index.iter_blob_rows():
            entries = mismatched.get(loc.pack_no)
            if entries is not None and entries.get(blob_id) != loc.offset:
                name = pack.pack_file_name(self.packs[loc.pack_no].id)
                self.add("index-mismatch", f"index row of blob {blob_id.hex()[:16]} points at offset {loc.offset} of "
                         f"pack {name}, where its trailer lists no such blob", ("blob", blob_id),
                         ("pack", loc.pack_no))

    def _check_files(self, indexed: set[bytes]) -> None:
        """Pack files the index does not list (orphans: hints, unless damaged), and tmp/ leftovers."""
        store = self.repo.store
        skipped: list[str] = []
        for obj in pack.list_packs(store, skipped):
            pid = integrity.pack_file_id(obj.name)
            path, file_name = store.location(obj.name), integrity.base_name(obj.name)
            if pid is None:
                self.hints.append(Hint("stray-file", f"{path} is not named like a pack"))
                continue
            if pid in indexed:
                continue
            try:
                info = integrity.read_pack_info(store, obj.name, self.repo.blobs)
            except IntegrityError as exc:
                problem = str(exc).removeprefix(f"{path}: ")
                self.add("pack-damaged", f"pack {file_name}, which the index does not list, is damaged: {problem}")
                continue
            self.counts.orphan_packs += 1
            records = len(self.repo.unknown_records([e.id for e in info.entries if e.type == pack.SNAPSHOT]))
            if records:  # what prune does with it: it stops (compaction._refuse_if_index_lost_snapshots)
                self.hints.append(Hint("orphan-pack", f"orphan pack {file_name} ({info.size} bytes) holds {records} "
                                       "snapshot record(s) the index does not know: prune deletes nothing until "
                                       "'dedupimg repair index' lists them"))
                continue
            self.hints.append(Hint("orphan-pack", f"orphan pack {file_name} ({info.size} bytes, not in the index: "
                                   "left by an interrupted snapshot or prune); prune removes it"))
        for name in skipped:  # one named like a listed pack is a problem found by _check_pack
            if integrity.pack_file_id(name) not in indexed:
                self.hints.append(Hint("stray-dir", f"{store.location(name)} is a directory, not a pack; prune leaves "
                                       "it alone"))
        for where, what in integrity.tmp_leftovers(store):
            self.hints.append(Hint("tmp-leftover", f"{where}: {what}; safe to delete"))

    # -- data ----------------------------------------------------------------------------------------------

    def _read_data(self, chosen: list[PackRow]) -> None:
        self.progress.start("read data", sum(r.size for r in chosen))
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="dedupimg-check") as pool:
            for row, job in started_ahead(chosen, functools.partial(self._start_pack, pool), 2 * WORKERS):
                if job is not None:
                    self._pack_data_done(row, job)
                self.counts.packs_read += 1
                self.progress.advance(row.size)
        self.progress.finish()

    def _start_pack(self, pool: ThreadPoolExecutor, row: PackRow) -> Future[integrity.PackData] | None:
        name = pack.pack_name(row.id)
        try:
            info = integrity.read_pack_info(self.repo.store, name, self.repo.blobs)
        except IntegrityError:
            return None  # reported by the structure check
        locs = self.index.lookup_blobs([e.id for e in info.entries])
        full = {e.offset for e, loc in zip(info.entries, locs, strict=True)
                if loc is not None and loc.pack_no == row.pack_no and loc.offset == e.offset}
        return pool.submit(integrity.verify_pack_data, self.repo.store, name, info, full, self.repo.blobs,
                           self.repo.delta_base_raws)

    def _pack_data_done(self, row: PackRow, job: Future[integrity.PackData]) -> None:
        data = job.result()
        self.counts.bytes_read += data.bytes_read
        name = pack.pack_file_name(row.id)
        key: Key = ("pack", row.pack_no)
        for entry, problem, indexed in data.errors:
            if entry is None:
                self.add("pack-damaged", f"pack {name}: {problem}", key)
            elif indexed:
                kind = TYPE_NAMES.get(entry.type, "blob")
                self.add("blob-damaged", f"pack {name}: {kind} {entry.id.hex()[:16]}: {problem}", ("blob", entry.id))
            else:  # a copy no row points at: nothing reads it, but the pack (the disk?) is damaged
                self.add("pack-damaged", f"pack {name}: unreferenced blob {entry.id.hex()[:16]}: {problem}")
        for entry, raw in data.meta:
            self._compare_meta(name, entry, raw)

    def _compare_meta(self, name: str, entry: pack.BlobEntry, raw: bytes) -> None:
        key: Key = ("blob", entry.id)
        short = entry.id.hex()[:16]
        try:
            if entry.type == pack.SEGMENT:
                decode_segment(raw)
                copy = self.index.get_segment(entry.id)
            elif entry.type == pack.SNAPSHOT:
                SnapshotRecord.decode(raw)
                copy = self.index.get_snapshot(entry.id)
            else:
                decode_tombstone(raw)
                copy = None
        except IntegrityError as exc:
            self.add("blob-damaged", f"pack {name}: {TYPE_NAMES[entry.type]} {short} hashes right but: {exc}", key)
            return
        if copy is not None and copy != raw:
            self.add("index-mismatch", f"the index copy of {TYPE_NAMES[entry.type]} {short} differs from its blob "
                     f"in pack {name}", key)

    # -- hints and names -----------------------------------------------------------------------------------

    def _hint_garbage(self, garbage: dict[int, int]) -> None:
        self.counts.garbage_bytes = sum(garbage.values())
        if self.counts.dead_rows or self.counts.garbage_bytes:
            self.hints.append(Hint("garbage", f"{self.counts.dead_rows} unreferenced index rows and "
                                   f"{self.counts.garbage_bytes} bytes of unreferenced pack space: prune reclaims "
                                   "them"))

    def _name_snapshots(self) -> None:
        """Only when something is wrong: which live snapshots use what each finding is about."""
        keyed = [f for f in self.findings.items if f.keys]
        if not keyed:
            return
        bad_blobs = {k[1] for f in keyed for k in f.keys if k[0] == "blob"}
        bad_packs = {k[1] for f in keyed for k in f.keys if k[0] == "pack"}
        seg_keys: dict[bytes, frozenset[Key]] = {}
        touched: dict[bytes, set[Key]] = {}
        refs = dict(self.records)
        for rec_id, raw in self.index.snapshots():
            keys: set[Key] = set()
            if rec_id in bad_blobs:
                keys.add(("blob", rec_id))
            if self.meta_pack.get(rec_id) in bad_packs:
                keys.add(("pack", self.meta_pack[rec_id]))
            try:
                rec = SnapshotRecord.decode(raw)
            except IntegrityError:
                touched[rec_id] = keys
                continue
            refs.setdefault(rec_id, SnapshotRef(rec_id, rec.name, rec.time))  # committed since the scan
            for seg_id, _ in rec.segments:
                if seg_id not in seg_keys:
                    seg_keys[seg_id] = self._segment_keys(seg_id, bad_blobs, bad_packs)
                keys |= seg_keys[seg_id]
            touched[rec_id] = keys
        for f in keyed:
            named = [refs.get(r, SnapshotRef(r, "?", "?")) for r, keys in touched.items() if keys & f.keys]
            f.snapshots = sorted(named, key=lambda s: (s.time, s.hex_id))

    def _segment_keys(self, seg_id: bytes, bad_blobs: set[bytes | int], bad_packs: set[bytes | int]) -> frozenset[Key]:
        keys: set[Key] = set()
        if seg_id in bad_blobs:
            keys.add(("blob", seg_id))
        if self.meta_pack.get(seg_id) in bad_packs:
            keys.add(("pack", self.meta_pack[seg_id]))
        raw = self.index.get_segment(seg_id)
        if raw is None:
            return frozenset(keys)
        try:
            chunk_ids = decode_segment(raw).chunk_ids()
        except IntegrityError:
            return frozenset(keys)
        keys.update(("blob", c) for c in chunk_ids if c in bad_blobs)
        if bad_packs:
            for loc in self.index.lookup_blobs(chunk_ids):
                if loc is not None and loc.pack_no in bad_packs:
                    keys.add(("pack", loc.pack_no))
        return frozenset(keys)


def choose_packs(packs: list[PackRow], fraction: float, seed: bytes) -> list[PackRow]:
    """ceil(fraction x packs) packs, chosen by blake3(seed + pack id): random-looking but reproducible."""
    if fraction <= 0 or not packs:
        return []
    if fraction >= 1:
        return sorted(packs, key=lambda p: p.pack_no)
    n = min(len(packs), math.ceil(round(len(packs) * fraction, 9)))
    ranked = sorted(packs, key=lambda p: blake3.blake3(seed + p.id).digest())
    return sorted(ranked[:n], key=lambda p: p.pack_no)  # read in pack order


def _default_seed(repo: Repository) -> bytes:
    return f"{repo.config.repo_id} {datetime.now(UTC).date().isoformat()}".encode()
