"""Manifests: a snapshot is a list of content-addressed segments, a segment a list of extents.

An extent is ``(length, chunk id)`` or ``(length, None)`` for a run of zeros (holes and zero chunks).
Segment boundaries are content-defined (see :class:`SegmentBuilder`), so an unchanged region of an image
produces the very same segments in the next snapshot and costs no new metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgpack

from dedupimg.core.config import ChunkerParams, SegmentParams
from dedupimg.core.errors import IntegrityError
from dedupimg.core.ids import blob_id

ID_LEN = 32
SEGMENT_VERSION = 1
SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class Segment:
    lengths: list[int]
    ids: list[bytes | None]

    @property
    def size(self) -> int:
        return sum(self.lengths)

    def extents(self) -> Iterator[tuple[int, bytes | None]]:
        return zip(self.lengths, self.ids, strict=True)

    def encode(self) -> bytes:
        return encode_segment(self.lengths, self.ids)

    def chunk_ids(self) -> list[bytes]:
        return [i for i in self.ids if i is not None]

    def starts(self) -> list[int]:
        """Offset of each extent within the segment (for bisection)."""
        out, pos = [], 0
        for n in self.lengths:
            out.append(pos)
            pos += n
        return out


def encode_segment(lengths: list[int], ids: list[bytes | None]) -> bytes:
    flat: list[Any] = []
    for n, i in zip(lengths, ids, strict=True):
        flat.append(n)
        flat.append(i)
    return msgpack.packb([SEGMENT_VERSION, flat], use_bin_type=True)


def decode_segment(raw: bytes) -> Segment:
    try:
        # Bound arrays by the input (each item takes a byte), not by a length a damaged header claims.
        doc = msgpack.unpackb(raw, raw=False, use_list=True, max_array_len=min(len(raw), 1 << 22))
        if not (isinstance(doc, list) and len(doc) == 2):
            raise ValueError("not a [version, extents] array")
        version, flat = doc
        if type(version) is not int or version != SEGMENT_VERSION or not isinstance(flat, list) or len(flat) % 2:
            raise ValueError("unknown segment version or shape")
        lengths = flat[0::2]
        ids = flat[1::2]
        for n, i in zip(lengths, ids, strict=True):
            if type(n) is not int or n <= 0:
                raise ValueError("bad extent length")
            if i is not None and not (isinstance(i, bytes) and len(i) == ID_LEN):
                raise ValueError("bad chunk id")
        return Segment(lengths, ids)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"damaged manifest segment ({_one_line(exc)})") from None


class SegmentBuilder:
    """Groups extents into segments and hands each finished segment to ``emit``.

    A segment ends after a chunk extent whose id matches ``cut_mask`` (content-defined, so an insertion
    shifts at most the segments around it), before the first chunk after a zero run of ``zero_cut`` bytes
    or more, and after ``max_extents`` extents. Adjacent zero extents merge into one.
    """

    def __init__(self, params: SegmentParams, emit: Callable[[Segment], None]) -> None:
        self._p = params
        self._emit = emit
        self._lengths: list[int] = []
        self._ids: list[bytes | None] = []

    def add_zero(self, length: int) -> None:
        if length <= 0:
            return
        if self._ids and self._ids[-1] is None:
            self._lengths[-1] += length
            return
        self._append(length, None)

    def add_chunk(self, length: int, id_: bytes) -> None:
        if self._ids and self._ids[-1] is None and self._lengths[-1] >= self._p.zero_cut:
            self.flush()
        self._append(length, id_)
        if int.from_bytes(id_[-2:], "little") & self._p.cut_mask == 0:
            self.flush()

    def _append(self, length: int, id_: bytes | None) -> None:
        self._lengths.append(length)
        self._ids.append(id_)
        if len(self._lengths) >= self._p.max_extents:
            self.flush()

    def flush(self) -> None:
        if self._lengths:
            self._emit(Segment(self._lengths, self._ids))
            self._lengths, self._ids = [], []


@dataclass
class SnapshotRecord:
    name: str
    time: str  # ISO 8601 with zone
    size: int
    image_hash: bytes  # blake3-256 of the whole image
    segments: list[tuple[bytes, int]]  # (segment id, length)
    source: str = ""
    host: str = ""
    tags: list[str] = field(default_factory=list)
    chunker: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    # The source (a regular file) changed while it was read: the image may match no moment of the disk.
    changed_during_read: bool = False
    id: bytes = b""  # blake3 of the encoded record; set by encode()/decode()

    @property
    def hex_id(self) -> str:
        return self.id.hex()

    @property
    def short_id(self) -> str:
        return self.id.hex()[:8]

    @property
    def datetime(self) -> datetime:
        return datetime.fromisoformat(self.time)

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "v": SNAPSHOT_VERSION,
            "name": self.name,
            "time": self.time,
            "size": self.size,
            "hash": self.image_hash,
            "segments": [[sid, n] for sid, n in self.segments],
            "source": self.source,
            "host": self.host,
            "tags": list(self.tags),
            "chunker": self.chunker,
            "stats": self.stats,
        }
        if self.changed_during_read:  # only then: other records keep their exact bytes (and ids)
            doc["changed_during_read"] = True
        raw = msgpack.packb(doc, use_bin_type=True)
        self.id = blob_id(raw)
        return raw

    @classmethod
    def decode(cls, raw: bytes) -> SnapshotRecord:
        try:
            # Bound arrays by the input (each item takes a byte), not by a length a damaged header claims.
            doc = msgpack.unpackb(raw, raw=False, use_list=True, max_array_len=min(len(raw), 1 << 24))
            if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != SNAPSHOT_VERSION:
                raise ValueError("unknown snapshot record version")
            # Check every field's type before using it: bytes(n) of a damaged int would allocate n bytes.
            segments = []
            for pair in _field(doc, "segments", list):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ValueError("a segment entry is not [id, length]")
                sid, n = pair
                if not (isinstance(sid, bytes) and len(sid) == ID_LEN) or type(n) is not int or n < 0:
                    raise ValueError("bad segment id or length")
                segments.append((sid, n))
            tags = _field(doc, "tags", list, [])
            if not all(isinstance(t, str) for t in tags):
                raise ValueError("a tag is not a string")
            rec = cls(
                name=_field(doc, "name", str),
                time=_field(doc, "time", str),
                size=_field(doc, "size", int),
                image_hash=_field(doc, "hash", bytes),
                segments=segments,
                source=_field(doc, "source", str, ""),
                host=_field(doc, "host", str, ""),
                tags=tags,
                chunker=_field(doc, "chunker", dict, {}),
                stats=_field(doc, "stats", dict, {}),
                changed_during_read=_field(doc, "changed_during_read", bool, False),
            )
            if rec.size < 0 or len(rec.image_hash) != ID_LEN:
                raise ValueError("bad image size or hash")
            if datetime.fromisoformat(rec.time).tzinfo is None:
                raise ValueError("time has no UTC offset")  # naive and aware times do not sort together
            if sum(n for _, n in segments) != rec.size:
                raise ValueError("segment lengths do not add up to the image size")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"damaged snapshot record ({_one_line(exc)})") from None
        rec.id = blob_id(raw)
        return rec


_MISSING: Any = object()


def _field(doc: dict[Any, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    """``doc[key]``, which must be of type ``kind`` (an int is not a bool); ``default`` if absent and allowed."""
    if key not in doc:
        if default is _MISSING:
            raise ValueError(f"field {key!r} is missing")
        return default
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"field {key!r} is not {kind.__name__}")
    return value


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (messages may quote damaged input)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def chunker_dict(params: ChunkerParams) -> dict[str, Any]:
    from dataclasses import asdict

    doc = asdict(params)
    if doc["seed"]:  # an encrypted repository's is a secret (its master key's): records never carry it
        del doc["seed"]
    return doc


def segment_starts(segments: Iterable[tuple[bytes, int]]) -> list[int]:
    """Image offset of each of a record's ``(segment id, length)``."""
    out, pos = [], 0
    for _, n in segments:
        out.append(pos)
        pos += n
    return out


# -- tombstones -------------------------------------------------------------------------------------------------

TOMBSTONE_VERSION = 1
MAX_TOMBSTONE_IDS = 1 << 20  # far more snapshots than one forget removes; bounds decoding damaged input


def encode_tombstone(snapshot_ids: list[bytes]) -> bytes:
    """``[1, [id, ...]]``: the records that ``forget`` removed, so that ``repair index`` leaves them out."""
    return msgpack.packb([TOMBSTONE_VERSION, list(snapshot_ids)], use_bin_type=True)


def decode_tombstone(raw: bytes) -> list[bytes]:
    try:
        doc = msgpack.unpackb(raw, use_list=True, raw=False, max_array_len=MAX_TOMBSTONE_IDS, max_bin_len=32,
                              max_str_len=0, max_map_len=0, max_ext_len=0)
        if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == TOMBSTONE_VERSION and isinstance(doc[1], list)):
            raise ValueError("not a version 1 tombstone")
        ids = doc[1]
        if not all(isinstance(i, bytes) and len(i) == 32 for i in ids):
            raise ValueError("bad snapshot id")
        return ids
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"tombstone is damaged ({_one_line(exc)})") from None
