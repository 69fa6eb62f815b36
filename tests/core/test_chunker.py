"""Chunk boundaries are on-disk format: these golden values must never change.

Future chunker optimisations must not change them, or existing repositories stop deduplicating against new
snapshots (borg's fastcdc_test.py says the same). If this test fails, the format changed.
"""

from __future__ import annotations

import blake3
import pyfastcdc
from hypothesis import given, settings
from hypothesis import strategies as st

from dedupimg.core.chunker import Chunker
from dedupimg.core.config import ChunkerParams
from tests.helpers import det_bytes, text_bytes

GOLDEN_DEFAULT = [
    27178, 34830, 76660, 83404, 126781, 151750, 191435, 213720, 233791, 274325, 296014, 314970, 342103,
    387823, 408929, 425069, 442137, 455251, 481291, 485957, 491972, 517500, 528423, 548336, 572039, 577224,
    604528, 611318, 632622, 655118, 665827, 683707, 688622, 694103, 711647, 732546, 766197, 783617, 798224,
    811179, 827732, 847678, 867728, 886759, 911717, 925470, 934206, 952928, 962419, 980797, 997433, 1038096,
    1048576,
]
GOLDEN_SMALL_TEXT_HEAD = [699, 2450, 4283, 5321, 6965, 7462, 9075, 10147, 12425, 13483, 13758, 14947]
GOLDEN_SMALL_TEXT_DIGEST = "61ecd0e4378835c181f9761e52455927ac82bf0bf3189f67313d3ed95f82bd03"


def test_pyfastcdc_is_the_pinned_version_with_its_cython_core():
    assert pyfastcdc.__version__ == "0.3.1"
    assert pyfastcdc.FastCDC.__module__.startswith("pyfastcdc.cy")


def test_golden_cut_points_default_parameters():
    assert Chunker(ChunkerParams()).cut_points(det_bytes(1, 1 << 20)) == GOLDEN_DEFAULT


def test_golden_cut_points_small_chunks_on_text():
    cuts = Chunker(ChunkerParams.for_average(1024)).cut_points(text_bytes(2, 1 << 20))
    assert len(cuts) == 702
    assert cuts[:12] == GOLDEN_SMALL_TEXT_HEAD
    assert blake3.blake3(repr(cuts).encode()).hexdigest() == GOLDEN_SMALL_TEXT_DIGEST


def test_default_parameters_are_frozen():
    p = ChunkerParams()
    assert (p.avg_size, p.min_size, p.max_size, p.normalized_chunking, p.seed) == (16384, 4096, 65536, 1, 0)


def test_buffer_size_does_not_change_cut_points():
    data = det_bytes(3, 3 << 20)
    params = ChunkerParams.for_average(4096)
    reference = Chunker(params, buffer_size=64 << 20).cut_points(data)
    for size in (2 * params.max_size, 100_000, 1 << 20):
        assert Chunker(params, buffer_size=size).cut_points(data) == reference


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=40_000), st.integers(min_value=1, max_value=4))
def test_chunks_tile_the_input_exactly(data: bytes, shift: int):
    params = ChunkerParams.for_average(1024)
    cuts = Chunker(params, buffer_size=params.max_size * 2 * shift).cut_points(data)
    if not data:
        assert cuts == []
        return
    assert cuts[-1] == len(data)
    assert cuts == sorted(set(cuts))
    sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
    assert all(s <= params.max_size for s in sizes)
    assert all(s >= params.min_size for s in sizes[:-1])


def test_rejects_chunk_sizes_that_are_not_powers_of_two():
    import pytest

    from dedupimg.core.errors import UsageError

    with pytest.raises(UsageError):
        ChunkerParams.for_average(3000)
    with pytest.raises(UsageError):
        ChunkerParams.for_average(512)
