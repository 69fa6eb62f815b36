"""Index objects: what a remote repository publishes per commit, so that every host's cache can follow.

A repository in an object store (S3) keeps its LMDB index as a local cache on each host
(docs/storage.md, "Remote repositories"). The store itself holds, besides packs and the config, one index
object per commit: ``index/<64 hex>`` (the blake3 of its bytes), zstd-compressed msgpack::

    {"v": 1, "packs": [[pack id, pack size,
                        [[type, codec, offset, raw_len, stored_len, id(, base)], ...],   # its trailer
                        [[id, codec, raw_len, stored bytes], ...]],              # its metadata blobs
                       ...]}

The metadata blobs (manifest segments, snapshot records, tombstones) are small: with them another host adds
a commit to its cache without reading the pack. An index object is written (and durable) after the packs it
lists and before the index transaction of the host that wrote it: it is the commit point for every other host.
A pack no index object lists was never committed (a crash, or a snapshot still running elsewhere).

Its name is its hash, so an object read back is checked whole; each metadata blob is checked against its id.
In an encrypted repository the whole object is sealed (``pack.BlobFormat.seal``, associated data
``DIMGIX2``) and named by the hash of the sealed bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgpack
import zstandard

from dedupimg.core.codecs import CODECS, MAX_BLOB, decode_blob
from dedupimg.core.errors import IntegrityError
from dedupimg.core.ids import BLOB_TYPES, CHUNK, blob_id
from dedupimg.repo import pack
from dedupimg.repo.index import NewBlob, SealedPack
from dedupimg.repo.pack import PLAIN, BlobFormat
from dedupimg.store import Store
from dedupimg.store.base import write_object

PREFIX = "index/"
VERSION = 1
FETCH_WORKERS = 8
MAX_OBJECT = 1 << 30  # refuse to inflate a damaged object beyond this
SEAL_AD = b"DIMGIX2"


@dataclass(frozen=True)
class PackListing:
    """One pack as an index object lists it: its rows, and the raw bytes of its metadata blobs by id."""

    sealed: SealedPack
    metadata: dict[bytes, bytes]


def encode(packs: Iterable[tuple[SealedPack, dict[bytes, tuple[int, bytes]]]], fmt: BlobFormat) -> bytes:
    """An index object listing ``packs``: each a sealed pack and its metadata blobs' (codec, stored bytes)."""
    doc = {"v": VERSION, "packs": [
        [sealed.id, sealed.size,
         [pack.trailer_row(b) for b in sealed.blobs],
         [[i, codec, _raw_len(sealed, i), stored] for i, (codec, stored) in sorted(meta.items())]]
        for sealed, meta in packs]}
    return fmt.seal(zstandard.ZstdCompressor(level=3).compress(msgpack.packb(doc, use_bin_type=True)), SEAL_AD)


def _raw_len(sealed: SealedPack, id_: bytes) -> int:
    for b in sealed.blobs:
        if b.id == id_:
            return b.raw_len
    raise IntegrityError(f"metadata blob {id_.hex()[:16]} is not in pack {sealed.id.hex()[:16]}")


def name_of(data: bytes) -> str:
    return PREFIX + blob_id(data).hex()


def decode(data: bytes, name: str, where: str, fmt: BlobFormat = PLAIN) -> list[PackListing]:
    """The packs an index object lists; IntegrityError (one line, ``where`` first) for any damage."""
    if name_of(data) != name:
        raise IntegrityError(f"{where}: index object does not match its name (damaged)")
    data = fmt.unseal(data, SEAL_AD, f"{where}: index object")
    try:
        doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_OBJECT),
                              raw=False, strict_map_key=False)
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise IntegrityError(f"unknown index object version {doc.get('v') if isinstance(doc, dict) else '?'}")
        out = []
        for pack_id, size, rows, meta in doc["packs"]:
            if not (isinstance(pack_id, bytes) and len(pack_id) == 32 and type(size) is int and size >= 0):
                raise IntegrityError("bad pack row")
            blobs = [NewBlob(e.type, e.codec, e.offset, e.stored_len, e.raw_len, e.id, e.base)
                     for e in (pack.parse_row(row, size) for row in rows)]
            if any(b.type not in BLOB_TYPES or b.codec not in CODECS or not _in_range(b.stored_len, MAX_BLOB)
                   or not _in_range(b.raw_len, MAX_BLOB) for b in blobs):
                raise IntegrityError("bad pack row")
            types = {b.id: b.type for b in blobs}
            raws: dict[bytes, bytes] = {}
            for i, codec, raw_len, stored in meta:
                if types.get(i, CHUNK) == CHUNK:
                    raise IntegrityError("a metadata blob that the pack does not list")
                raw = decode_blob(codec, stored, raw_len)
                if blob_id(raw) != i:
                    raise IntegrityError(f"metadata blob {i.hex()[:16]} does not match its id")
                raws[i] = raw
            out.append(PackListing(SealedPack(pack_id, size, blobs, name), raws))
        return out
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: damaged index object ({exc})") from None
    except (ValueError, TypeError, KeyError, zstandard.ZstdError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"{where}: damaged index object ({' '.join(str(exc).split())})") from None


def _in_range(value: object, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit


def publish(store: Store, packs: list[tuple[SealedPack, dict[bytes, tuple[int, bytes]]]], fmt: BlobFormat
            ) -> str:
    """Write (durably) one index object listing ``packs``; returns its name."""
    data = encode(packs, fmt)
    name = name_of(data)
    write(store, name, data)
    return name


def write(store: Store, name: str, data: bytes) -> None:
    write_object(store, name, data)


def names(store: Store) -> set[str]:
    return {o.name for o in store.list(PREFIX).objects}


def fetch(store: Store, wanted: Iterable[str], fmt: BlobFormat = PLAIN) -> dict[str, list[PackListing]]:
    """Read and check the index objects ``wanted`` (several at a time)."""
    wanted = sorted(wanted)

    def one(name: str) -> list[PackListing]:
        where = store.location(name)
        return decode(store.read(name, where=where), name, where, fmt)

    if len(wanted) <= 1:
        return {n: one(n) for n in wanted}
    with ThreadPoolExecutor(min(FETCH_WORKERS, len(wanted))) as pool:
        return dict(zip(wanted, pool.map(one, wanted), strict=True))
