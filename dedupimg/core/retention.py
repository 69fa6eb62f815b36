"""Snapshot retention: which snapshots a ``forget`` policy keeps, exactly as ``restic forget`` decides.

This is a port of restic's ``ApplyPolicy`` (``internal/data/snapshot_policy.go``), its ``Duration``
(``internal/data/duration.go``) and ``Snapshot.HasTags`` (``internal/data/snapshot.go``); restic's manual,
"Removing snapshots according to a policy", is the specification. In short:

* snapshots are walked newest first (a stable sort, so equal times keep the caller's order);
* ``last`` keeps the N newest; ``hourly``/``daily``/``weekly``/``monthly``/``yearly`` keep the newest snapshot
  of each of the N most recent hours/days/ISO weeks/months/years that have snapshots, with buckets taken
  from the wall clock of each snapshot's own recorded zone; ``-1`` means unlimited;
* if a count rule still has counts left when the walk reaches the oldest snapshot, that snapshot is kept too
  ("oldest daily snapshot"), which maximises the history kept;
* ``within`` keeps every snapshot strictly newer than *latest - duration*, where *latest* is the newest
  snapshot that is not in the future; ``within_hourly`` etc. keep one snapshot per bucket inside that window;
* ``tags`` keeps every snapshot that has all the tags of at least one of the sets;
* a snapshot is kept if any rule keeps it, and every rule that matched is recorded as a reason.

Grouping (by image name) is the caller's job; see :func:`group_by_name`. The library never prints.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from typing import Generic, TypeVar

from dedupimg.core.errors import UsageError

T = TypeVar("T")

EMPTY_POLICY_MESSAGE = (
    "no keep rule given: refusing to forget every snapshot; use forget ID... to remove snapshots by id"
)

_DURATION_TOKEN = re.compile(r"(-?)([0-9]*)(.?)", re.DOTALL)


@dataclass(frozen=True)
class Duration:
    """A calendar duration as restic spells it: ``1y5m7d2h`` (years, months, days, hours)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 0:
                raise UsageError(f"duration {f.name} must be a whole number >= 0, not {value!r}")

    def zero(self) -> bool:
        """True if every part is zero: restic then treats the rule as not given."""
        return not (self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        # restic's Duration.String: only the non-zero parts, in y m d h order ("1y1d1m" prints "1y1m1d").
        parts = ((self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h"))
        return "".join(f"{n}{unit}" for n, unit in parts if n)

    def before(self, t: datetime) -> datetime | None:
        """``t`` minus this duration, like Go's ``t.AddDate(-y, -m, -d).Add(-h * time.Hour)``.

        The calendar part is applied to the wall clock in ``t``'s own zone and normalised the way Go's
        ``time.Date`` does (2015-03-31 minus one month is "2015-02-31", that is 2015-03-03); the hours are then
        subtracted as elapsed time. Returns None if the result falls before year 1, i.e. before any time
        Python can represent: every snapshot is then newer than it.

        Like Go's ``time.Parse``, which gives a time whose offset is the local zone's at that instant the
        local zone itself, such a ``t`` is shifted by days in the local zone, daylight saving rules included
        (one day before 12:00+01:00 on the day summer time ended is 12:00+02:00, 25 hours earlier; found by
        review against restic); any other offset stays fixed.
        """
        local = _local_zone_of(t)
        wall = t if local is None else local
        month_index = wall.month - 1 - self.months
        year = wall.year - self.years + month_index // 12
        month = month_index % 12 + 1
        try:
            day = date(year, month, 1) + timedelta(days=wall.day - 1 - self.days)
            if local is None:
                back = datetime.combine(day, t.timetz()).astimezone(UTC)
            else:  # a naive wall clock read in the local zone (mktime: its rules at that date)
                back = datetime.fromtimestamp(datetime.combine(day, local.time()).timestamp(), UTC)
            return back - timedelta(hours=self.hours)
        except (ValueError, OverflowError, OSError):
            return None


def _local_zone_of(t: datetime) -> datetime | None:
    """``t`` as a naive wall clock of the local zone when its offset is the local zone's at that instant (as Go's
    time.Parse would then give it the local zone), else None."""
    try:
        local = datetime.fromtimestamp(t.timestamp())
    except (ValueError, OverflowError, OSError):
        return None
    return local if local.astimezone().utcoffset() == t.utcoffset() else None


def parse_duration(text: str) -> Duration:
    """Parse restic's duration syntax: numbers each followed by ``y``, ``m``, ``d`` or ``h`` (``2y5m7d3h``).

    Surrounding whitespace is ignored, as restic does. Bad text raises :class:`UsageError` with one line.
    Deliberately stricter than restic's parser: an empty duration, a negative number (which ``restic forget``
    refuses later anyway) and a unit given twice (restic silently keeps the last) are errors.
    """
    s = text.strip()
    if not s:
        raise UsageError(f"invalid duration {text!r}: empty (expected e.g. 1y5m7d2h)")
    values: dict[str, int] = {}
    names = {"y": "years", "m": "months", "d": "days", "h": "hours"}
    pos = 0
    while pos < len(s):
        match = _DURATION_TOKEN.match(s, pos)
        assert match is not None  # the pattern matches the empty string
        sign, digits, unit = match.groups()
        if not digits:
            raise UsageError(f"invalid duration {text!r}: expected a number at {s[pos:]!r} (e.g. 1y5m7d2h)")
        if sign:
            raise UsageError(f"invalid duration {text!r}: negative values are not allowed")
        if not unit:
            raise UsageError(f"invalid duration {text!r}: no unit after {digits} (use y, m, d or h)")
        if unit not in names:
            raise UsageError(f"invalid duration {text!r}: unknown unit {unit!r} after {digits} (use y, m, d or h)")
        if names[unit] in values:
            raise UsageError(f"invalid duration {text!r}: unit {unit!r} given twice")
        values[names[unit]] = int(digits)
        pos = match.end()
    return Duration(**values)


def parse_tag_list(text: str) -> frozenset[str]:
    """One ``--keep-tag`` value: comma separated tags, each stripped (restic's splitTagList).

    ``""`` gives ``{""}``, which matches untagged snapshots only. ``""`` together with tags (``",a"``) is
    refused: no snapshot is untagged and tagged at once, and restic's answer depends on the order (``,a``
    matches untagged snapshots, ``a,`` none), so a user who wrote it meant something else.
    """
    tags = frozenset(tag.strip() for tag in text.split(","))
    if "" in tags and len(tags) > 1:
        raise UsageError(f"tag list {text!r}: an empty tag (untagged) cannot be combined with tags; "
                         "give '' as a list of its own")
    return tags


@dataclass(frozen=True)
class Policy:
    """Which snapshots to keep. Counts are ``0`` (rule off), a positive N, or ``-1`` (unlimited).

    A duration that is None or zero is off. ``tags`` holds one set per ``--keep-tag``: a snapshot is kept
    by a set if it has all of its tags; ``""`` in a set stands for "has no tags at all".
    """

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    within_hourly: Duration | None = None
    within_daily: Duration | None = None
    within_weekly: Duration | None = None
    within_monthly: Duration | None = None
    within_yearly: Duration | None = None
    tags: tuple[frozenset[str], ...] = ()

    def __post_init__(self) -> None:
        for name in _COUNT_RULES:
            value = getattr(self, name)
            if type(value) is not int or value < -1:
                raise UsageError(f"--keep-{name}: negative values other than -1 (unlimited) are not allowed")
        for name in _WITHIN_RULES:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Duration):
                raise UsageError(f"--keep-{name.replace('_', '-')}: expected a duration, not {value!r}")
        for tag_set in self.tags:
            if not isinstance(tag_set, frozenset) or not tag_set:
                raise UsageError("--keep-tag: an empty tag list would keep every snapshot; use '' for untagged")

    def empty(self) -> bool:
        """True if no rule is given (restic's ExpirePolicy.Empty): such a policy must not be applied."""
        if self.tags:
            return False
        if any(getattr(self, name) != 0 for name in _COUNT_RULES):
            return False
        return all(_off(getattr(self, name)) for name in _WITHIN_RULES)

    def describe(self) -> str:
        """The policy in words, as restic's "Applying Policy: ..." line (``keep 4 daily snapshots``)."""
        words = {"last": "latest"}
        keeps = []
        for name in _COUNT_RULES:
            n = getattr(self, name)
            if n > 0:
                keeps.append(f"{n} {words.get(name, name)}")
            elif n == -1:
                keeps.append(f"all {words.get(name, name)}")
        within = [
            f"{name.removeprefix('within_')} snapshots within {d}"
            for name in _WITHIN_RULES[1:]
            if not _off(d := getattr(self, name))
        ]
        s = f"{', '.join(keeps)} snapshots" if keeps else ""
        if within:
            s = ", ".join(([s] if s else []) + within)
        if self.tags:
            lists = " ".join(_tag_text(t) for t in self.tags)
            s += (" and " if s else "") + f"all snapshots with tags [{lists}]"
        if not _off(self.within):
            s += (" and " if s else "") + f"all snapshots within {self.within} of the newest"
        return f"keep {s}" if s else "remove"


_COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_WITHIN_RULES = ("within", "within_hourly", "within_daily", "within_weekly", "within_monthly", "within_yearly")


@dataclass(frozen=True)
class Decision(Generic[T]):
    """The verdict on one snapshot; ``reasons`` is empty exactly when ``keep`` is False."""

    item: T
    keep: bool
    reasons: tuple[str, ...]


Bucket = tuple[int, ...]


def _hour(t: datetime, _nr: int) -> Bucket:
    return (t.year, t.month, t.day, t.hour)


def _day(t: datetime, _nr: int) -> Bucket:
    return (t.year, t.month, t.day)


def _week(t: datetime, _nr: int) -> Bucket:
    iso = t.isocalendar()  # Go's t.ISOWeek(): ISO year and week
    return (iso.year, iso.week)


def _month(t: datetime, _nr: int) -> Bucket:
    return (t.year, t.month)


def _year(t: datetime, _nr: int) -> Bucket:
    return (t.year,)


def _always(_t: datetime, nr: int) -> Bucket:
    return (nr,)


_BUCKERS: dict[str, Callable[[datetime, int], Bucket]] = {
    "last": _always,
    "hourly": _hour,
    "daily": _day,
    "weekly": _week,
    "monthly": _month,
    "yearly": _year,
}


def _off(d: Duration | None) -> bool:
    return d is None or d.zero()


def _tag_text(tags: frozenset[str]) -> str:
    # restic prints a TagList as "[a, b]" in the order given; a set has none, so sort for a stable text.
    return "[" + ", ".join(sorted(tags)) + "]"


def _has_tags(snapshot_tags: frozenset[str], wanted: frozenset[str]) -> bool:
    if "" in wanted and snapshot_tags:
        return False  # '' means "untagged"
    return (wanted - {""}) <= snapshot_tags


def _latest(times: Sequence[datetime], now: datetime) -> datetime | None:
    # restic's findLatestTimestamp: the newest snapshot time that is not in the future (None: there is none).
    past = [t for t in times if t < now]
    return max(past) if past else None


def apply_policy(
    items: Sequence[T],
    policy: Policy,
    *,
    time_of: Callable[[T], datetime],
    tags_of: Callable[[T], Iterable[str]],
    now: datetime | None = None,
) -> list[Decision[T]]:
    """Decide for every item of one group whether ``policy`` keeps it; the result is sorted newest first.

    Times must be timezone-aware. ``now`` (default: the current time) only serves to ignore snapshots from
    the future when finding the newest snapshot that ``within`` rules measure from, as restic does.
    Raises :class:`UsageError` if the policy is empty, whatever ``items`` holds.
    """
    if policy.empty():
        raise UsageError(EMPTY_POLICY_MESSAGE)
    times = [time_of(item) for item in items]
    for t in times:
        if t.tzinfo is None or t.utcoffset() is None:
            raise UsageError(f"snapshot time {t.isoformat()} has no time zone")
    order = sorted(range(len(items)), key=times.__getitem__, reverse=True)  # stable: ties keep input order
    if not order:
        return []

    latest = _latest(times, now if now is not None else datetime.now(UTC))
    windows: dict[str, datetime | None] = {}
    for name in _WITHIN_RULES:
        d = getattr(policy, name)
        if not _off(d):
            # No snapshot in the past: restic measures from Go's zero time, so every snapshot is in range.
            windows[name] = d.before(latest) if latest is not None else None

    counts = {name: getattr(policy, name) for name in _COUNT_RULES}
    last_count_bucket: dict[str, Bucket | None] = dict.fromkeys(_COUNT_RULES)
    last_within_bucket: dict[str, Bucket | None] = dict.fromkeys(_WITHIN_RULES[1:])
    oldest = len(order) - 1
    decisions: list[Decision[T]] = []

    for nr, index in enumerate(order):
        t = times[index]
        reasons: list[str] = []

        # Tags are not counted.
        snapshot_tags = frozenset(tags_of(items[index]))
        for wanted in policy.tags:
            if _has_tags(snapshot_tags, wanted):
                reasons.append(f"has tags {_tag_text(wanted)}")

        if "within" in windows and _after(t, windows["within"]):
            reasons.append(f"within {policy.within}")

        for name in _COUNT_RULES:
            if counts[name] > 0 or counts[name] == -1:
                val = _BUCKERS[name](t, nr)
                if val != last_count_bucket[name] or nr == oldest:
                    reason = "last snapshot" if name == "last" else f"{name} snapshot"
                    if val == last_count_bucket[name]:
                        reason = f"oldest {reason}"
                    last_count_bucket[name] = val
                    if counts[name] > 0:
                        counts[name] -= 1
                    reasons.append(reason)

        for name in _WITHIN_RULES[1:]:
            if name in windows and _after(t, windows[name]):
                kind = name.removeprefix("within_")
                val = _BUCKERS[kind](t, nr)
                if val != last_within_bucket[name] or nr == oldest:
                    reason = f"{kind} within {getattr(policy, name)}"
                    if val == last_within_bucket[name]:
                        reason = f"oldest {reason}"
                    last_within_bucket[name] = val
                    reasons.append(reason)

        decisions.append(Decision(items[index], bool(reasons), tuple(reasons)))
    return decisions


def _after(t: datetime, cutoff: datetime | None) -> bool:
    # Go's t.After(cutoff): strictly later; a snapshot exactly at latest - duration is not kept.
    return cutoff is None or t > cutoff


def group_by_name(items: Iterable[T], name_of: Callable[[T], str]) -> dict[str, list[T]]:
    """Split items into groups by name, each in input order; groups appear in order of first occurrence."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(name_of(item), []).append(item)
    return groups


@dataclass(frozen=True)
class SnapshotFilter:
    """Which snapshots a command looks at, as restic's ``--host``/``--tag`` filters (and dedupimg's ``--name``).

    ``names`` and ``hosts``: any of them (empty: all); ``tags``: a snapshot matches when it has every tag of at
    least one of the sets (``--tag a,b --tag c``: a and b, or c); empty: all.
    """

    names: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    tags: tuple[frozenset[str], ...] = ()

    def empty(self) -> bool:
        return not (self.names or self.hosts or self.tags)

    def matches(self, name: str, host: str, tags: Iterable[str]) -> bool:
        have = frozenset(tags)
        return ((not self.names or name in self.names) and (not self.hosts or host in self.hosts)
                and (not self.tags or any(_has_tags(have, wanted) for wanted in self.tags)))

    def select(self, items: Iterable[T], fields_of: Callable[[T], tuple[str, str, Iterable[str]]]) -> list[T]:
        """The items that match, in input order; ``fields_of`` gives an item's (name, host, tags)."""
        return [item for item in items if self.matches(*fields_of(item))]
