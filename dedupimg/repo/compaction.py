"""The pack-level half of prune: find what died, then delete and rewrite packs (part of the repository layer).

Planning starts from the index's ``dead`` rows (every chunk or segment whose count fell to 0, every forgotten
record), so its work follows what was forgotten, not the size of the repository:

1. dead segments still stored in ``segments`` are dropped, and each takes one reference from the chunks it
   lists; chunks that reach 0 die too (the cascade of docs/format.md §7.3);
2. the packs holding dead blobs (or bytes already counted as garbage) are the only packs looked at: a pack's
   trailer says what it holds, and a blob in it is live when the index points at exactly that copy and it is
   not dying now;
3. a pack with nothing live is deleted; a pack whose unused share is above ``max_unused`` is rewritten (its
   live blobs copied, as stored, into new packs after checking each against its id); other packs stay, and
   their dropped blobs become counted garbage.

Two kinds of rows are not what they seem, and ``repair index`` marks both (``meta``, docs/format.md §7):

* what a snapshot that repair left out (its data incomplete) still has is at reference count 0, like garbage,
  but it is kept until that snapshot is forgotten: the missing pack may yet be recovered from a copy, and a
  repair would then list the snapshot again. Whether other snapshots are listed makes no difference;
* a salvaged pack (its trailer cut or damaged: repair registered the blobs a forward scan verified) is always
  rewritten, or deleted when nothing in it lives, whatever ``max_unused`` says: its rows are the only account
  of what it holds, and no later command should have to read it without a trailer.

Execution keeps every instant safe (docs/format.md §8.5): new packs are written, fsynced and renamed; then one
index transaction drops the dead rows, moves the copied rows to the new packs and unlists the old packs; only
then are the old pack files deleted. A kill before the transaction leaves unlisted new packs, a kill after
it unlisted old packs: the next prune deletes either as orphans. Both steps need the exclusive lock, which
``prune`` holds, so no snapshot can add references between plan and execution.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dedupimg.core.config import DEFAULT_MAX_UNUSED
from dedupimg.core.errors import IntegrityError, UsageError
from dedupimg.core.manifest import SnapshotRecord, decode_segment
from dedupimg.repo import integrity, pack
from dedupimg.repo.index import BlobLocation, NewSegment, PackRow, SealedPack
from dedupimg.repo.integrity import DELTA_BATCH
from dedupimg.store.base import TEMP_PREFIX, TEMP_SUFFIX, NotAnObject, ObjectMissing

if TYPE_CHECKING:  # the repository calls in (Repository.plan_prune); only its type is needed here
    from dedupimg.repo.repository import Repository



@dataclass(frozen=True)
class PackWork:
    row: PackRow
    name: str  # in the store: packs/xx/<id>.pack
    unused_bytes: int
    live: list[pack.BlobEntry] = field(default_factory=list)  # blobs to copy when the pack is rewritten


@dataclass
class PrunePlan:
    max_unused: float
    delete: list[PackWork] = field(default_factory=list)
    repack: list[PackWork] = field(default_factory=list)
    keep: list[PackWork] = field(default_factory=list)  # affected packs that stay, with their new garbage
    garbage: dict[int, int] = field(default_factory=dict)  # pack number -> dead bytes added by this prune
    salvaged: list[str] = field(default_factory=list)  # store names of salvaged packs, rewritten or deleted
    held: int = 0  # rows kept at count 0 for snapshots a repair left out, until they are forgotten
    chunks_kept_for_left_out: bool = False  # every chunk at count 0 kept: a left-out snapshot lacks something
    dropped_segments: list[NewSegment] = field(default_factory=list)
    dropped_blobs: list[bytes] = field(default_factory=list)
    dropped_by_type: Counter[int] = field(default_factory=Counter)
    orphan_packs: list[str] = field(default_factory=list)  # store names
    tmp_files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # where directories named like packs or temp files are:
    # reported, left alone
    orphan_bytes: int = 0
    tmp_bytes: int = 0

    @property
    def repack_bytes(self) -> int:
        """Bytes of live blobs that the rewrite copies."""
        return sum(pack.blob_span(e.stored_len) for w in self.repack for e in w.live)

    @property
    def freed_estimate(self) -> int:
        """Bytes the prune gives back: deleted packs, rewritten packs less what is copied, leftovers."""
        return (sum(w.row.size for w in self.delete) + sum(w.row.size for w in self.repack) - self.repack_bytes
                + self.orphan_bytes + self.tmp_bytes)

    @property
    def empty(self) -> bool:
        return not (self.delete or self.repack or self.garbage or self.dropped_blobs or self.dropped_segments
                    or self.orphan_packs or self.tmp_files)


@dataclass(frozen=True)
class PruneOutcome:
    packs_deleted: int
    packs_rewritten: int
    packs_written: int
    bytes_freed: int  # on disk, measured: bytes of files removed minus bytes of packs written
    bytes_written: int


def plan(repo: Repository, max_unused: float = DEFAULT_MAX_UNUSED) -> PrunePlan:
    if not 0.0 <= max_unused <= 1.0:
        raise UsageError(f"max_unused is a fraction from 0 to 1, not {max_unused}")
    result = PrunePlan(max_unused)
    dead = {i: loc for i, loc in repo.index.dead_rows()}
    held, lacking = _held_by_left_out(repo)
    _cascade(repo, dead, result, held)
    if lacking:
        # A left-out snapshot lacks a segment (nothing says which chunks it lists) or a chunk (a delta's base is
        # named only by its lost row): any chunk at count 0 may be one it needs once the lost pack is put back.
        # So no chunk is freed until the user decides ('forget --left-out', or the pack recovered and a repair).
        kept = [i for i, loc in dead.items() if loc is not None and loc.type == pack.CHUNK]
        for i in kept:
            del dead[i]
        held.update(kept)
        result.chunks_kept_for_left_out = True
    result.held = len(held)
    for i, loc in dead.items():
        result.dropped_blobs.append(i)
        if loc is not None:
            result.dropped_by_type[loc.type] += 1
    _plan_packs(repo, dead, result)
    _find_leftovers(repo, result, lacking)
    return result


def _held_by_left_out(repo: Repository) -> tuple[set[bytes], set[bytes]]:
    """Every indexed blob a left-out snapshot still has: its record, its segments and the chunks they list
    (a segment repair could not store, some of its chunks being gone, is read from its pack). A delta chunk's
    base needs nothing here: the delta's link counts as a reference of it while the delta's row stays.
    Second: what such a snapshot lacks, as far as the index can tell (segments without a row, the chunks
    without a row that its segments list): a pack the index does not list that holds one of these is a lost
    pack put back, which a repair would use to list the snapshot again."""
    ids = repo.index.left_out()
    records = [i for i, known in zip(ids, repo.index.has_blobs(ids), strict=True) if known]
    if not records:
        return set(), set()
    held = set(records)
    seg_ids = sorted({sid for raw in repo.read_blobs(records) for sid, _ in SnapshotRecord.decode(raw).segments})
    known_segs = repo.index.has_blobs(seg_ids)
    lacking = {i for i, known in zip(seg_ids, known_segs, strict=True) if not known}
    seg_ids = [i for i, known in zip(seg_ids, known_segs, strict=True) if known]
    held.update(seg_ids)
    copies = [repo.index.get_segment(i) for i in seg_ids]
    unstored = [i for i, raw in zip(seg_ids, copies, strict=True) if raw is None]
    raws = [raw for raw in copies if raw is not None] + repo.read_blobs(unstored)
    chunk_ids = sorted({c for raw in raws for c in decode_segment(raw).chunk_ids()})
    for i, known in zip(chunk_ids, repo.index.has_blobs(chunk_ids), strict=True):
        (held if known else lacking).add(i)
    return held, lacking


def _cascade(repo: Repository, dead: dict[bytes, BlobLocation | None], result: PrunePlan,
             held: set[bytes] | None = None) -> None:
    """Drop dead segments that are still stored; chunks whose last reference they held die with them, and then
    bases whose last reference was a dying delta chunk (deltas are one deep: no further step). ``held`` rows
    never die here (a left-out snapshot's): neither before the cascade nor through it."""
    lost: Counter[bytes] = Counter()
    held = held or set()
    for i in held:
        dead.pop(i, None)
    _lose_segments(repo, dead, result, lost)
    for i in held:  # a chunk only an unstored (incomplete) segment of a left-out snapshot lists
        dead.pop(i, None)
    _lose_bases(repo, dead, lost)
    for i in held:  # such a chunk whose last counted reference was the link of a dying delta: a base it holds
        dead.pop(i, None)


def _lose_segments(repo: Repository, dead: dict[bytes, BlobLocation | None], result: PrunePlan,
                   lost: Counter[bytes]) -> None:
    dead_segments = [i for i, loc in dead.items() if loc is not None and loc.type == pack.SEGMENT]
    for seg_id, stored in zip(dead_segments, repo.index.has_segments(dead_segments), strict=True):
        if not stored:
            continue
        raw = repo.index.get_segment(seg_id)
        assert raw is not None
        chunk_ids = decode_segment(raw).chunk_ids()
        result.dropped_segments.append(NewSegment(seg_id, b"", chunk_ids))
        lost.update(chunk_ids)
    if not lost:
        return
    ids = list(lost)
    dying = []
    for i, count in zip(ids, repo.index.refcounts(ids), strict=True):
        if count is None:
            raise IntegrityError(f"a dead segment lists chunk {i.hex()[:16]}, which is not indexed; run check")
        if count < lost[i]:
            raise IntegrityError(f"chunk {i.hex()[:16]} has fewer references than segments list it; run check")
        if count == lost[i]:
            dying.append(i)
    for i, loc in zip(dying, repo.index.lookup_blobs(dying), strict=True):
        dead[i] = loc


def _lose_bases(repo: Repository, dead: dict[bytes, BlobLocation | None], lost: Counter[bytes]) -> None:
    """Each dying delta chunk takes its reference from its base (Index.apply_prune drops the link): a base
    whose every reference goes in this prune dies too. ``lost``: the references dead segments take."""
    deltas = [i for i, loc in dead.items() if loc is not None and loc.type == pack.CHUNK and loc.codec == pack.DELTA]
    if not deltas:
        return
    by_base = Counter(b for b in repo.delta_bases(deltas) if b is not None)
    ids = [b for b in by_base if b not in dead]
    dying = [i for i, count in zip(ids, repo.index.refcounts(ids), strict=True)
             if count is not None and count == by_base[i] + lost[i]]
    for i, loc in zip(dying, repo.index.lookup_blobs(dying), strict=True):
        dead[i] = loc


def _plan_packs(repo: Repository, dead: dict[bytes, BlobLocation | None], result: PrunePlan) -> None:
    dead_bytes: defaultdict[int, int] = defaultdict(int)
    for loc in dead.values():
        if loc is not None:
            dead_bytes[loc.pack_no] += pack.blob_span(loc.stored_len)
    garbage = repo.index.garbage_bytes()
    salvaged = set(repo.index.pack_numbers(repo.index.salvaged_packs()).values())
    salvaged_rows = repo.index.pack_rows_in(salvaged) if salvaged else {}
    affected = sorted(set(dead_bytes) | {p for p, n in garbage.items() if n} | salvaged)
    rows = repo.index.pack_rows_of(affected)
    for pack_no in affected:
        row = rows.get(pack_no)
        if row is None:
            raise IntegrityError(f"dead blobs name pack number {pack_no}, which the index does not list; run check")
        name = pack.pack_name(row.id)
        if pack_no in salvaged:  # no usable trailer: what it holds is what its rows say
            result.salvaged.append(name)
            entries = sorted((pack.BlobEntry(loc.type, loc.codec, loc.offset, loc.raw_len, loc.stored_len, i)
                              for i, loc in salvaged_rows[pack_no]), key=lambda e: e.offset)
        else:
            with repo.store.open(name) as reader:
                entries = pack.read_trailer(reader, repo.blobs)
        ids = [e.id for e in entries]
        live = [
            e for e, loc in zip(entries, repo.index.lookup_blobs(ids), strict=True)
            if e.id not in dead and loc is not None and loc.pack_no == pack_no and loc.offset == e.offset
        ]
        live_bytes = sum(pack.blob_span(e.stored_len) for e in live)
        work = PackWork(row, name, row.size - live_bytes, live)
        if not live:
            result.delete.append(work)
        elif pack_no in salvaged or work.unused_bytes > result.max_unused * row.size:
            result.repack.append(work)
        else:
            result.keep.append(work)
            if dead_bytes.get(pack_no):
                result.garbage[pack_no] = dead_bytes[pack_no]


def _find_leftovers(repo: Repository, result: PrunePlan, lacking: set[bytes] | None = None) -> None:
    """Pack files the index does not list (a crash between rename and commit, or an interrupted prune) and
    temporary files: garbage, since no writer can be running while prune holds the exclusive lock."""
    store = repo.store
    skipped: list[str] = []
    found = pack.list_packs(store, skipped)  # directories: reported, never removed
    result.skipped += [store.location(d) for d in skipped]
    ids = {}
    for obj in found:
        try:
            ids[bytes.fromhex(obj.name.rsplit("/", 1)[-1].removesuffix(".pack"))] = obj
        except ValueError:
            continue  # not a name dedupimg writes: leave it alone
    listed = repo.index.pack_numbers(list(ids))
    orphans = [obj.name for pid, obj in ids.items() if pid not in listed]
    # A salvaged pack a prune rewrote, then was killed before deleting: its intact blobs are in the new packs,
    # and its damaged trailer would otherwise make the check below refuse (docs/format.md §8.5).
    rewritten = set(repo.index.salvaged_packs())
    _refuse_if_index_lost_snapshots(repo, [n for n in orphans if integrity.pack_file_id(n) not in rewritten],
                                    bool(ids), lacking or set())
    sizes = {obj.name: obj.size for obj in found}
    for name in orphans:
        result.orphan_packs.append(name)
        result.orphan_bytes += sizes[name]
    temp = store.list(TEMP_PREFIX)
    result.skipped += [store.location(d) for d in temp.dirs if d.endswith(TEMP_SUFFIX)]
    for obj in temp.objects:
        if obj.name.endswith(TEMP_SUFFIX):
            result.tmp_files.append(obj.name)
            result.tmp_bytes += obj.size


def _refuse_if_index_lost_snapshots(repo: Repository, orphans: list[str], any_packs: bool,
                                    lacking: set[bytes] | None = None) -> None:
    """Raise IntegrityError (nothing deleted) when the index looks like it lost snapshots (issue 11 §1b).

    An index that was damaged or replaced by an empty one takes every pack for an orphan; deleting them would
    destroy every snapshot, and ``repair index`` could not bring them back. So before any orphan is deleted:
    every snapshot record in an orphan pack must be known to the index (listed, a forgotten row, or named
    by a tombstone: a crash can leave a prune's old pack, which holds such records, as an orphan); and an
    index that lists no snapshot must account for every record row it has. A crash between a snapshot's
    last rename and its commit leaves an orphan with an unknown record too: then ``repair index`` lists that
    snapshot (all its data is there), after which prune runs again.
    """
    unknown: list[tuple[str, bytes]] = []
    for name in orphans:
        try:
            with repo.store.open(name) as reader:
                entries = pack.read_trailer(reader, repo.blobs)
        except (NotAnObject, ObjectMissing):
            continue  # a FIFO or socket named like a pack holds no data: it goes like any orphan
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}; an unreadable pack the index does not list may hold snapshots, so prune "
                                 "deletes nothing: run 'dedupimg repair index' (or move the file away)") from None
        unknown += [(name, i) for i in repo.unknown_records([e.id for e in entries if e.type == pack.SNAPSHOT])]
        if lacking and any(e.id in lacking for e in entries):
            raise IntegrityError(
                f"pack {name.rsplit('/', 1)[-1]} is not in the index but holds data that a snapshot left out by "
                "'repair index' lacks (a lost pack put back?), so prune deletes nothing: run 'dedupimg repair "
                "index' first")
    if unknown:
        name, rec_id = unknown[0]
        raise IntegrityError(
            f"pack {name.rsplit('/', 1)[-1]} is not in the index but holds snapshot record {rec_id.hex()[:8]} "
            f"({len(unknown)} such record(s) in all): the index is missing snapshots, so prune deletes nothing; "
            "run 'dedupimg repair index' first")
    if any_packs and not repo.index.snapshots() and repo.index.has_unforgotten_records():
        raise IntegrityError("the index lists no snapshot, yet holds snapshot records that were never forgotten: "
                             "it is damaged, so prune deletes nothing; run 'dedupimg repair index' first")


