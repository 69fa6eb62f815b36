from __future__ import annotations

from pathlib import Path

import pytest

from dedupimg.core.errors import IntegrityError
from dedupimg.repo import pack
from dedupimg.store.local import LocalStore
from dedupimg.store.memory import MemoryReader, MemoryStore
from tests.helpers import det_bytes, text_bytes
from tests.packfiles import open_file, trailer, write_pack


def _write_pack(tmp_path: Path) -> tuple[Path, list[bytes]]:
    LocalStore(tmp_path).initialize(pack.pack_levels())
    comp = pack.Compressor(3)
    blobs = [text_bytes(1, 50_000), det_bytes(2, 30_000), b"x", text_bytes(3, 7)]
    pack_id, path, size = write_pack(tmp_path, [(pack.CHUNK, pack.blob_id(b), *comp.encode(b), len(b)) for b in blobs])
    assert path.stat().st_size == size
    assert path.read_bytes()[-pack.FOOTER.size:][16:48] == pack_id  # the id is the trailer's hash
    assert path == tmp_path / "packs" / pack_id.hex()[:2] / f"{pack_id.hex()}.pack"
    assert list((tmp_path / "tmp").iterdir()) == []
    return path, blobs


def test_round_trip_without_index(tmp_path: Path):
    path, blobs = _write_pack(tmp_path)
    entries = trailer(path)
    assert [e.id for e in entries] == [pack.blob_id(b) for b in blobs]
    assert entries[0].codec == pack.ZSTD and entries[0].stored_len < 50_000  # text compresses
    assert entries[1].codec == pack.RAW  # random data is stored raw
    with open_file(path) as reader:
        for e, b in zip(entries, blobs, strict=True):
            assert pack.read_blob(reader, e, "t") == (pack.CHUNK, b)
        locs = [(e.offset, e.id, e.type, e.stored_len) for e in entries]
        run = pack.read_blob_run(reader, 8, entries[-1].end - 8, locs, "t")
    assert run == blobs
    info = pack.read_pack_info(MemoryReader(path.read_bytes()))
    assert (info.size, info.trailer_offset, info.entries) == (path.stat().st_size, entries[-1].end, entries)
    assert pack.pack_name(info.id) == str(path.relative_to(tmp_path))


def test_the_same_pack_in_any_store(tmp_path: Path):
    """The bytes of a pack depend on its blobs only, not on the store it is written to."""
    path, blobs = _write_pack(tmp_path)
    store = MemoryStore()
    writer = pack.PackWriter(store.create(), pack.PLAIN)
    for e in trailer(path):
        raw = path.read_bytes()[e.data_offset : e.data_offset + e.stored_len]
        writer.add(e.type, e.id, e.codec, raw, e.raw_len)
    pack_id, size = writer.finish()
    assert store.read(pack.pack_name(pack_id)) == path.read_bytes() and size == path.stat().st_size
    assert [o.name for o in pack.list_packs(store)] == [pack.pack_name(pack_id)]


def test_an_aborted_pack_leaves_nothing(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.initialize(pack.pack_levels())
    writer = pack.PackWriter(store.create(), pack.PLAIN)
    writer.add(pack.CHUNK, pack.blob_id(b"x"), pack.RAW, b"x", 1)
    writer.abort()
    assert pack.list_packs(store) == [] and store.list("tmp/").objects == []


def test_list_packs_skips_directories_and_other_names(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.initialize(pack.pack_levels())
    (tmp_path / "packs" / "ab" / ("ab" * 32 + ".pack")).mkdir()
    (tmp_path / "packs" / "ab" / "notes.txt").write_text("x")
    (tmp_path / "packs" / "stray.pack").write_text("x")  # not in a packs/xx level
    (tmp_path / "packs" / "abc").mkdir()
    (tmp_path / "packs" / "abc" / ("ab" * 32 + ".pack")).write_text("x")
    (tmp_path / "packs" / "cd" / "odd.pack").write_text("xy")
    skipped: list[str] = []
    assert pack.list_packs(store, skipped) == [pack.ObjectInfo("packs/cd/odd.pack", 2)]
    assert skipped == ["packs/ab/" + "ab" * 32 + ".pack"]


def test_flipped_byte_in_blob_is_detected(tmp_path: Path):
    path, blobs = _write_pack(tmp_path)
    entries = trailer(path)
    data = bytearray(path.read_bytes())
    data[entries[1].data_offset + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with open_file(path) as reader:
        pack.read_blob(reader, entries[0], "t")  # neighbours are fine
        with pytest.raises(IntegrityError, match="fails its hash"):
            pack.read_blob(reader, entries[1], "t")


def test_flipped_byte_in_compressed_blob_is_detected(tmp_path: Path):
    path, _ = _write_pack(tmp_path)
    entries = trailer(path)
    data = bytearray(path.read_bytes())
    data[entries[0].data_offset + entries[0].stored_len // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with open_file(path) as reader, pytest.raises(IntegrityError):
        pack.read_blob(reader, entries[0], "t")


@pytest.mark.parametrize("cut", [1, 10, 56, 57, 500, 20_000])
def test_truncated_pack_is_detected(tmp_path: Path, cut: int):
    path, _ = _write_pack(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    with pytest.raises(IntegrityError, match=str(path)):
        trailer(path)


def test_damaged_trailer_is_detected(tmp_path: Path):
    path, _ = _write_pack(tmp_path)
    data = bytearray(path.read_bytes())
    data[-pack.FOOTER.size - 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="trailer"):
        trailer(path)


def test_not_a_pack(tmp_path: Path):
    p = tmp_path / "x.pack"
    p.write_bytes(b"hello world" * 20)
    with pytest.raises(IntegrityError, match="not a pack"):
        trailer(p)
