"""Issue 17 on a repository in S3: a tag made on one host replaces the record for every other host (their
caches sync the new record and the tombstone from one index object); stats and diff read the cache only."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import det_bytes, ok, run_cli


@pytest.mark.slow
def test_tag_on_one_host_replaces_the_record_for_another(s3_server: Any, s3_credentials: None,
                                                           tmp_path: Path) -> None:
    location = f"s3:{s3_server.endpoint}/{s3_server.bucket}/everyday-{uuid.uuid4().hex[:12]}"

    def dd(*args: Any, host: str) -> str:
        return ok(run_cli("-r", location, *args, env={"DEDUPIMG_CACHE_DIR": str(tmp_path / f"cache-{host}")}))

    dd("init", "--chunk-size", "4096", host="a")
    image = tmp_path / "disk.img"
    image.write_bytes(det_bytes(1, 200_000))
    first = json.loads(dd("snapshot", image, "--name", "disk", "--json", host="a"))["id"]
    image.write_bytes(det_bytes(1, 100_000) + det_bytes(2, 100_000))
    second = json.loads(dd("snapshot", image, "--name", "disk", "--json", host="b"))["id"]
    changed = json.loads(dd("tag", first[:12], "--add", "keep", "--json", host="b"))["changed"]
    new = changed[0]["id"]
    for host in ("a", "b", "c"):  # c: a fresh cache, rebuilt from the index objects
        listing = json.loads(dd("snapshots", "--json", host=host))
        assert [(s["id"], s["tags"]) for s in listing] == [(new, ["keep"]), (second, [])], host
    stats = json.loads(dd("stats", "--json", host="a"))
    assert [s["id"] for s in stats["snapshots"]] == [new, second]
    diff = json.loads(dd("diff", new, second, "--json", host="c"))
    assert len(diff["ranges"]) == 1 and diff["ranges"][0]["offset"] <= 100_000
    dd("repair", "index", host="a")
    assert [s["id"] for s in json.loads(dd("snapshots", "--json", host="a"))] == [new, second]
    assert json.loads(dd("check", "--json", host="b"))["ok"] is True
