"""Ids: every blob (chunk, manifest segment, snapshot record, tombstone) is named by the blake3-256 of its raw
bytes, so any blob read back can be checked against its name."""

from __future__ import annotations

import blake3

ID_LEN = 32

# Blob types (docs/format.md §4.1)
CHUNK = 0
SEGMENT = 1
SNAPSHOT = 2
TOMBSTONE = 3  # msgpack list of forgotten snapshot ids: repair index must not bring them back
BLOB_TYPES = (CHUNK, SEGMENT, SNAPSHOT, TOMBSTONE)


def blob_id(raw: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(raw).digest()