def execute(repo: Repository, todo: PrunePlan, on_bytes: Callable[[int], None] | None = None) -> PruneOutcome:
    """Carry out ``todo`` (made by :func:`plan` under the same exclusive lock)."""
    advance = on_bytes or (lambda n: None)
    new_packs, written = _rewrite(repo, todo.repack, advance)
    # A rewrite names its pack by content, so it can land on the very file of an orphan (the same rewrite,
    # made durable by a run that was killed before its index commit) or of a pack being dropped: that file
    # now holds the new pack and must stay.
    kept = {pack.pack_name(sealed.id) for sealed in new_packs}
    repo.index.apply_prune(
        new_packs,
        todo.dropped_segments,
        todo.dropped_blobs,
        [w.row.pack_no for w in todo.delete + todo.repack if w.name not in kept],
        todo.garbage,
    )
    repo.check_lock()  # nothing is deleted under a lock that was lost meanwhile
    # A remote repository's index objects stop naming the packs first, so no host's cache can take them up
    # again; then they are deleted, and each directory fsynced once (the store does both).
    # Orphans too: a prune killed after its index transaction leaves the packs it dropped listed by the index
    # objects of the store (other hosts' caches still use them) but not by this cache.
    orphan_ids = [pid for pid in map(integrity.pack_file_id, (n for n in todo.orphan_packs if n not in kept))
                  if pid is not None]
    repo.unlist_packs([w.row.id for w in todo.delete + todo.repack if w.name not in kept] + orphan_ids)
    gone = [n for n in [w.name for w in todo.delete + todo.repack] + todo.orphan_packs + todo.tmp_files
            if n not in kept]
    freed = repo.store.delete(gone)
    if repo.index.salvaged_packs():
        repo.index.drop_salvaged_marks()  # only now that the files of those rewritten are gone
    return PruneOutcome(len(todo.delete), len(todo.repack), len(new_packs), freed - written, written)


