"""Manifests: a snapshot is a list of content-addressed segments, a segment a list of extents.

An extent is ``(length, chunk id)`` or ``(length, None)`` for a run of zeros (holes and zero chunks).
Segment boundaries are content-defined (see :class:`SegmentBuilder`), so an unchanged region of an image
produces the very same segments in the next snapshot and costs no new metadata.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import blake3
import msgpack

from dedupimg.core.config import ChunkerParams, SegmentParams
from dedupimg.core.errors import IntegrityError
from dedupimg.core.ids import blob_id

ID_LEN = 32
SEGMENT_VERSION = 1
SNAPSHOT_VERSION = 1  # a record whose hash is the image's blake3
DERIVED_SNAPSHOT_VERSION = 2  # a record whose hash is derived from its extents (HASH_OF_EXTENTS)
HASH_OF_IMAGE = "image"
HASH_OF_EXTENTS = "extents"
EXTENTS_DIGEST_CONTEXT = b"dedupimg extents v1\0"


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

    def add_extents(self, lengths: list[int], ids: list[bytes | None]) -> None:
        """``add_zero`` for each None among ``ids`` and ``add_chunk`` for each id, runs of chunks in bulk."""
        if None not in ids:  # most batches: a scan in C, no Python step per chunk
            self.add_chunks(lengths, ids)  # type: ignore[arg-type]
            return
        start = 0
        for k in [k for k, id_ in enumerate(ids) if id_ is None]:
            self.add_chunks(lengths[start:k], ids[start:k])  # type: ignore[arg-type]
            self.add_zero(lengths[k])
            start = k + 1
        self.add_chunks(lengths[start:], ids[start:])  # type: ignore[arg-type]

    def add_chunks(self, lengths: list[int], ids: list[bytes]) -> None:
        """``add_chunk`` for each pair (no None among ``ids``), with list slices instead of a call per chunk."""
        if not ids:
            return
        if self._ids and self._ids[-1] is None and self._lengths[-1] >= self._p.zero_cut:
            self.flush()
        mask, most = self._p.cut_mask, self._p.max_extents
        cuts = [k + 1 for k, id_ in enumerate(ids) if int.from_bytes(id_[-2:], "little") & mask == 0]
        start = 0
        for stop, content_cut in [*((c, True) for c in cuts), (len(ids), False)]:
            while start < stop:
                take = min(stop, start + most - len(self._lengths))
                self._lengths.extend(lengths[start:take])
                self._ids.extend(ids[start:take])
                start = take
                if len(self._lengths) >= most:
                    self.flush()
            if content_cut:
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


class ExtentsDigest:
    """blake3 of an image's extents in order, the hash an incremental snapshot records (``hash_of`` "extents").

    An incremental snapshot never reads its unchanged ranges, so it cannot hash the image; its chunk ids,
    each the (keyed) blake3 of its bytes, pin the bytes as well. The digest is over ``(u64 LE length, id)``
    for each chunk and ``(u64 LE length, 32 zero bytes)`` for each zero run, adjacent zero runs joined (a
    segment boundary may split one), so every snapshot of the same image with the same cuts has the same
    digest, whichever way it was taken.
    """

    def __init__(self) -> None:
        self._hasher = blake3.blake3(EXTENTS_DIGEST_CONTEXT)
        self._pending = bytearray()
        self._zeros = 0

    def add(self, segment: Segment) -> None:
        out = self._pending
        pack = _EXTENT.pack
        for length, id_ in zip(segment.lengths, segment.ids, strict=True):
            if id_ is None:
                self._zeros += length
                continue
            if self._zeros:
                out += pack(self._zeros) + _NO_ID
                self._zeros = 0
            out += pack(length) + id_
        if len(out) >= 1 << 20:
            self._hasher.update(out)
            out.clear()

    def digest(self) -> bytes:
        if self._zeros:
            self._pending += _EXTENT.pack(self._zeros) + _NO_ID
            self._zeros = 0
        self._hasher.update(self._pending)
        self._pending.clear()
        return self._hasher.digest()


_EXTENT = struct.Struct("<Q")
_NO_ID = bytes(ID_LEN)


@dataclass
class SnapshotRecord:
    name: str
    time: str  # ISO 8601 with zone
    size: int
    image_hash: bytes  # blake3-256 of the whole image, or (hash_of "extents") its ExtentsDigest
    segments: list[tuple[bytes, int]]  # (segment id, length)
    source: str = ""
    host: str = ""
    tags: list[str] = field(default_factory=list)
    chunker: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    # The source (a regular file) changed while it was read: the image may match no moment of the disk.
    changed_during_read: bool = False
    # What ``image_hash`` is the hash of: the image's bytes, or (an incremental snapshot's) its extents.
    hash_of: str = HASH_OF_IMAGE
    id: bytes = b""  # blake3 of the encoded record; set by encode()/decode()

    @property
    def hash_derived(self) -> bool:
        return self.hash_of == HASH_OF_EXTENTS

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
            # Version 2 only for a derived hash: a reader that knows only version 1 refuses the record rather
            # than compare a restored image with a hash that is not the image's.
            "v": DERIVED_SNAPSHOT_VERSION if self.hash_derived else SNAPSHOT_VERSION,
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
        if self.hash_derived:
            doc["hash_of"] = HASH_OF_EXTENTS
        raw = msgpack.packb(doc, use_bin_type=True)
        self.id = blob_id(raw)
        return raw

    @classmethod
    def decode(cls, raw: bytes) -> SnapshotRecord:
        try:
            # Bound arrays by the input (each item takes a byte), not by a length a damaged header claims.
            doc = msgpack.unpackb(raw, raw=False, use_list=True, max_array_len=min(len(raw), 1 << 24))
            if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] not in _HASH_OF_BY_VERSION:
                raise ValueError("unknown snapshot record version")
            hash_of = _field(doc, "hash_of", str, HASH_OF_IMAGE)
            if hash_of != _HASH_OF_BY_VERSION[doc["v"]]:
                raise ValueError(f"a version {doc['v']} record's hash is not of the {hash_of}")
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
                hash_of=hash_of,
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


_HASH_OF_BY_VERSION = {SNAPSHOT_VERSION: HASH_OF_IMAGE, DERIVED_SNAPSHOT_VERSION: HASH_OF_EXTENTS}
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
