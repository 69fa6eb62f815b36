from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import small_repo  # noqa: E402
from tests.s3server import private_s3, s3_credentials, s3_server  # noqa: E402,F401  (fixtures for every folder)

# Property tests run a fixed set of examples by default, so that a run is repeatable and a red CI run means
# a change broke something. HYPOTHESIS_PROFILE=explore draws new examples: run it now and then (it has found
# real bugs, in decoders and in the tests themselves).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
def repo(tmp_path: Path):
    r = small_repo(tmp_path / "repo")
    yield r
    r.close()
