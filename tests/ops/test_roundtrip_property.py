"""Random images with random edits round-trip bit-exact through the public API."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedupimg.ops.restore import restore
from dedupimg.ops.snapshot import take_snapshot
from tests.helpers import det_bytes, small_repo, text_bytes, write_image

BLOCK = 4096

edit = st.one_of(
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 20), st.integers(1, 20_000), st.integers(0, 999)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.integers(1, 20_000), st.integers(0, 999)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 20_000), st.just(0)),
    st.tuples(st.just("zeros"), st.integers(0, 1 << 20), st.integers(1, 60_000), st.just(0)),
)


def apply(image: bytes, op: tuple[str, int, int, int]) -> bytes:
    kind, pos, n, seed = op
    pos = pos % (len(image) + 1)
    if kind == "overwrite":
        return image[:pos] + det_bytes(seed, n) + image[pos + n :]
    if kind == "insert":
        return image[:pos] + text_bytes(seed, n) + image[pos:]
    if kind == "delete":
        return image[:pos] + image[pos + n :]
    return image[:pos] + bytes(n) + image[pos + n :]


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.tuples(st.integers(0, 300_000), st.integers(0, 99), st.booleans()),
    versions=st.lists(st.lists(edit, min_size=1, max_size=5), min_size=1, max_size=3),
    holes=st.booleans(),
)
def test_versions_round_trip_bit_exact(base, versions, holes):
    size, seed, texty = base
    image = text_bytes(seed, size) if texty else det_bytes(seed, size)
    images = [image]
    for ops in versions:
        for op in ops:
            image = apply(image, op)
        images.append(image)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        with small_repo(t / "repo") as repo:
            ids = []
            for img in images:
                write_image(t / "disk.img", img, holes)
                ids.append(take_snapshot(repo, str(t / "disk.img")).record.hex_id)
            for i, (sid, img) in enumerate(zip(ids, images, strict=True)):
                out = t / f"out{i}.img"
                restore(repo, sid, str(out))
                assert out.read_bytes() == img
