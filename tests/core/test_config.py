from __future__ import annotations

import json

import pytest

from dedupimg.core.config import ChunkerParams, Config
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
