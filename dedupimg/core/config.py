"""The repository config file: format version and every parameter that shapes the stored data.

It is JSON so that a person can read it. Parameters that decide chunk boundaries, hashing or segment cuts are
format: they are fixed when the repository is created and never change afterwards.
"""

from __future__ import annotations

import base64
import json
import re
import reprlib
import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dedupimg.core.errors import UnsupportedFormat, UsageError

FORMAT_NAME = "dedupimg"
FORMAT_VERSION = 1  # unencrypted repositories
ENCRYPTED_VERSION = 2  # encrypted: sealed blobs and trailers (docs/format.md §10)
# Versions 3 and 4 are 1 and 2 with chunks stored as deltas on another chunk (codec DELTA, docs/format.md §11):
# what ``init`` makes now. 1 and 2 stay readable and writable, without deltas, as the older dedupimg made them.
DELTA_VERSION = 3
ENCRYPTED_DELTA_VERSION = 4
VERSIONS = (FORMAT_VERSION, ENCRYPTED_VERSION, DELTA_VERSION, ENCRYPTED_DELTA_VERSION)
ENCRYPTED_VERSIONS = (ENCRYPTED_VERSION, ENCRYPTED_DELTA_VERSION)
NO_ENCRYPTION = "none"
DEFAULT_PADDING = 64  # an encrypted blob's stored span is a multiple of this (docs/security.md)

DEFAULT_CHUNK_SIZE = 16384
DEFAULT_MAX_UNUSED = 0.05  # prune rewrites a pack once more than this share of it is unused
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC 2020 as implemented by pyfastcdc (pinned: see docs/format.md)."""

    algorithm: str = "fastcdc2020"
    avg_size: int = DEFAULT_CHUNK_SIZE
    min_size: int = DEFAULT_CHUNK_SIZE // 4
    max_size: int = DEFAULT_CHUNK_SIZE * 4
    normalized_chunking: int = 1
    seed: int = 0

    @classmethod
    def for_average(cls, avg_size: int) -> ChunkerParams:
        if avg_size & (avg_size - 1) or not MIN_CHUNK_SIZE <= avg_size <= MAX_CHUNK_SIZE:
            raise UsageError(
                f"chunk size must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}, got {avg_size}"
            )
        return cls(avg_size=avg_size, min_size=avg_size // 4, max_size=avg_size * 4)


@dataclass(frozen=True)
class SegmentParams:
    """How a snapshot's extent list is cut into content-addressed manifest segments. These defaults are what
    a config that leaves a key out means (docs/format.md §1.1); new repositories get NEW_SEGMENTS."""

    # Cut after a chunk extent whose id's last two bytes (little endian) & mask == 0: ~1 in (mask+1) extents.
    cut_mask: int = 0x3FF
    max_extents: int = 4096
    # A zero run at least this long ends its segment, so holes act as stable segment separators.
    zero_cut: int = 1 << 20


# New repositories end a segment after ~1 chunk in 128 (~2.5 MiB of image), not 1024: a later version stores
# every segment holding a changed chunk again (in a pack and in the index), so where changes are few or
# clustered smaller segments store far less (1 GiB tar, 3 changed files: 0.7 against 2.7 MB per version); where
# they are everywhere (1% of a VM disk's blocks) every segment changes either way and the smaller ones cost
# 0.4-2.5% more (index rows and page slack). benchmarks/segments.py; docs/performance.md.
NEW_SEGMENTS = SegmentParams(cut_mask=0x7F)


@dataclass(frozen=True)
class Config:
    repo_id: str = field(default_factory=lambda: secrets.token_hex(16))
    chunker: ChunkerParams = field(default_factory=ChunkerParams)
    segments: SegmentParams = NEW_SEGMENTS
    compression: str = "zstd"
    compression_level: int = 1  # at 16 KiB chunks, level 3 costs twice the CPU for ~1% (docs/performance.md)
    pack_size: int = 32 << 20
    version: int = DELTA_VERSION
    encryption: str = NO_ENCRYPTION  # or an AEAD of core/crypto.py (then version 2 or 4)
    padding: int = DEFAULT_PADDING  # encrypted only

    @property
    def encrypted(self) -> bool:
        return self.encryption != NO_ENCRYPTION

    @property
    def deltas(self) -> bool:
        """Whether chunks may be stored as deltas on another chunk (format versions 3 and 4)."""
        return self.version in (DELTA_VERSION, ENCRYPTED_DELTA_VERSION)

    def to_bytes(self) -> bytes:
        """The config as JSON; an encrypted repository's, the document that is sealed into its config file."""
        doc: dict[str, Any] = {"format": FORMAT_NAME, "version": self.version, "hash": "blake3-256"}
        doc.update(asdict(self))
        if not self.encrypted:  # unencrypted configs stay byte for byte as version 1 wrote them
            del doc["encryption"], doc["padding"]
        else:
            doc["chunker"]["seed"] = 0  # the key's (core/crypto.py MasterKeys), never written here
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "config") -> Config:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
                raise ValueError("not a dedupimg config")
            version = doc.get("version")
            if type(version) is not int or version not in VERSIONS:  # not true, not 1.0
                raise UnsupportedFormat(
                    f"{where}: repository format version {reprlib.repr(version)} is not supported "
                    f"(this dedupimg reads versions {', '.join(map(str, VERSIONS[:-1]))} and {VERSIONS[-1]})"
                )
            encryption = doc.get("encryption", NO_ENCRYPTION)
            if (encryption == NO_ENCRYPTION) == (version in ENCRYPTED_VERSIONS) or not isinstance(encryption, str):
                raise ValueError("encryption does not match the format version")
            if doc.get("hash") != "blake3-256" or doc.get("compression") != "zstd":
                raise ValueError("unknown hash or compression")
            chunker = ChunkerParams(**_section(doc, "chunker", ChunkerParams))
            if chunker.algorithm != "fastcdc2020":
                raise ValueError(f"unknown chunker {reprlib.repr(chunker.algorithm)}")
            config = cls(
                repo_id=_repo_id(doc["repo_id"]),
                chunker=chunker,
                segments=SegmentParams(**_section(doc, "segments", SegmentParams)),
                compression="zstd",
                compression_level=_int(doc["compression_level"], "compression_level"),
                pack_size=_int(doc["pack_size"], "pack_size"),
                version=version,
                encryption=encryption,
                padding=_int(doc.get("padding", DEFAULT_PADDING), "padding"),
            )
            _check_ranges(config)
            return config
        except UnsupportedFormat:
            raise
        except KeyError as exc:
            raise UnsupportedFormat(f"{where}: damaged repository config (no {exc} key)") from None
        except (ValueError, TypeError, RecursionError) as exc:
            message = " ".join(str(exc).split())  # on one line: messages may quote the damaged input
            raise UnsupportedFormat(f"{where}: damaged or unknown repository config ({message})") from None


