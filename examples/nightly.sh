#!/usr/bin/env bash
# The nightly use case on an example VM disk: snapshot it every "night", list the snapshots, restore one
# and prove it bit-exact, keep only the newest two and free the rest, then check the repository.
# Sets up its own environment (scripts/setup.sh) on a fresh Debian machine.
#   bash examples/nightly.sh            # work files go to examples/work/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
WORK=examples/work
rm -rf "$WORK"; mkdir -p "$WORK"
export DEDUPIMG_REPO="$WORK/repo"          # a local directory repository
# An encrypted repository (the default): its password from a file only the owner reads (or DEDUPIMG_PASSWORD,
# --password-command, or asked on the terminal). Lose the password and the backups are lost with it.
(umask 077; head -c 24 /dev/urandom | base64 > "$WORK/password")
export DEDUPIMG_PASSWORD_FILE="$WORK/password"
DISK="$WORK/vm-disk.img"

.venv/bin/dedupimg init
$PY examples/make_vm_image.py "$DISK" --size-mib 256
for night in 1 2 3; do
  [ "$night" -gt 1 ] && $PY examples/make_vm_image.py "$DISK" --night "$night"
  [ "$night" -eq 2 ] && cp --sparse=always "$DISK" "$WORK/night2-original.img"
  .venv/bin/dedupimg snapshot "$DISK" --name vm-disk --tag nightly --json \
    | $PY -c "import json,sys; d=json.load(sys.stdin); print('night $night: snapshot', d['short_id'],
        'read', d['bytes_read'] >> 20, 'MiB, stored', d['bytes_stored'] >> 10, 'KiB new in', d['seconds'], 's')"
done
.venv/bin/dedupimg snapshots
SECOND=$(.venv/bin/dedupimg snapshots --json | $PY -c 'import json,sys; print(json.load(sys.stdin)[1]["id"])')
.venv/bin/dedupimg restore "$SECOND" "$WORK/restored-night2.img"
cmp "$WORK/restored-night2.img" "$WORK/night2-original.img" && echo "night 2 restored bit-exact"
.venv/bin/dedupimg forget --keep-last 2 --prune    # retention: restic's rules, then free the space
.venv/bin/dedupimg check                           # index, packs and reference counts agree
.venv/bin/dedupimg info
