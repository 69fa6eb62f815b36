from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import small_repo  # noqa: E402
from tests.s3server import private_s3, s3_credentials, s3_server  # noqa: E402,F401  (fixtures for every folder)

# Every repository the CLI makes is encrypted unless a test asks otherwise: one password for all, and argon2id
# parameters that take a millisecond (the defaults take ~0.5 s, at every command's start). Subprocesses inherit.
os.environ.setdefault("DEDUPIMG_PASSWORD", "test-password")
os.environ.setdefault("DEDUPIMG_FROM_PASSWORD", "test-password")  # copy --from-repo, --copy-chunker-params-from
os.environ.setdefault("DEDUPIMG_ARGON2", "1,64,1")

# Property tests run a fixed set of examples by default, so that a run is repeatable and a red CI run means
# a change broke something. HYPOTHESIS_PROFILE=explore draws new examples: run it now and then (it has found
# real bugs, in decoders and in the tests themselves).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(params=["plain", "encrypted"])
def repo(tmp_path: Path, request: pytest.FixtureRequest):
    """A small-chunk repository of each kind: every test that takes it runs unencrypted and encrypted."""
    r = small_repo(tmp_path / "repo", encrypted=request.param == "encrypted")
    yield r
    r.close()
