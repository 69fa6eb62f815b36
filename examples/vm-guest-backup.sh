#!/usr/bin/env bash
# Incremental backups of a VM disk with QEMU dirty bitmaps: read only what changed since the last snapshot.
#
#   examples/vm-guest-backup.sh live DOMAIN DISK-NODE     # a running libvirt guest (QMP through virsh)
#   examples/vm-guest-backup.sh offline DISK.qcow2        # a qcow2 file of a stopped VM (qemu-img only)
#   examples/vm-guest-backup.sh demo                      # offline mode on a made-up disk, three nights
#
# Needs DEDUPIMG_REPO (and DEDUPIMG_PASSWORD or _FILE for an encrypted repository). The bitmap that covers the
# changes since the last snapshot is "dedupimg-A" or "dedupimg-B"; each run starts the other one at the moment
# it takes its point-in-time view (rotation), and removes the old one only once the snapshot is stored. A
# failed snapshot merges the old bitmap into the new one, so the next run still sees every change since the
# last stored snapshot. The first run (no bitmap yet) takes a full snapshot.
#
# live: freeze the guest's filesystems (qemu guest agent), in one QMP transaction start the new bitmap, stop
# the old one and start a fleecing job (blockdev-backup sync=none into a temporary qcow2 overlay: the guest's
# writes copy the old data there first, so the overlay shows the disk as it was), thaw at once (the freeze
# lasts milliseconds), export the overlay with the old bitmap over NBD on a unix socket, snapshot it, tear down.
# Tested offline (demo) here; the live sequence follows QEMU's docs/interop/bitmaps.rst and image fleecing, and
# needs QEMU >= 5.2 (block-export-add with bitmaps) and libvirt with the guest agent channel.
set -euo pipefail
cd "$(dirname "$0")/.."
DEDUPIMG=${DEDUPIMG:-.venv/bin/dedupimg}
: "${DEDUPIMG_REPO:?set DEDUPIMG_REPO to the repository}"

other() { if [ "$1" = dedupimg-A ]; then echo dedupimg-B; else echo dedupimg-A; fi; }

# ------------------------------------------------------------------------------------------------ offline
offline_bitmap() {  # the dedupimg-* bitmap of a qcow2 file, if any
  qemu-img info --output=json "$1" | python3 -c '
import json, sys
info = json.load(sys.stdin)
names = [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
         if b["name"].startswith("dedupimg-")]
print(names[0] if names else "")'
}

offline() {
  local disk=$1 name=${2:-$(basename "$1")}
  local old new
  old=$(offline_bitmap "$disk")
  if [ -z "$old" ]; then
    qemu-img bitmap --add "$disk" dedupimg-A
    "$DEDUPIMG" snapshot "$disk" --name "$name"
    return
  fi
  new=$(other "$old")
  # The VM is stopped, so the rotation is atomic: the new bitmap starts, the old one stops.
  qemu-img bitmap --add "$disk" "$new"
  qemu-img bitmap --disable "$disk" "$old"
  if "$DEDUPIMG" snapshot "$disk" --name "$name" --parent "$name@latest" --dirty-bitmap "$old" \
      --verify-unchanged 1; then
    qemu-img bitmap --remove "$disk" "$old"
  else
    rc=$?
    qemu-img bitmap --merge "$old" "$disk" "$new"  # nothing lost: the next run sees both
    qemu-img bitmap --remove "$disk" "$old"
    if [ "$rc" -eq 23 ]; then  # a change the bitmap missed: start over with a full snapshot
      "$DEDUPIMG" snapshot "$disk" --name "$name"
    fi
    return "$rc"
  fi
}

# ------------------------------------------------------------------------------------------------ live
qmp() { virsh qemu-monitor-command "$DOMAIN" "$1"; }

