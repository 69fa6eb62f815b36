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
exec .venv/bin/python -m pytest -q "$@"
