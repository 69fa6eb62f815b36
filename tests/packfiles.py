"""Pack files of a local repository, for tests that look at or damage them on disk.

dedupimg reaches packs only through its store (dedupimg/store); tests of local repositories may touch the
files themselves. These helpers read them with the local store's checks (non-blocking open, regular files only).
"""

from __future__ import annotations

from pathlib import Path

from dedupimg.repo import keys, pack
from dedupimg.repo.repository import Repository
from dedupimg.store.local import LocalReader, LocalStore


def pack_file(repo: Repository | Path, pack_id: bytes) -> Path:
    """The file of pack ``pack_id`` in a local repository (``packs/xx/<id>.pack``)."""
    root = repo.path if isinstance(repo, Repository) else repo
    return root / pack.pack_name(pack_id)


def pack_files(repo: Repository | Path) -> list[Path]:
    """Every ``packs/xx/*.pack`` entry but directories, in order (what prune, check and repair look at)."""
    root = repo.path if isinstance(repo, Repository) else repo
    return [root / obj.name for obj in pack.list_packs(LocalStore(root))]


def open_file(path: Path) -> LocalReader:
    """A reader of the pack file ``path``; its messages name the path."""
    return LocalStore(path.parent).open(path.name)


def blob_format(path: Path) -> pack.BlobFormat:
    """How the blobs of the pack file ``path`` are laid out: plain, or sealed with the keys of its repository
    (the repository that holds it, opened with the test password: tests/conftest.py)."""
    if path.parent.parent.name != "packs":
        return pack.PLAIN  # a pack file on its own (tests of the format)
    return repo_format(path.parent.parent.parent)


def repo_format(root: Path) -> pack.BlobFormat:
    """The blob format of the local repository at ``root`` (plain when there is none)."""
    if not (root / "config").is_file():
        return pack.PLAIN
    config, unlocked, store = Repository.read_config_and_keys(root)
    store.close()
    return pack.PLAIN if unlocked is None else keys.blob_format(config, unlocked.master)


def trailer(path: Path) -> list[pack.BlobEntry]:
    """The trailer rows of the pack file ``path``, with every check of pack.read_trailer."""
    with open_file(path) as reader:
        return pack.read_trailer(reader, blob_format(path))


def write_pack(root: Path, blobs: list[tuple[int, bytes, int, bytes, int]]) -> tuple[bytes, Path, int]:
    """Write a pack of ``blobs`` (type, id, codec, stored, raw_len) into the local store at ``root`` (which
    has ``tmp/``), durable but in no index; returns (pack id, its file, its size)."""
    writer = pack.PackWriter(LocalStore(root).create(), repo_format(root))
    for type_, id_, codec, stored, raw_len in blobs:
        writer.add(type_, id_, codec, stored, raw_len)
    pack_id, size = writer.finish()
    return pack_id, root / pack.pack_name(pack_id), size