live() {
  DOMAIN=$1 NODE=$2
  local name=${3:-$DOMAIN} state=/var/lib/dedupimg/$DOMAIN.bitmap
  local work fleece sock old new
  work=$(mktemp -d /run/dedupimg-fleece.XXXXXX)
  fleece=$work/fleece.qcow2 sock=$work/nbd.sock
  mkdir -p "$(dirname "$state")"
  old=$(cat "$state" 2>/dev/null || true)
  new=$(other "${old:-dedupimg-B}")
  local size
  size=$(qmp '{"execute":"query-named-block-nodes","arguments":{"flat":true}}' | python3 -c "
import json, sys
print(next(n['image']['virtual-size'] for n in json.load(sys.stdin)['return'] if n['node-name'] == '$NODE'))")
  qemu-img create -q -f qcow2 "$fleece" "$size"
  qmp "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"qcow2\",\"node-name\":\"dedupimg-fleece\",
        \"file\":{\"driver\":\"file\",\"filename\":\"$fleece\"},\"backing\":\"$NODE\"}}"
  local actions="{\"type\":\"block-dirty-bitmap-add\",\"data\":{\"node\":\"$NODE\",\"name\":\"$new\",\"persistent\":true}}"
  [ -n "$old" ] && actions="$actions,{\"type\":\"block-dirty-bitmap-disable\",\"data\":{\"node\":\"$NODE\",\"name\":\"$old\"}}"
  actions="$actions,{\"type\":\"blockdev-backup\",\"data\":{\"device\":\"$NODE\",\"target\":\"dedupimg-fleece\",
           \"sync\":\"none\",\"job-id\":\"dedupimg-fleece\"}}"
  virsh domfsfreeze "$DOMAIN"
  qmp "{\"execute\":\"transaction\",\"arguments\":{\"actions\":[$actions]}}" || { virsh domfsthaw "$DOMAIN"; exit 1; }
  virsh domfsthaw "$DOMAIN"
  local bitmaps="[]"
  [ -n "$old" ] && bitmaps="[\"$old\"]"
  qmp "{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"$sock\"}}}}"
  qmp "{\"execute\":\"block-export-add\",\"arguments\":{\"type\":\"nbd\",\"id\":\"dedupimg\",
        \"node-name\":\"dedupimg-fleece\",\"name\":\"vm\",\"writable\":false,\"bitmaps\":$bitmaps}}"
  local rc=0
  if [ -n "$old" ]; then
    "$DEDUPIMG" snapshot "nbd+unix:///vm?socket=$sock" --name "$name" --parent "$name@latest" \
      --dirty-bitmap "$old" --verify-unchanged 1 || rc=$?
  else
    "$DEDUPIMG" snapshot "nbd+unix:///vm?socket=$sock" --name "$name" || rc=$?
  fi
  qmp '{"execute":"block-export-del","arguments":{"id":"dedupimg"}}' || true
  qmp '{"execute":"nbd-server-stop"}' || true
  qmp '{"execute":"block-job-cancel","arguments":{"device":"dedupimg-fleece"}}' || true
  sleep 1
  qmp '{"execute":"blockdev-del","arguments":{"node-name":"dedupimg-fleece"}}' || true
  rm -rf "$work"
  if [ -n "$old" ]; then
    # Stored: the old bitmap's changes are in the repository. Failed: keep them in the new bitmap.
    [ "$rc" -ne 0 ] && qmp "{\"execute\":\"block-dirty-bitmap-merge\",\"arguments\":{\"node\":\"$NODE\",
                              \"target\":\"$new\",\"bitmaps\":[\"$old\"]}}"
    qmp "{\"execute\":\"block-dirty-bitmap-remove\",\"arguments\":{\"node\":\"$NODE\",\"name\":\"$old\"}}"
  fi
  if [ "$rc" -eq 0 ] || [ -n "$old" ]; then echo "$new" > "$state"; fi
  if [ "$rc" -eq 23 ]; then echo "bitmap missed a change: the next run should be a full one (rm $state)" >&2; fi
  return "$rc"
}

# ------------------------------------------------------------------------------------------------ demo
demo() {
  local disk
  DEMO_DIR=$(mktemp -d)
  trap 'rm -rf "$DEMO_DIR"' EXIT
  local dir=$DEMO_DIR
  disk=$dir/guest.qcow2
  qemu-img create -q -f qcow2 "$disk" 256M
  qemu-io -c "write -P 0x11 0 32M" -c "write -P 0x22 64M 16M" "$disk" >/dev/null
  echo "night 1: full snapshot"
  offline "$disk" demo-guest
  for night in 2 3; do
    qemu-io -c "write -P 0x$night$night $((night * 7))M 192k" -c "write -P 0x44 100M 64k" "$disk" >/dev/null
    echo "night $night: incremental snapshot"
    offline "$disk" demo-guest
  done
  "$DEDUPIMG" snapshots --name demo-guest
  qemu-img convert -O raw "$disk" "$dir/expected.raw"
  "$DEDUPIMG" restore demo-guest@latest "$dir/restored.raw"
  cmp "$dir/expected.raw" "$dir/restored.raw" && echo "restored bit-exact"
}

case "${1:-}" in
  live) shift; live "$@" ;;
  offline) shift; offline "$@" ;;
  demo) demo ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
