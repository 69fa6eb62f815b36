"""A stateful property test over the library: snapshot, forget, prune, repair, reopen, restore, check.

A plain model (snapshot id -> the image bytes, name, tags and time it was taken with) is the oracle. After
every step the repository lists exactly the model's snapshots and ``check`` finds nothing; the destructive
steps (forget, prune, repair) are followed by a verify of every snapshot the model holds, ``restore`` rules
compare a restored file byte for byte, and the end of every run restores every snapshot.

The repository uses 1 KiB average chunks, packs of the smallest size the config allows (4 KiB, so a pack
holds one to four chunks) and segments of about 16 extents, so that pack, segment and record boundaries fall
everywhere. Images are built from pieces (random and text runs from a few seeds, zero runs, repeated blocks,
runs copied from earlier images), so chunks and segments are shared between snapshots; long tags and names
make records several KB long, as large as a pack.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dedupimg.core.config import ChunkerParams, SegmentParams
from dedupimg.core.fsutil import atomic_write
from dedupimg.core.manifest import SnapshotRecord
from dedupimg.core.retention import Policy, parse_duration
from dedupimg.ops.check import check
from dedupimg.ops.forget import execute, plan_ids, plan_policy
from dedupimg.ops.prune import prune
from dedupimg.ops.repair import repair_index
from dedupimg.ops.restore import restore, verify
from dedupimg.ops.snapshot import take_snapshot
from dedupimg.repo import keys, pack
from dedupimg.repo.repository import CONFIG, Repository
from tests.helpers import det_bytes, text_bytes, write_image
from tests.packfiles import pack_file, trailer

PACK_SIZE = 4096  # the smallest the config allows: one to four 1 KiB-average chunks
SEGMENTS = SegmentParams(cut_mask=0x0F, max_extents=32, zero_cut=64 << 10)
BLOCK = 4096
SHM = "/dev/shm"
KEEP_IMAGES = 8  # earlier images that copy pieces can draw from
NAMES = ("disk", "db", "vm-" + "n" * 250)

# Piece sizes: mostly small, now and then up to 4 MiB (zero runs up to 3 MiB: they cost no packs). The large
# ones give transactions of thousands of rows, as a real prune has (LMDB then leaves pages it allocated and
# freed unwritten: the index must still open afterwards).
small = st.integers(0, 6000)
mid = st.integers(0, 100_000)
size = st.one_of(small, small, small, mid, mid, st.integers(0, 1 << 20), st.integers(0, 4 << 20))
piece = st.one_of(
    st.tuples(st.just("random"), st.integers(0, 3), size),
    st.tuples(st.just("text"), st.integers(0, 3), size),
    st.tuples(st.just("zeros"), st.one_of(small, st.integers(0, 3 << 20))),
    st.tuples(st.just("repeat"), st.integers(0, 3), st.sampled_from([1, 100, 1024, 4096, 5000]), st.integers(1, 64)),
    st.tuples(st.just("copy"), st.integers(0, KEEP_IMAGES - 1), st.integers(0, 1 << 20), size),
)
image_spec = st.lists(piece, max_size=5)
# Changes to an earlier image: (kind, position, length, seed).
edit = st.tuples(st.sampled_from(["overwrite", "insert", "delete", "zeros"]), st.integers(0, 1 << 20),
                 st.integers(1, 20_000), st.integers(0, 99))
# Tags: a few short shared ones (a retention policy keeps by them) and long hex ones, which compress to about
# half their length: a record with two of them is about as large as a pack.
tag = st.one_of(st.sampled_from(["gold", "nightly"]), st.tuples(st.integers(0, 99), st.integers(1, 6000)))
tags_spec = st.lists(tag, max_size=3)


def make_tag(t: str | tuple[int, int]) -> str:
    if isinstance(t, str):
        return t
    seed, n = t
    return det_bytes(1000 + seed, n // 2 + 1).hex()[:n]


@dataclass(frozen=True)
class Expected:
    data: bytes
    name: str
    tags: list[str]
    time: datetime


class Interrupted(Exception):
    pass


class InterruptAfter:
    """A progress sink that interrupts the snapshot after ``n`` bytes, as Ctrl-C would."""

    def __init__(self, n: int) -> None:
        self.left = n

    def start(self, task: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise Interrupted

    def finish(self) -> None:
        pass


class RepositoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # On tmpfs when there is one: the thousands of tiny packs are fsynced each, and durability is not
        # what this test is about (tests/integration/test_faults.py is).
        self.tmp = Path(tempfile.mkdtemp(prefix="dedupimg-sm-", dir=SHM if os.path.isdir(SHM) else None))
        self.path = self.tmp / "repo"
        self.repo: Repository  # made by the initialize rule
        self.model: dict[bytes, Expected] = {}
        self.images: list[bytes] = []
        self.clock = datetime(2020, 1, 1, 12, tzinfo=UTC)  # in the past: retention measures from the newest
        self.steps = 0
        self.healthy = True  # False from the start of a step until its invariant passed

    @initialize(pack_size=st.sampled_from([PACK_SIZE, PACK_SIZE, PACK_SIZE, 32 << 10]), encrypted=st.booleans())
    def create(self, pack_size: int, encrypted: bool) -> None:
        """Mostly the smallest packs; now and then packs of a few dozen chunks, so that prune finds packs
        partly dead (to rewrite, or to keep with counted garbage) more often. Unencrypted or encrypted."""
        self.healthy = False
        made = Repository.init(self.path, ChunkerParams.for_average(1024), pack_size=pack_size,
                               encryption="aes-256-gcm" if encrypted else "none")
        config, unlocked = replace(made.config, segments=SEGMENTS), made.unlocked
        made.close()
        atomic_write(self.path / CONFIG, config.to_bytes() if unlocked is None else
                     keys.seal_config(config, unlocked.master).to_bytes())
        self.repo = Repository.open(self.path)
        assert self.repo.config.pack_size == pack_size and self.repo.config.segments == SEGMENTS

    # -- helpers -------------------------------------------------------------------------------------------

    def build(self, spec: list[tuple]) -> bytes:
        out = bytearray()
        for p in spec:
            kind = p[0]
            if kind == "random":
                out += det_bytes(p[1], p[2])
            elif kind == "text":
                out += text_bytes(p[1], p[2])
            elif kind == "zeros":
                out += bytes(p[1])
            elif kind == "repeat":
                out += det_bytes(100 + p[1], p[2]) * p[3]
            elif self.images:  # copy: a run of an earlier image (shared chunks where the cuts resync)
                src = self.images[p[1] % len(self.images)]
                start = p[2] % (len(src) + 1)
                out += src[start : start + p[3]]
        return bytes(out)

    def write_source(self, data: bytes, holes: bool) -> Path:
        """The image as a file; with ``holes``, aligned all-zero blocks are holes (never read)."""
        src = self.tmp / "source.img"
        src.unlink(missing_ok=True)
        write_image(src, data, holes, BLOCK)
        return src

    def tick(self, hours: int) -> datetime:
        self.clock += timedelta(hours=hours)
        return self.clock

    def sorted_ids(self) -> list[bytes]:
        return sorted(self.model, key=lambda i: (self.model[i].time, i.hex()))

    def verify_all(self) -> None:
        """Every snapshot the model holds reads back whole (every chunk and the image hash checked)."""
        for id_ in self.model:
            verify(self.repo, id_.hex())

    def restore_and_compare(self, id_: bytes, delta_from: bytes | None = None) -> None:
        out = self.tmp / "restored.img"
        out.unlink(missing_ok=True)
        if delta_from is not None:
            out.write_bytes(delta_from)
        restore(self.repo, id_.hex(), str(out), force=True, delta=delta_from is not None)
        assert out.read_bytes() == self.model[id_].data, f"snapshot {id_.hex()[:8]} restored wrong bytes"
        out.unlink()

    def forget(self, ids: list[bytes]) -> None:
        for i in ids:
            del self.model[i]

    # -- rules ---------------------------------------------------------------------------------------------

    @rule(spec=image_spec, name=st.sampled_from(NAMES), tags=tags_spec, hours=st.integers(1, 400),
          holes=st.booleans())
    def snapshot(self, spec: list[tuple], name: str, tags: list, hours: int, holes: bool) -> None:
        self.healthy = False
        self.take(self.build(spec), name, tags, hours, holes)

    @precondition(lambda self: self.images)
    @rule(base=st.integers(0, KEEP_IMAGES - 1), edits=st.lists(edit, min_size=1, max_size=4),
          name=st.sampled_from(NAMES), tags=tags_spec, hours=st.integers(1, 48), holes=st.booleans())
    def snapshot_edited(self, base: int, edits: list[tuple], name: str, tags: list, hours: int,
                        holes: bool) -> None:
        """The nightly pattern: an earlier image with a few changes. Most chunks are shared, so forgetting
        one version kills chunks scattered among live ones (packs partly dead, for prune to rewrite)."""
        self.healthy = False
        data = self.images[base % len(self.images)]
        for kind, pos, n, seed in edits:
            pos %= len(data) + 1
            if kind == "overwrite":
                data = data[:pos] + det_bytes(500 + seed, n) + data[pos + n :]
            elif kind == "insert":
                data = data[:pos] + text_bytes(500 + seed, n) + data[pos:]
            elif kind == "delete":
                data = data[:pos] + data[pos + n :]
            else:
                data = data[:pos] + bytes(n) + data[pos + n :]
        self.take(data, name, tags, hours, holes)

    @precondition(lambda self: self.model)
    @rule(name=st.sampled_from(NAMES), pokes=st.lists(st.tuples(st.integers(0, 1 << 22), st.integers(1, 64)),
                                                      min_size=1, max_size=8), hours=st.integers(1, 48))
    def snapshot_next_version(self, name: str, pokes: list[tuple[int, int]], hours: int) -> None:
        """The next version of the newest image of ``name``, with a few small writes: its changed chunks are
        stored as deltas on the chunks of the version before (format 3), whose bases then must outlive any
        forget and prune of that version while a delta on them lives."""
        self.healthy = False
        of_name = [e for e in self.model.values() if e.name == name]
        data = bytearray(max(of_name, key=lambda e: e.time).data if of_name else self.images[-1])
        for pos, n in pokes:
            if data:
                pos %= len(data)
                data[pos : pos + n] = det_bytes(pos, len(data[pos : pos + n]))
        self.take(bytes(data), name, [], hours, False)

    def take(self, data: bytes, name: str, tags: list, hours: int, holes: bool) -> None:
        when = self.tick(hours)
        tag_list = [make_tag(t) for t in tags]
        result = take_snapshot(self.repo, str(self.write_source(data, holes)), name=name, tags=tag_list, when=when)
        rec = result.record
        assert rec.size == len(data) and rec.name == name
        assert rec.id not in self.model  # a new time makes a new record
        self.model[rec.id] = Expected(data, name, sorted(set(tag_list)), when)
        self.images = [*self.images[-(KEEP_IMAGES - 1):], data]

    @rule(spec=image_spec, name=st.sampled_from(NAMES), after=st.integers(0, 1 << 20))
    def interrupted_snapshot(self, spec: list[tuple], name: str, after: int) -> None:
        """A snapshot stopped midway leaves no snapshot; what it committed is garbage for prune."""
        self.healthy = False
        data = self.build(spec)
        try:
            result = take_snapshot(self.repo, str(self.write_source(data, False)), name=name, when=self.tick(1),
                                   progress=InterruptAfter(after))
        except Interrupted:
            return  # the invariant checks that nothing new is listed
        # Not interrupted (the image was shorter): a normal snapshot.
        self.model[result.record.id] = Expected(data, name, [], self.clock)
        self.images = [*self.images[-(KEEP_IMAGES - 1):], data]

    @precondition(lambda self: self.model)
    @rule(picks=st.lists(st.integers(0, 1 << 16), min_size=1, max_size=4), by_latest=st.booleans())
    def forget_ids(self, picks: list[int], by_latest: bool) -> None:
        self.healthy = False
        ids = self.sorted_ids()
        chosen = {ids[p % len(ids)] for p in picks}
        refs = [i.hex() for i in chosen]
        if by_latest:  # NAME@latest names the newest snapshot of that name
            name = self.model[ids[picks[0] % len(ids)]].name
            newest = [i for i in ids if self.model[i].name == name][-1]
            chosen.add(newest)
            refs.append(f"{name}@latest")
        removed = execute(self.repo, plan_ids(self.repo, refs))
        assert {r.id for r in removed} == chosen
        self.forget(sorted(chosen))
        self.verify_all()

    @precondition(lambda self: self.model)
    @rule(last=st.integers(-1, 3), daily=st.integers(0, 3), weekly=st.integers(0, 2), monthly=st.integers(0, 2),
          within=st.sampled_from([None, "2d", "1m"]), gold=st.booleans())
    def forget_policy(self, last: int, daily: int, weekly: int, monthly: int, within: str | None,
                      gold: bool) -> None:
        self.healthy = False
        policy = Policy(last=last, daily=daily, weekly=weekly, monthly=monthly,
                        within=parse_duration(within) if within else None,
                        tags=(frozenset({"gold"}),) if gold else ())
        if policy.empty():
            policy = Policy(last=1)
        plan = plan_policy(self.repo, policy)
        keep, remove = {r.id for r in plan.keep}, {r.id for r in plan.remove}
        assert keep | remove == set(self.model) and not keep & remove
        for name in NAMES:
            of_name = [i for i in self.sorted_ids() if self.model[i].name == name]
            if policy.last == -1:
                assert set(of_name) <= keep
            elif policy.last > 0:
                assert set(of_name[-policy.last:]) <= keep
            if of_name and (policy.last or daily or weekly or monthly or within):
                assert of_name[-1] in keep  # these rules keep the newest of each name
            if gold:
                assert {i for i in of_name if "gold" in self.model[i].tags} <= keep
        removed = execute(self.repo, plan)
        assert {r.id for r in removed} == remove
        self.forget(sorted(remove))
        self.verify_all()

    @rule(max_unused=st.one_of(st.sampled_from([0.0, 0.05, 1.0]), st.floats(0.0, 1.0)))
    def prune(self, max_unused: float) -> None:
        self.healthy = False
        report = prune(self.repo, max_unused=max_unused)
        assert report.outcome is not None
        self.verify_all()
        again = prune(self.repo, max_unused=max_unused, dry_run=True)
        assert (again.packs_to_delete, again.packs_to_rewrite, again.chunks_dropped, again.segments_dropped,
                again.records_dropped, again.orphan_packs, again.tmp_files) == (0, 0, 0, 0, 0, 0, 0), \
            f"a second prune would still have work: {again}"

    @rule()
    def repair(self) -> None:
        self.healthy = False
        self.repo.close()
        report = repair_index(self.path)
        self.repo = Repository.open(self.path)
        assert not report.damaged_packs and not report.damaged_blobs, report
        assert not report.left_out, report.left_out
        assert report.snapshots == len(self.model), report
        self.verify_all()

    @rule()
    def reopen(self) -> None:
        self.healthy = False
        self.repo.close()
        self.repo = Repository.open(self.path)

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 1 << 16), delta=st.booleans())
    def restore_one(self, pick: int, delta: bool) -> None:
        self.healthy = False
        ids = self.sorted_ids()
        id_ = ids[pick % len(ids)]
        old = self.model[ids[(pick + 1) % len(ids)]].data if delta else None  # a stale copy to update
        self.restore_and_compare(id_, old)

    def nothing_needed_was_freed(self, listed: dict[bytes, SnapshotRecord]) -> None:
        """Every record, segment and chunk a snapshot of the model needs has an index row, in a pack file
        that exists (the model's own view, not check's)."""
        needed: set[bytes] = set()
        for rec in listed.values():
            needed.add(rec.id)
            for sid, _ in rec.segments:
                needed.add(sid)
                needed.update(i for i in self.repo.segment(sid).ids if i is not None)
        ids = sorted(needed)
        locations = self.repo.index.lookup_blobs(ids)
        gone = [i.hex()[:16] for i, loc in zip(ids, locations, strict=True) if loc is None]
        assert not gone, f"blobs the model needs are not indexed: {gone[:5]}"
        for no in sorted({loc.pack_no for loc in locations if loc is not None}):
            path = pack_file(self.repo, self.repo.index.pack_id(no))
            assert path.is_file(), f"pack {path.name} that the model needs is gone"

    # -- after every step ------------------------------------------------------------------------------------

    @invariant()
    def listed_and_consistent(self) -> None:
        listed = {r.id: r for r in self.repo.snapshots()}
        missing = [self.model[i] for i in self.model if i not in listed]
        assert not missing, (
            f"{len(missing)} snapshot(s) taken but not listed: "
            + ", ".join(f"{e.name[:12]} {e.time.isoformat()} ({len(e.data)} bytes, tags of "
                        f"{sum(map(len, e.tags))} chars)" for e in missing)
        )
        assert set(listed) == set(self.model), "the repository lists snapshots the model does not hold"
        for id_, rec in listed.items():
            exp = self.model[id_]
            assert (rec.name, rec.size, rec.tags, rec.datetime) == (exp.name, len(exp.data), exp.tags, exp.time)
        report = check(self.repo)
        assert report.ok, "check: " + "; ".join(f"{f.kind}: {f.message}" for f in report.findings)
        self.nothing_needed_was_freed(listed)
        self.steps += 1
        if self.steps % 5 == 0:
            self.verify_all()
        self.healthy = True

    def teardown(self) -> None:
        try:
            if not self.healthy or not hasattr(self, "repo"):
                return  # a step failed: hypothesis reports that failure, not a follow-on one
            for id_ in list(self.model):
                self.restore_and_compare(id_)
            # Keep the newest snapshot of each name and rewrite every pack the others leave partly dead: the
            # survivors (often edited versions of what went) still read back whole, and check is clean.
            if self.model:
                plan = plan_policy(self.repo, Policy(last=1))
                self.forget([r.id for r in execute(self.repo, plan)])
                prune(self.repo, max_unused=0.0)
                self.reopen()  # the index as the next process finds it
                report = check(self.repo)
                assert report.ok, [f.message for f in report.findings]
                self.verify_all()
            # Forget everything and prune: nothing but tombstones may be left.
            if self.model:
                execute(self.repo, plan_ids(self.repo, [i.hex() for i in self.model]))
                self.model.clear()
            prune(self.repo, max_unused=0.0)
            self.reopen()
            report = check(self.repo)
            assert report.ok, [f.message for f in report.findings]
            for row in self.repo.index.pack_rows():
                assert all(e.type == pack.TOMBSTONE
                           for e in trailer(pack_file(self.repo, row.id))), \
                    "a pack with data survived forgetting every snapshot and pruning"
        finally:
            try:
                if hasattr(self, "repo"):
                    self.repo.close()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.mark.slow  # 10-20 s
def test_repository_state_machine() -> None:
    run_state_machine_as_test(
        RepositoryMachine,
        settings=settings(max_examples=50, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    )
