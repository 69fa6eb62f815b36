"""A stateful property test of a remote repository shared by two or three hosts: snapshots (one at a time,
two at once, interrupted, failing), forget, prune (whole or killed midway), repair, switching hosts, losing a
host's cache, restore, check.

The repository lives in an in-memory object store (config object, packs, one index object per commit); each
"host" keeps the LMDB index as a cache directory of its own, brought up to date by ``Repository.sync`` when it
starts a command (as ``Repository.open`` does once it holds the lock). One process plays every host, so the
store's lock is not taken: the rules only interleave hosts as the lock allows (snapshots of two hosts at once,
both holding it SHARED; prune, forget and repair alone). The test is about what the index objects carry from
host to host: a prune on one host rewrites the index objects that list the packs it deletes, a repair replaces
them all, and every other host must then rebuild its cache from the objects alone and still find every
snapshot, every chunk, and no pack that is gone. Two faults are injected in the store: a process killed
before its n-th write during a prune, and a failed PUT of the index object that lists a snapshot's record.

A plain model (snapshot id -> the image bytes, name, tags and time it was taken with) is the oracle, as in
tests/ops/test_state_machine.py, whose ideas this machine follows (test modules do not import each other).
After every step, on the current host after a sync: the listed snapshots are the model's; check finds nothing
and no pack's garbage count is off; every blob a model snapshot needs is indexed in a pack the store holds;
every index object in the store lists only packs the store holds; the cache holds exactly the store's index
objects and lists exactly the packs they list. At the end every host restores every snapshot, and forgetting
everything and pruning leaves tombstones only.

Packs are mostly of the smallest size the config allows (4 KiB, one to four 1 KiB-average chunks), so that
almost every commit is an index object of its own and pack boundaries fall everywhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings, stateful
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dedupimg.core.config import ChunkerParams, Config, SegmentParams
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.progress import NoProgress
from dedupimg.core.retention import Policy, parse_duration
from dedupimg.ops.check import check
from dedupimg.ops.forget import execute, plan_ids, plan_policy
from dedupimg.ops.prune import PruneReport, prune
from dedupimg.ops.restore import restore, verify
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo import indexobjects, pack, repository
from dedupimg.repo.repair import _repair_under_lock
from dedupimg.repo.repository import INDEX, TMP, Repository, cache_home, read_remote_config
from dedupimg.store.base import TEMP_PREFIX, ObjectMissing, StoreError
from dedupimg.store.memory import MemoryStore, MemoryWriter
from tests.helpers import det_bytes, text_bytes, write_image

SMALLEST_PACK = 4096  # one to four 1 KiB-average chunks
SEGMENT_PARAMS = SegmentParams(cut_mask=0x0F, max_extents=32, zero_cut=64 << 10)  # segments of ~16 extents
SHM = "/dev/shm"
RECENT = 8  # how many earlier images copies and edits draw from
IMAGE_NAMES = ("disk", "db", "vm-" + "n" * 250)  # the long one makes records of a few hundred bytes
MAX_HOSTS = 3

# Images are made of pieces: random or text runs from a few seeds, zero runs, a block repeated, a run copied
# from a recent image. Sizes are mostly small, now and then up to 1 MiB: every 4 KiB pack is an index object
# here, which every other host fetches and applies (zero runs cost no packs: up to 3 MiB).
few_kb = st.integers(0, 6000)
run_len = st.one_of(few_kb, st.integers(0, 100_000), st.integers(20_000, 300_000), st.integers(0, 1 << 20))
seed = st.integers(0, 3)
piece = st.one_of(
    st.tuples(st.sampled_from(["random", "text"]), seed, run_len),
    st.tuples(st.just("zeros"), st.one_of(few_kb, st.integers(0, 3 << 20))),
    st.tuples(st.just("repeat"), seed, st.sampled_from([1, 100, 1024, 4096, 5000]), st.integers(1, 64)),
    st.tuples(st.just("copy"), st.integers(0, RECENT - 1), st.integers(0, 1 << 20), run_len),
)
pieces = st.lists(piece, min_size=1, max_size=5)
# A change to an image: (kind, where, how many bytes, seed of what goes in).
change = st.tuples(st.sampled_from(["overwrite", "insert", "delete", "zeros"]), st.integers(0, 1 << 20),
                   st.integers(1, 20_000), st.integers(0, 99))
changes = st.lists(change, min_size=1, max_size=4)
# Tags: short shared ones (retention keeps by "gold") and long hex ones: two make a record as large as a pack.
tags = st.lists(st.one_of(st.sampled_from(["gold", "nightly"]), st.tuples(st.integers(0, 99), st.integers(1, 6000))),
                max_size=3)
names = st.sampled_from(IMAGE_NAMES)
host = st.integers(0, MAX_HOSTS - 1)  # taken modulo the hosts of the run

CHANGES: dict[str, Callable[[bytes, int, int, int], bytes]] = {
    "overwrite": lambda img, at, n, s: img[:at] + det_bytes(500 + s, n) + img[at + n :],
    "insert": lambda img, at, n, s: img[:at] + text_bytes(500 + s, n) + img[at:],
    "delete": lambda img, at, n, s: img[:at] + img[at + n :],
    "zeros": lambda img, at, n, s: img[:at] + bytes(n) + img[at + n :],
}


def changed(image: bytes, edits: list[tuple[str, int, int, int]]) -> bytes:
    for kind, at, n, s in edits:
        image = CHANGES[kind](image, at % (len(image) + 1), n, s)
    return image


def tag_text(t: str | tuple[int, int]) -> str:
    return t if isinstance(t, str) else det_bytes(1000 + t[0], t[1] // 2 + 1).hex()[: t[1]]


def pack_id_of(name: str) -> bytes:
    return bytes.fromhex(name.rsplit("/", 1)[-1].removesuffix(".pack"))


def leftover_work(report: PruneReport) -> dict[str, int]:
    """What a (dry-run) prune still finds to do, by kind; empty right after a prune."""
    kinds = ("packs_to_delete", "packs_to_rewrite", "chunks_dropped", "segments_dropped", "records_dropped",
             "orphan_packs", "tmp_files")
    return {k: getattr(report, k) for k in kinds if getattr(report, k)}


@dataclass(frozen=True)
class Taken:
    """What the model knows of a snapshot: the image, and the name, tags and time it was taken with."""

    data: bytes
    name: str
    tags: list[str]
    time: datetime


class OnceAfter(NoProgress):
    """A progress sink that acts once the snapshot has read more than ``n`` bytes (between two of its batches,
    on the thread that runs it): ``interrupt`` as Ctrl-C would, or what another host does meanwhile."""

    def __init__(self, n: int, act: Callable[[], None]) -> None:
        self.left = n
        self.act: Callable[[], None] | None = act

    def advance(self, n: int) -> None:
        self.left -= n
        if self.left < 0 and self.act is not None:
            act, self.act = self.act, None
            act()


class Interrupted(Exception):
    """What Ctrl-C raises in the middle of a snapshot (here from its progress sink)."""


def interrupt() -> None:
    raise Interrupted


class Killed(BaseException):
    """The process died (kill -9): raised by every write to the store from then on, caught by nothing."""


class FaultyStore(MemoryStore):
    """The in-memory store with two faults to inject: a process that dies before its ``kill_before``-th next
    write (a commit or a delete: from then on no write happens, and temporary objects stay, as a kill leaves
    them), and the PUT of the next index object that lists a snapshot record failing (``fail_record_put``)
    while the process goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.kill_before: int | None = None
        self.dead = False
        self.fail_record_put = False
        self.lose_put_answer = False  # the next index object's PUT lands, but the writer gets an error

    def disarm(self) -> None:
        self.kill_before, self.dead, self.fail_record_put, self.lose_put_answer = None, False, False, False

    def _write(self) -> None:
        if self.dead:
            raise Killed
        if self.kill_before is not None:
            if self.kill_before == 0:
                self.dead = True
                raise Killed
            self.kill_before -= 1

    def _commit(self, writer: MemoryWriter, name: str) -> None:
        self._write()
        if name.startswith(indexobjects.PREFIX) and self.lose_put_answer:
            self.lose_put_answer = False
            super()._commit(writer, name)
            raise StoreError(self.location(name), "S3 request failed: operation timed out (injected)")
        if name.startswith(indexobjects.PREFIX) and self.fail_record_put:
            listings = indexobjects.decode(b"".join(writer.parts), name, name)
            if any(b.type == pack.SNAPSHOT for ls in listings for b in ls.sealed.blobs):
                self.fail_record_put = False
                self._drop(writer)
                raise StoreError(self.location(name), "PUT failed: 503 Slow Down (injected)")
        super()._commit(writer, name)

    def _drop(self, writer: MemoryWriter) -> None:
        if not self.dead:  # a killed process aborts nothing: its temporary objects stay
            super()._drop(writer)

    def delete(self, names: Iterable[str]) -> int:
        names = list(names)
        if names:
            self._write()
        return super().delete(names)


class RemoteRepositoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Caches on tmpfs when there is one: LMDB syncs every commit, and durability is not what this is about.
        # The same directory for every example of this process: a record holds its source's path, and with it
        # the names of the packs and index objects, and so the order in which a cache rebuild meets the copies
        # of a chunk stored twice. With a new name each time, hypothesis could not replay what it found.
        self.tmp = Path(SHM if os.path.isdir(SHM) else tempfile.gettempdir()) / f"dedupimg-smr-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.store = FaultyStore()
        self.config: Config  # made by the initialize rule
        self.hosts = 0
        self.current = 0
        self.repo: Repository | None = None  # the current host's, open
        self.model: dict[bytes, Taken] = {}
        self.recent: list[tuple[bytes, int]] = []  # recent images, each with the host that took it
        self.clock = datetime(2020, 1, 1, 12, tzinfo=UTC)  # in the past: retention measures from the newest
        self.steps = 0
        self.healthy = True  # False from the start of a step until its invariant passed
        self.object_packs: dict[str, list[bytes]] = {}  # index object -> the packs it lists (names are hashes)
        # Hosts whose prune was killed after its index transaction, until they finish a prune (or rebuild their
        # cache): their caches may lack packs that index objects still list (and the store still holds).
        self.behind_objects: set[int] = set()

    @initialize(pack_size=st.sampled_from([SMALLEST_PACK, SMALLEST_PACK, 32 << 10]), hosts=st.integers(2, MAX_HOSTS))
    def create(self, pack_size: int, hosts: int) -> None:
        """Mostly the smallest packs; now and then packs of a few dozen chunks, so that prune finds packs
        partly dead (to rewrite, or to keep with counted garbage) more often."""
        self.healthy = False
        config = replace(Config(chunker=ChunkerParams.for_average(1024)), pack_size=pack_size,
                         segments=SEGMENT_PARAMS)
        Repository._init_remote(self.store, config, self.cache_dir(0)).close()
        self.config = read_remote_config(self.store)  # as every host reads it, checked
        assert self.config == config
        self.hosts = hosts
        self.open_host(0)

    # -- hosts ---------------------------------------------------------------------------------------------

    def cache_dir(self, h: int) -> Path:
        return self.tmp / f"host{h}"

    def open_repo(self, h: int) -> Repository:
        """Host ``h`` starts a command: its cache (made afresh when missing or damaged) synced with the store."""
        repo = Repository(cache_home(self.cache_dir(h), self.config.repo_id), self.config, self.store,
                          owns_store=False, remote=True)
        try:
            left_out = repo.sync().left_out
            assert not left_out, f"host {h}: sync left out records {[i.hex()[:8] for i in left_out]}"
        except BaseException:
            repo.close()
            raise
        return repo


    def open_host(self, h: int) -> None:
        assert self.repo is None
        self.repo, self.current = self.open_repo(h), h

    def close_host(self) -> None:
        if self.repo is not None:
            self.repo.close()
            self.repo = None

    def use(self, h: int) -> Repository:
        """The next command runs on host ``h % hosts``: the command before it (on this host or another) is
        over, and this one opens the repository and syncs its cache, as every command does. (A repository is
        not synced while open: each command syncs once, when it opens; tests/repo/test_cache_rebuild.py has
        a reader open across another process's rebuild.)"""
        self.close_host()
        self.open_host(h % self.hosts)
        return self.r

    def other_host(self, h: int, than: int | None = None) -> int:
        """One of the hosts but ``than`` (the current one)."""
        return ((self.current if than is None else than) + 1 + h % (self.hosts - 1)) % self.hosts

    @property
    def r(self) -> Repository:
        assert self.repo is not None
        return self.repo

    # -- images and the model ----------------------------------------------------------------------------------

    def image(self, spec: list[tuple]) -> bytes:
        makers: dict[str, Callable[..., bytes]] = {
            "random": det_bytes,
            "text": text_bytes,
            "zeros": bytes,
            "repeat": lambda s, unit, times: det_bytes(100 + s, unit) * times,
            "copy": self.copy_of_recent,
        }
        return b"".join(makers[kind](*args) for kind, *args in spec)

    def copy_of_recent(self, which: int, start: int, n: int) -> bytes:
        """A run of a recent image: its chunks are shared where the cuts fall in step again."""
        if not self.recent:
            return b""
        src = self.recent[which % len(self.recent)][0]
        start %= len(src) + 1
        return src[start : start + n]

    def source(self, data: bytes, holes: bool = False, file: str = "source.img") -> str:
        """The image as a file to snapshot; with ``holes``, its aligned all-zero blocks are holes."""
        path = self.tmp / file
        path.unlink(missing_ok=True)
        write_image(path, data, holes)
        return str(path)

    def tick(self, hours: int) -> datetime:
        self.clock += timedelta(hours=hours)
        return self.clock

    def taken(self, rec: SnapshotRecord, expected: Taken, on_host: int) -> None:
        assert rec.size == len(expected.data) and rec.id not in self.model
        self.model[rec.id] = expected
        self.recent = [*self.recent[1 - RECENT :], (expected.data, on_host)]

    def by_time(self) -> list[bytes]:
        """The model's snapshot ids, oldest first (as the repository lists them)."""
        return [i for *_, i in sorted((t.time, i.hex(), i) for i, t in self.model.items())]

    def verify_all(self) -> None:
        """Every snapshot of the model reads back whole on the current host (chunks and image hash checked)."""
        for id_ in self.model:
            verify(self.r, id_.hex())

    def restores_exactly(self, id_: bytes, stale: bytes | None = None) -> None:
        """Restore to a new file, or over a ``stale`` copy with delta; it must hold the model's bytes."""
        out = self.tmp / f"restored-{id_.hex()[:8]}.img"
        try:
            if stale is None:
                restore(self.r, id_.hex(), str(out))
            else:
                out.write_bytes(stale)
                restore(self.r, id_.hex(), str(out), force=True, delta=True)
            assert out.read_bytes() == self.model[id_].data, \
                f"host {self.current}: snapshot {id_.hex()[:8]} restored wrong bytes"
        finally:
            out.unlink(missing_ok=True)

    def store_packs(self) -> set[bytes]:
        return {pack_id_of(o.name) for o in pack.list_packs(self.store)}

    def index_objects(self) -> dict[str, list[bytes]]:
        """Every index object in the store with the packs it lists (each fetched once: its name is its hash)."""
        present = indexobjects.names(self.store)
        for name, listings in indexobjects.fetch(self.store, present - self.object_packs.keys()).items():
            self.object_packs[name] = [ls.sealed.id for ls in listings]
        self.object_packs = {n: ids for n, ids in self.object_packs.items() if n in present}
        return self.object_packs

    # -- rules: snapshots ----------------------------------------------------------------------------------------

    @rule(h=host, spec=pieces, name=names, tag_specs=tags, hours=st.integers(1, 400), holes=st.booleans())
    def snapshot(self, h: int, spec: list[tuple], name: str, tag_specs: list, hours: int, holes: bool) -> None:
        self.healthy = False
        self.use(h)
        self.take(self.image(spec), name, tag_specs, hours, holes)

    @precondition(lambda self: self.recent)
    @rule(h=host, base=st.integers(0, RECENT - 1), edits=changes, name=names, tag_specs=tags,
          hours=st.integers(1, 48), holes=st.booleans())
    def snapshot_edited(self, h: int, base: int, edits: list[tuple], name: str, tag_specs: list, hours: int,
                        holes: bool) -> None:
        """The nightly pattern: a recent image with a few changes. Most chunks are shared, so forgetting one
        version kills chunks scattered among live ones (packs partly dead, for prune to rewrite)."""
        self.healthy = False
        self.use(h)
        self.take(changed(self.recent[base % len(self.recent)][0], edits), name, tag_specs, hours, holes)

    @precondition(lambda self: self.recent)
    @rule(h=host, base=st.integers(0, RECENT - 1), edits=changes, name=names, hours=st.integers(1, 48))
    def snapshot_edited_elsewhere(self, h: int, base: int, edits: list[tuple], name: str, hours: int) -> None:
        """The next version of an image on another host than the one that took the earlier one: the chunks it
        shares are known to this host only through the index objects (its cache may have been rebuilt since)."""
        self.healthy = False
        data, taken_on = self.recent[base % len(self.recent)]
        self.use(self.other_host(h, than=taken_on))
        self.take(changed(data, edits), name, [], hours, False)

    def take(self, data: bytes, name: str, tag_specs: list, hours: int, holes: bool) -> None:
        expected = Taken(data, name, sorted({tag_text(t) for t in tag_specs}), self.tick(hours))
        rec = take_snapshot(self.r, self.source(data, holes), name=name, tags=[tag_text(t) for t in tag_specs],
                            when=expected.time).record
        self.taken(rec, expected, self.current)

    @rule(h=host, spec=pieces, name=names, after=st.integers(0, 1 << 20))
    def interrupted_snapshot(self, h: int, spec: list[tuple], name: str, after: int) -> None:
        """A snapshot stopped midway (Ctrl-C) leaves no snapshot; the packs it published are garbage for prune
        (packs still uploading when it stopped are published too: the hosts' next syncs take them up)."""
        self.healthy = False
        self.use(h)
        expected = Taken(self.image(spec), name, [], self.tick(1))
        try:
            rec = take_snapshot(self.r, self.source(expected.data), name=name, when=expected.time,
                                progress=OnceAfter(after, interrupt)).record
        except Interrupted:
            return
        self.taken(rec, expected, self.current)  # the image was no longer than ``after``

    @rule(h=host, other=host, spec=pieces, edits=st.lists(change, max_size=3), pair=st.tuples(names, names),
          hours=st.integers(1, 48), b_starts_at=st.one_of(st.none(), st.integers(0, 1 << 20)),
          b_at_once=st.booleans())
    def snapshots_at_once(self, h: int, other: int, spec: list[tuple], edits: list[tuple], pair: tuple[str, str],
                          hours: int, b_starts_at: int | None, b_at_once: bool) -> None:
        """Two hosts snapshot images that share most chunks at once (both hold the SHARED lock), interleaved
        deterministically: host B's command starts (opens, syncs, checks) before host A's snapshot, or once A
        has read ``b_starts_at`` bytes (A has published some packs but not its record); B's snapshot runs right
        then (``b_at_once``) or after A's commit, from B's cache as it synced. Neither sees the other's packs
        before its next sync, so shared chunks are stored twice, and each host's cache takes its own copy for
        the live one."""
        self.healthy = False
        self.use(h)
        a, b = self.current, self.other_host(other)
        data = self.image(spec)
        exp_a = Taken(data, pair[0], [], self.tick(hours))
        exp_b = Taken(changed(data, edits), pair[1], [], self.tick(1))
        b_repo: list[Repository] = []
        records: list[SnapshotRecord] = []

        def b_snapshots() -> None:
            records.append(take_snapshot(b_repo[0], self.source(exp_b.data, file="b.img"), name=exp_b.name,
                                         when=exp_b.time).record)

        def b_starts() -> None:
            b_repo.append(self.open_repo(b))
            report = check(b_repo[0])
            assert report.ok, f"host {b} while host {a} snapshots: " + "; ".join(f.message for f in report.findings)
            if b_at_once:
                b_snapshots()

        try:
            if b_starts_at is None:
                b_starts()
            sink = NoProgress() if b_starts_at is None else OnceAfter(b_starts_at, b_starts)
            records.insert(0, take_snapshot(self.r, self.source(exp_a.data, file="a.img"), name=exp_a.name,
                                            when=exp_a.time, progress=sink).record)
            if not b_repo:  # A's image was no longer than b_starts_at: B starts after A's commit
                b_starts()
            if not b_at_once:
                b_snapshots()
        finally:
            for repo in b_repo:
                repo.close()
        for rec, expected, on_host in zip(records, (exp_a, exp_b), (a, b), strict=True):
            self.taken(rec, expected, on_host)

    @rule(h=host, spec=pieces, name=names)
    def failed_put(self, h: int, spec: list[tuple], name: str) -> None:
        """The PUT of a snapshot's last index object (the one listing its record) fails, and the process goes
        on: the snapshot fails and is not listed, and it leaves nothing that stops a prune (its uploaded pack
        holds a record no index object lists: prune would refuse until 'repair index', which would then list
        the snapshot that failed). Only this PUT: which of the packs uploading at once an earlier failure hits
        depends on the threads, and so would what the runs after it find."""
        self.healthy = False
        self.use(h)
        self.store.fail_record_put = True
        try:
            take_snapshot(self.r, self.source(self.image(spec)), name=name, when=self.tick(1))
        except StoreError:
            pass
        else:
            raise AssertionError("the PUT of the index object listing the record did not fail")
        finally:
            self.store.disarm()

    @rule(h=host, spec=pieces, name=names)
    def put_answer_lost(self, h: int, spec: list[tuple], name: str) -> None:
        """An index object's PUT lands but its answer is lost (a timeout). Other hosts may already have read it
        and deduplicated against its pack, so nothing is deleted (a review found the pack was): the write
        happened, and the snapshot is taken as if the answer had come."""
        self.healthy = False
        self.use(h)
        self.store.lose_put_answer = True
        try:
            self.take(self.image(spec), name, [], 1, False)
            assert not self.store.lose_put_answer, "no index object was written"
        finally:
            self.store.disarm()

    # -- rules: forget, prune, repair --------------------------------------------------------------------------

    @precondition(lambda self: self.model)
    @rule(h=host, picks=st.lists(st.integers(0, 1 << 16), min_size=1, max_size=4), newest_of_name=st.booleans())
    def forget_ids(self, h: int, picks: list[int], newest_of_name: bool) -> None:
        self.healthy = False
        self.use(h)
        ids = self.by_time()
        gone = {ids[p % len(ids)] for p in picks}
        refs = [i.hex() for i in gone]
        if newest_of_name:  # NAME@latest: the newest snapshot of that name
            name = self.model[ids[picks[0] % len(ids)]].name
            refs.append(f"{name}@latest")
            gone.add(next(i for i in reversed(ids) if self.model[i].name == name))
        assert {r.id for r in execute(self.r, plan_ids(self.r, refs))} == gone
        self.model = {i: t for i, t in self.model.items() if i not in gone}
        self.verify_all()

    @precondition(lambda self: self.model)
    @rule(h=host, last=st.integers(-1, 3), daily=st.integers(0, 3), weekly=st.integers(0, 2),
          within=st.sampled_from([None, "2d", "1m"]), keep_gold=st.booleans())
    def forget_policy(self, h: int, last: int, daily: int, weekly: int, within: str | None, keep_gold: bool) -> None:
        self.healthy = False
        self.use(h)
        policy = Policy(last=last, daily=daily, weekly=weekly, within=parse_duration(within) if within else None,
                        tags=(frozenset({"gold"}),) if keep_gold else ())
        plan = plan_policy(self.r, Policy(last=1) if policy.empty() else policy)
        kept, removed = {r.id for r in plan.keep}, {r.id for r in plan.remove}
        assert kept.isdisjoint(removed) and kept | removed == self.model.keys()
        assert not keep_gold or all("gold" not in self.model[i].tags for i in removed)
        assert {r.id for r in execute(self.r, plan)} == removed
        self.model = {i: t for i, t in self.model.items() if i in kept}
        self.verify_all()

    @rule(h=host, max_unused=st.one_of(st.sampled_from([1.0, 0.5, 0.0, 0.05]), st.floats(0.0, 1.0)))
    def prune(self, h: int, max_unused: float) -> None:
        """Prune rewrites the index objects that list the packs it deletes, then deletes them; right after,
        a second one finds nothing to do."""
        self.healthy = False
        self.use(h)
        assert prune(self.r, max_unused=max_unused).outcome is not None
        self.behind_objects.discard(self.current)
        self.verify_all()
        again = leftover_work(prune(self.r, max_unused=max_unused, dry_run=True))
        assert not again, f"host {self.current}: a second prune would still have work: {again}"

    @rule(h=host, max_unused=st.sampled_from([0.0, 0.5, 1.0]), kill_before=st.integers(0, 6))
    def killed_prune(self, h: int, max_unused: float, kill_before: int) -> None:
        """The process running prune dies before its ``kill_before``-th write to the store (a pack or index
        object written, or a batch deleted): wherever that is, the snapshots stay whole and listed on every
        host, and the next prune (on any host) finishes the work without leaving an index object that lists a
        pack it deleted."""
        self.healthy = False
        self.use(h)
        self.store.kill_before = kill_before
        try:
            prune(self.r, max_unused=max_unused)
            killed = False
        except Killed:
            killed = True
        finally:
            self.store.disarm()
        if killed:
            self.behind_objects.add(self.current)
            self.close_host()  # the process is gone; what it committed to its cache stays
            self.open_host(self.current)  # the host's next command
        else:
            self.behind_objects.discard(self.current)
        self.verify_all()

    @rule(h=host)
    def repair(self, h: int) -> None:
        """``repair index`` on a host: its cache rebuilt from the packs, and the store's index objects replaced
        by one listing every pack (every other host's cache then rebuilds from that one)."""
        self.healthy = False
        h %= self.hosts
        self.close_host()
        home = cache_home(self.cache_dir(h), self.config.repo_id)
        os.makedirs(home / TMP, exist_ok=True)
        report = _repair_under_lock(home, self.store, NoProgress(), pack.PLAIN, remote=True)
        self.behind_objects.discard(h)
        assert not (report.damaged_packs or report.damaged_blobs or report.left_out), report
        assert report.snapshots == len(self.model), report
        assert len(indexobjects.names(self.store)) <= 1
        self.open_host(h)
        self.verify_all()

    # -- rules: hosts, caches, restore -------------------------------------------------------------------------

    @rule(h=host)
    def switch_host(self, h: int) -> None:
        """The next commands run on another host, whose cache may be far behind (or ahead of a prune)."""
        self.healthy = False
        self.use(self.other_host(h))

    @rule(h=host, how=st.sampled_from(["remove", "remove", "truncate", "garbage"]))
    def lose_cache(self, h: int, how: str) -> None:
        """A host's cache directory is removed (or its LMDB file emptied, or overwritten): its next command
        builds it afresh from the index objects alone."""
        self.healthy = False
        h %= self.hosts
        reopen = self.repo is not None and h == self.current
        if reopen:
            self.close_host()
        self.behind_objects.discard(h)
        data_file = cache_home(self.cache_dir(h), self.config.repo_id) / INDEX / "data.mdb"
        if how == "remove" or not data_file.is_file():
            shutil.rmtree(self.cache_dir(h), ignore_errors=True)
        elif how == "truncate":
            os.truncate(data_file, 0)
        else:
            with open(data_file, "r+b") as f:
                f.write(det_bytes(7, 8192))  # both meta pages
        if reopen:
            self.open_host(h)

    @precondition(lambda self: self.model)
    @rule(h=host, pick=st.integers(0, 1 << 16), delta=st.booleans())
    def restore_one(self, h: int, pick: int, delta: bool) -> None:
        self.healthy = False
        self.use(h)
        ids = self.by_time()
        stale = self.model[ids[(pick + 1) % len(ids)]].data if delta else None
        self.restores_exactly(ids[pick % len(ids)], stale)

    # -- what must hold --------------------------------------------------------------------------------------

    def listed_as_model(self) -> dict[bytes, SnapshotRecord]:
        listed = {r.id: r for r in self.r.snapshots()}
        lost = [t for i, t in self.model.items() if i not in listed]
        assert not lost, f"host {self.current}: {len(lost)} snapshot(s) taken but not listed: " + ", ".join(
            f"{t.name[:12]} of {t.time.isoformat()} ({len(t.data)} bytes)" for t in lost)
        extra = sorted(i.hex()[:8] for i in listed.keys() - self.model.keys())
        assert not extra, f"host {self.current}: lists snapshots the model does not hold: {extra}"
        for rec in listed.values():
            t = self.model[rec.id]
            assert (rec.name, rec.size, rec.tags, rec.datetime) == (t.name, len(t.data), t.tags, t.time)
        return listed

    def check_clean(self) -> None:
        """check finds nothing, and every pack's garbage count is what no index row points at (a hint only,
        for check; but prune plans by it, and a count too high makes it rewrite a pack again and again)."""
        report = check(self.r)
        assert report.ok, f"host {self.current}: check: " + "; ".join(f"{f.kind}: {f.message}" for f in report.findings)
        off = [h.message for h in report.hints if h.kind == "garbage-accounting"]
        assert not off, f"host {self.current}: " + "; ".join(off[:3])

    def all_needed_is_indexed(self, listed: dict[bytes, SnapshotRecord]) -> None:
        """Every record, segment and chunk the model's snapshots need has an index row, in a pack the store
        holds (the model's own view, not check's)."""
        segment_ids = {sid for rec in listed.values() for sid, _ in rec.segments}
        chunk_ids = {c for sid in segment_ids for c in self.r.segment(sid).ids if c is not None}
        wanted = sorted(listed.keys() | segment_ids | chunk_ids)
        where = dict(zip(wanted, self.r.index.lookup_blobs(wanted), strict=True))
        unindexed = [i.hex()[:16] for i, loc in where.items() if loc is None]
        assert not unindexed, f"host {self.current}: blobs the model needs are not indexed: {unindexed[:5]}"
        for pack_no in sorted({loc.pack_no for loc in where.values() if loc is not None}):
            name = pack.pack_name(self.r.index.pack_id(pack_no))
            try:
                self.store.size(name)
            except ObjectMissing:
                raise AssertionError(f"host {self.current}: pack {name}, which the model needs, is gone") from None

    def index_objects_agree(self) -> None:
        """Every index object lists only packs the store holds; the (synced) cache holds exactly the store's
        index objects and lists exactly the packs they list: what one host committed, every other finds."""
        objects = self.index_objects()
        in_store = self.store_packs()
        for name, ids in objects.items():
            gone = [i.hex()[:16] for i in ids if i not in in_store]
            assert not gone, f"index object {name} lists packs the store does not hold: {gone[:5]}"
        assert self.r.index.index_objects().keys() == objects.keys(), \
            f"host {self.current}: the cache's index objects are not the store's"
        listed = {i for ids in objects.values() for i in ids}
        cached = {row.id for row in self.r.index.pack_rows()}
        if self.current in self.behind_objects:
            listed &= cached  # packs its killed prune dropped: its next prune deletes (and unlists) them
        assert cached == listed, (
            f"host {self.current}: the cache lists {len(cached - listed)} pack(s) no index object lists "
            f"{[i.hex()[:16] for i in sorted(cached - listed)][:5]}; index objects list {len(listed - cached)} "
            f"that the cache does not {[i.hex()[:16] for i in sorted(listed - cached)][:5]}")

    def consistent(self) -> None:
        self.all_needed_is_indexed(self.listed_as_model())
        self.check_clean()
        self.index_objects_agree()

    @invariant()
    def after_every_step(self) -> None:
        if self.repo is None:
            return  # before the initialize rule
        self.use(self.current)  # the current host's next command syncs
        self.consistent()
        self.steps += 1
        if not self.steps % 5:  # now and then every snapshot read back whole, on whichever host is current
            self.verify_all()
        self.healthy = True

    def teardown(self) -> None:
        try:
            if self.healthy and self.repo is not None:  # else a step failed: hypothesis reports that one
                self.finally_every_host_agrees()
        finally:
            self.close_host()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def finally_every_host_agrees(self) -> None:
        """The end of every run: every host, synced, lists the model and restores each snapshot bit-exact;
        forgetting all but the newest of each name (on one host) and pruning every partly dead pack (on another)
        leaves the survivors whole on every host; forgetting everything leaves tombstones only."""
        for h in range(self.hosts):
            self.use(h)
            self.listed_as_model()
            for id_ in self.model:
                self.restores_exactly(id_)
        # Keep the newest of each name (on one host) and rewrite every partly dead pack (on another): the
        # survivors still read back whole on every host.
        if self.model:
            self.use(0)
            gone = {r.id for r in execute(self.r, plan_policy(self.r, Policy(last=1)))}
            self.model = {i: t for i, t in self.model.items() if i not in gone}
            self.use(1)
            prune(self.r, max_unused=0.0)
            for h in range(self.hosts):
                self.use(h)
                self.consistent()
                self.verify_all()
        # Forget everything (on the last host) and prune (on the first): nothing but tombstones is left.
        self.use(self.hosts - 1)
        if self.model:
            execute(self.r, plan_ids(self.r, [i.hex() for i in self.model]))
            self.model = {}
        self.use(0)
        prune(self.r, max_unused=0.0)
        for h in range(self.hosts):
            self.use(h)
            self.consistent()
        assert {row.id for row in self.r.index.pack_rows()} == self.store_packs(), \
            "after a prune the store holds packs the index does not list"
        for pack_id in self.store_packs():
            with self.store.open(pack.pack_name(pack_id)) as reader:
                assert {e.type for e in pack.read_trailer(reader)} == {pack.TOMBSTONE}, \
                    "a pack with data survived forgetting every snapshot and pruning"
        assert not self.store.list(TEMP_PREFIX).objects, "temporary objects survived a prune"


# Each example a fresh repository and two or three caches; slow health checks are off (a step snapshots
# megabytes), and so is the deadline (a cache rebuild reads every index object).
SETTINGS = settings(max_examples=30, stateful_step_count=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.slow  # 10-30 s
def test_remote_repository_state_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    # Deltas (docs/format.md §11) are written to object stores here, which dedupimg does not do by default: their
    # 7-field rows, links and bases must travel through index objects, syncs, prunes and repairs all the same.
    monkeypatch.setattr(repository, "REMOTE_DELTAS", 1)
    stateful.run_state_machine_as_test(RemoteRepositoryMachine, settings=SETTINGS)
