#!/usr/bin/env bash
# Sets up a fresh Debian machine (scripts/setup.sh) and runs the whole test suite with the linters and the
# import contracts.
# The suite needs root for loop mounts, tmpfs and capability tests, as CI has.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check dedupimg tests benchmarks examples
.venv/bin/mypy dedupimg
.venv/bin/lint-imports --no-cache  # the import contracts in pyproject.toml (ARCHITECTURE.md)
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
# The CLI tests make encrypted repositories (init's default): their quick ones once more with unencrypted
# repositories (format 3); the library tests run on both kinds already (tests/conftest.py's repo fixture).
DEDUPIMG_ENCRYPTION=none exec .venv/bin/python -m pytest -q -m "not slow and not encrypted_only" tests/cli
