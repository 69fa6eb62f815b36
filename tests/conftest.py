from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import small_repo  # noqa: E402


@pytest.fixture
def repo(tmp_path: Path):
    r = small_repo(tmp_path / "repo")
    yield r
    r.close()