def _repo_id(value: object) -> str:
    """A repository id as ``init`` makes it: 32 lowercase hex digits. It names this host's cache directory of
    a remote repository, so a config from an untrusted store must not smuggle a path into it ("..", "/")."""
    if not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value)):
        raise ValueError(f"repo_id {reprlib.repr(value)} is not 32 hex digits")
    return value


def _section(doc: dict[str, Any], key: str, kind: type) -> dict[str, Any]:
    """``doc[key]``: an object whose keys are fields of the dataclass ``kind`` (missing ones take defaults)."""
    section = doc[key]
    if not isinstance(section, dict):
        raise ValueError(f"{key} is not an object")
    unknown = set(section) - {f.name for f in fields(kind)}
    if unknown:
        raise ValueError(f"unknown {key} keys {reprlib.repr(sorted(unknown))}")
    return section


def _int(value: Any, name: str) -> int:
    if type(value) is not int:  # not true/false, not a float (json reads 1e999 as inf)
        raise ValueError(f"{name} is not an integer")
    return value


def _check_ranges(config: Config) -> None:
    c = config.chunker
    for params in (c, config.segments):  # the int fields must be ints: not true/false, not 1.5 or inf
        for f in fields(params):
            if f.name != "algorithm" and type(getattr(params, f.name)) is not int:
                raise ValueError(f"{f.name} is not an integer")
    if not (256 <= c.avg_size <= 4 << 20 and 64 <= c.min_size <= c.avg_size <= c.max_size <= 16 << 20):
        raise ValueError("chunker sizes out of range")
    if not 0 <= c.normalized_chunking <= 3:
        raise ValueError("normalized_chunking out of range")
    if not (1 <= config.segments.max_extents <= 1 << 20 and 0 <= config.segments.cut_mask < 1 << 16):
        raise ValueError("segment parameters out of range")
    # 4 KiB packs only make sense in tests (tests/ops/test_state_machine.py hits every pack boundary with them).
    if not 1 <= config.padding <= 4096:
        raise ValueError("padding out of range")
    if not (1 << 12 <= config.pack_size <= 1 << 30 and -7 <= config.compression_level <= 22):
        raise ValueError("pack size or compression level out of range")


@dataclass(frozen=True)
class SealedConfig:
    """What an encrypted repository's config file shows: enough to find and use its keys, nothing else."""

    repo_id: str
    encryption: str
    sealed: bytes  # the Config JSON, sealed under the master key (repo/keys.py opens it)

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT_NAME, "version": ENCRYPTED_VERSION, "repo_id": self.repo_id,
               "encryption": self.encryption, "sealed": base64.b64encode(self.sealed).decode()}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def parse_config_file(data: bytes, where: str = "config") -> Config | SealedConfig:
    """A config file: the Config of an unencrypted repository, or what an encrypted one's shows."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT_NAME and doc.get("version") == ENCRYPTED_VERSION
            and "sealed" in doc):
        return Config.from_bytes(data, where)
    try:
        repo_id, encryption = _repo_id(doc["repo_id"]), doc["encryption"]
        if not (isinstance(encryption, str) and isinstance(doc["sealed"], str)):
            raise ValueError("a field has the wrong type")
        return SealedConfig(repo_id, encryption, base64.b64decode(doc["sealed"].encode(), validate=True))
    except (KeyError, ValueError) as exc:
        raise UnsupportedFormat(f"{where}: damaged repository config ({' '.join(str(exc).split())})") from None
