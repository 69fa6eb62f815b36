"""Codecs: how a blob's raw bytes are stored (zstd, or raw when compressing does not pay)."""

from __future__ import annotations

import threading

import zstandard

from dedupimg.core.errors import IntegrityError

RAW = 0
ZSTD = 1
# One zstd frame compressed against another chunk's raw bytes (its *base*) as a raw-content dictionary: a chunk
# that a small write changed costs about the changed bytes, not the whole chunk again (docs/format.md §4.1a).
DELTA = 2
CODECS = (RAW, ZSTD, DELTA)

MAX_BLOB = 64 << 20  # no blob is larger: refuse to allocate more when decoding damaged input
# Keep the compressed form only when it saves at least this share: decompressing a barely smaller blob
# costs more at restore time than the bytes it saves.
MIN_SAVING = 1 / 32


class Compressor:
    """zstd with the raw fallback; safe to share between threads (one zstd context per thread)."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._local = threading.local()

    def encode(self, raw: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        zstd = getattr(self._local, "zstd", None)
        if zstd is None:
            zstd = self._local.zstd = zstandard.ZstdCompressor(level=self._level)
        packed = zstd.compress(raw)
        if len(packed) <= len(raw) - len(raw) * MIN_SAVING:
            return ZSTD, packed
        return RAW, bytes(raw)


def encode_delta(raw: bytes | bytearray | memoryview, base: bytes, level: int) -> bytes:
    """One zstd frame of ``raw`` compressed with ``base`` as a raw-content dictionary (codec DELTA)."""
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(level=level, dict_data=dictionary).compress(raw)


_local = threading.local()  # zstd contexts are not thread-safe: one per thread


def _plain_decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "zstd", None)
    if decompressor is None:
        decompressor = _local.zstd = zstandard.ZstdDecompressor()
    return decompressor


def decode_blob(codec: int, stored: bytes | memoryview, raw_len: int, base: bytes | None = None) -> bytes:
    """The raw bytes of a stored blob; ``base``: the raw bytes of a DELTA blob's base (None for others)."""
    if not 0 <= raw_len <= MAX_BLOB:
        raise IntegrityError(f"blob raw length {raw_len} is out of range")
    if codec == RAW:
        if len(stored) != raw_len:
            raise IntegrityError(f"raw blob has {len(stored)} bytes, its header says {raw_len}")
        return bytes(stored)
    if codec == DELTA and base is None:
        raise IntegrityError("delta blob read without its base")
    if codec in (ZSTD, DELTA):
        if codec == DELTA:
            assert base is not None
            dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            decompressor = zstandard.ZstdDecompressor(dict_data=dictionary)
        else:
            decompressor = _plain_decompressor()
        try:
            # zstandard allocates the size a frame header claims, whatever max_output_size says: refuse a
            # claim other than raw_len before decompressing (-1 = no size in the header: bounded by raw_len).
            claimed = zstandard.frame_content_size(stored)
            if claimed not in (-1, raw_len):
                raise IntegrityError(f"blob's zstd frame claims {claimed} bytes, its header says {raw_len}")
            raw = decompressor.decompress(stored, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"blob does not decompress: {exc}") from None
        if len(raw) != raw_len:
            raise IntegrityError("blob decompresses to the wrong length")
        return raw
    raise IntegrityError(f"blob has unknown codec {codec}")
