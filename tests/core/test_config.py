from __future__ import annotations

import json

import pytest

from dedupimg.core.config import ChunkerParams, Config, SealedConfig, parse_config_file
from dedupimg.core.errors import EXIT_CODES, DedupimgError, UnsupportedFormat


def test_round_trip():
    c = Config(chunker=ChunkerParams.for_average(4096), pack_size=1 << 20)
    assert Config.from_bytes(c.to_bytes()) == c


def test_unsupported_version():
    doc = json.loads(Config().to_bytes())
    doc["version"] = 99
    with pytest.raises(UnsupportedFormat, match="version 99 is not supported"):
        Config.from_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "raw",
    [b"", b"garbage", b"[]", b'{"format": "dedupimg"}', b'{"format": "other", "version": 1}', b"\xff\xfe"],
)
def test_garbage_is_a_clear_error(raw):
    with pytest.raises(UnsupportedFormat):
        Config.from_bytes(raw)


@pytest.mark.parametrize("repo_id", ["../../victim", "/etc", "0123456789ABCDEF0123456789abcdef", "", 7, None])
def test_a_repo_id_is_32_hex_digits_never_a_path(repo_id):
    """Found by review: a remote repository's id names this host's cache directory, and a config from the
    store could make it "../x" or an absolute path, whose index/ the cache code would then remove."""
    doc = json.loads(Config().to_bytes())
    doc["repo_id"] = repo_id
    with pytest.raises(UnsupportedFormat, match="repo_id"):
        Config.from_bytes(json.dumps(doc).encode())
    sealed = SealedConfig("0" * 32, "aes-256-gcm", b"x")
    doc = json.loads(sealed.to_bytes())
    doc["repo_id"] = repo_id
    with pytest.raises(UnsupportedFormat, match="repo_id"):
        parse_config_file(json.dumps(doc).encode())
    assert parse_config_file(sealed.to_bytes()) == sealed


def test_out_of_range_parameters_are_rejected():
    doc = json.loads(Config().to_bytes())
    doc["chunker"]["max_size"] = 1 << 40
    with pytest.raises(UnsupportedFormat):
        Config.from_bytes(json.dumps(doc).encode())


def test_every_error_class_has_a_documented_code():
    def walk(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    for cls in [DedupimgError, *walk(DedupimgError)]:
        assert cls.exit_code in EXIT_CODES, cls


def test_new_repositories_cut_smaller_segments_but_a_missing_key_keeps_its_old_meaning():
    """init writes cut_mask 0x7F (benchmarks/segments.py); a config that leaves the key out was written for
    the old default and must keep cutting as it did (docs/format.md §1.1), or its snapshots' segments change."""
    assert Config().segments.cut_mask == 0x7F
    assert json.loads(Config().to_bytes())["segments"]["cut_mask"] == 0x7F
    doc = json.loads(Config().to_bytes())
    del doc["segments"]["cut_mask"]
    assert Config.from_bytes(json.dumps(doc).encode()).segments.cut_mask == 0x3FF