def _rewrite(
    repo: Repository, work: list[PackWork], advance: Callable[[int], None]
) -> tuple[list[SealedPack], int]:
    """Copy the live blobs of ``work`` into new durable packs, checking each against its id on the way.

    Every new pack commits in the one transaction of ``apply_prune``, so where its boundaries fall does not
    matter: a record and its segments move together or not at all."""
    out: list[SealedPack] = []
    written = 0
    writer: pack.PackWriter | None = None

    def finish() -> None:
        nonlocal writer, written
        if writer is None:
            return
        sealed = repo.seal(writer)
        writer = None
        out.append(sealed)
        written += sealed.size

    try:
        for w in work:
            where = repo.store.location(w.name)
            data = repo.store.read(w.name, where=where)  # the whole pack
            view = memoryview(data)
            for i, e in enumerate(w.live):
                if i % DELTA_BATCH == 0:  # the bases of the next deltas (all of a pack's could take 100s of MB)
                    deltas = [d.id for d in w.live[i : i + DELTA_BATCH] if d.codec == pack.DELTA]
                    links = dict(zip(deltas, repo.delta_bases(deltas), strict=True))
                    bases = repo.delta_base_raws(deltas) if deltas else None
                # Checked whole (IntegrityError on damage), then stored again as it was compressed (a sealed
                # blob under a fresh nonce).
                _type, codec, raw_len, stored = repo.blobs.open_blob(view, e.offset, e.type, e.id, e.stored_len,
                                                                      where, e.offset)
                pack.decode_checked(repo.blobs, e.type, codec, raw_len, stored, e.id, where, e.offset, bases)
                if writer is None:
                    writer = repo.new_pack()
                writer.add(e.type, e.id, codec, bytes(stored), raw_len, links.get(e.id) or b"")
                if writer.size >= repo.config.pack_size:
                    finish()
            advance(w.row.size)
        finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return out, written

