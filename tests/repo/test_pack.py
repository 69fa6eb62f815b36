from __future__ import annotations

import os
from pathlib import Path

import pytest

from dedupimg.core.errors import IntegrityError
from dedupimg.repo import pack
from tests.helpers import det_bytes, text_bytes


def _write_pack(tmp_path: Path) -> tuple[Path, list[bytes]]:
    (tmp_path / "tmp").mkdir()
    packs = tmp_path / "packs"
    for i in range(256):
        (packs / f"{i:02x}").mkdir(parents=True)
    comp = pack.Compressor(3)
    blobs = [text_bytes(1, 50_000), det_bytes(2, 30_000), b"x", text_bytes(3, 7)]
    w = pack.PackWriter(tmp_path / "tmp")
    for b in blobs:
        codec, stored = comp.encode(b)
        w.add(pack.CHUNK, pack.blob_id(b), codec, stored, len(b))
    pack_id, path, size = w.finish(packs)
    assert path.stat().st_size == size
    assert path.read_bytes()[-pack.FOOTER.size:][16:48] == pack_id  # the id is the trailer's hash
    assert list((tmp_path / "tmp").iterdir()) == []
    return path, blobs


def test_round_trip_without_index(tmp_path: Path):
    path, blobs = _write_pack(tmp_path)
    entries = pack.read_trailer(path)
    assert [e.id for e in entries] == [pack.blob_id(b) for b in blobs]
    assert entries[0].codec == pack.ZSTD and entries[0].stored_len < 50_000  # text compresses
    assert entries[1].codec == pack.RAW  # random data is stored raw
    fd = os.open(path, os.O_RDONLY)
    try:
        for e, b in zip(entries, blobs, strict=True):
            assert pack.read_blob(fd, e.offset, e.id, "t") == (pack.CHUNK, b)
    finally:
        os.close(fd)


def test_flipped_byte_in_blob_is_detected(tmp_path: Path):
    path, blobs = _write_pack(tmp_path)
    entries = pack.read_trailer(path)
    data = bytearray(path.read_bytes())
    data[entries[1].data_offset + 100] ^= 0x01
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        pack.read_blob(fd, entries[0].offset, entries[0].id, "t")  # neighbours are fine
        with pytest.raises(IntegrityError, match="fails its hash"):
            pack.read_blob(fd, entries[1].offset, entries[1].id, "t")
    finally:
        os.close(fd)


def test_flipped_byte_in_compressed_blob_is_detected(tmp_path: Path):
    path, _ = _write_pack(tmp_path)
    entries = pack.read_trailer(path)
    data = bytearray(path.read_bytes())
    data[entries[0].data_offset + entries[0].stored_len // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(IntegrityError):
            pack.read_blob(fd, entries[0].offset, entries[0].id, "t")
    finally:
        os.close(fd)


@pytest.mark.parametrize("cut", [1, 10, 56, 57, 500, 20_000])
def test_truncated_pack_is_detected(tmp_path: Path, cut: int):
    path, _ = _write_pack(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    with pytest.raises(IntegrityError):
        pack.read_trailer(path)


def test_damaged_trailer_is_detected(tmp_path: Path):
    path, _ = _write_pack(tmp_path)
    data = bytearray(path.read_bytes())
    data[-pack.FOOTER.size - 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="trailer"):
        pack.read_trailer(path)


def test_not_a_pack(tmp_path: Path):
    p = tmp_path / "x.pack"
    p.write_bytes(b"hello world" * 20)
    with pytest.raises(IntegrityError):
        pack.read_trailer(p)
