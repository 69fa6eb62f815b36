#!/usr/bin/env bash
# Benchmark dedupimg against restic, borg and bup on three image series; writes benchmarks/results/latest.{md,json}.
#   bash benchmarks/run.sh                  # --scale small (default): a few minutes
#   bash benchmarks/run.sh --scale full     # 4 GiB / 2 GiB / 1 GiB images: well under an hour
# Other options go to bench.py (see: .venv/bin/python benchmarks/bench.py --help). Needs root (loop mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
command -v restic >/dev/null 2>&1 || missing+=(restic)
command -v borg >/dev/null 2>&1 || missing+=(borgbackup)
command -v bup >/dev/null 2>&1 || missing+=(bup)
if [ ${#missing[@]} -gt 0 ]; then
  echo "run.sh: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export PATH="$PATH:/sbin:/usr/sbin"
exec .venv/bin/python benchmarks/bench.py "$@"
