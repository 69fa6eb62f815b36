#!/usr/bin/env bash
# Incremental backups of a VM disk with QEMU dirty bitmaps: read only what changed since the last snapshot.
#
#   examples/vm-guest-backup.sh live DOMAIN DISK-NODE [NAME]           # a running libvirt guest (QMP via virsh)
#   examples/vm-guest-backup.sh live-qmp QMP-SOCKET DISK-NODE [NAME]   # a running QEMU's own QMP unix socket
#   examples/vm-guest-backup.sh offline DISK.qcow2 [NAME]              # a qcow2 file of a stopped VM (qemu-img)
#   examples/vm-guest-backup.sh demo                                   # offline mode on a made-up disk
#
# Needs DEDUPIMG_REPO (and DEDUPIMG_PASSWORD or _FILE for an encrypted repository). The bitmap that covers the
# changes since the last snapshot is "dedupimg-A" or "dedupimg-B"; each run starts the other one at the moment
# it takes its point-in-time view (rotation), and removes the old one only once the snapshot is stored. A
# failed snapshot merges the old bitmap into the new one, so the next run still sees every change since the
# last stored snapshot. The first run (no bitmap yet) takes a full snapshot. A snapshot that exits 23 (the
# bitmap missed a change, found by --verify-unchanged) is followed at once by a full one.
#
# live, live-qmp: freeze the guest's filesystems when a guest agent answers (libvirt only), in one QMP
# transaction start the new bitmap, stop the old one and start a fleecing job (blockdev-backup sync=none into
# a temporary qcow2 overlay: the guest's writes copy the old data there first, so the overlay shows the disk
# as it was), thaw at once, export the overlay with the old bitmap over NBD on a unix socket, snapshot it,
# tear everything down. One run per disk at a time (a lock file in FLEECE_DIR); a run killed midway leaves its
# export, job and overlay in QEMU, and the next run removes them and folds its bitmaps together. DISK-NODE is
# the disk's format node (query-named-block-nodes; libvirt names it like libvirt-1-format); NAME defaults to
# the domain (live) or the node's image file name (live-qmp). live-qmp is run against a guest-less QEMU 7.2 by
# tests/integration/test_vm_live.py (writes during the fleecing stay out of the snapshot, a killed run is
# recovered, exit 23 is followed by a full snapshot); the virsh transport and the freeze were not run here (no
# libvirt). Needs QEMU >= 5.2 (block-export-add with bitmaps), python3 and flock. Environment:
# VERIFY_UNCHANGED (percent, default 1), FLEECE_DIR (overlay, NBD socket and lock, default /var/tmp: the
# overlay grows by what the guest writes meanwhile), DEDUPIMG_SNAPSHOT_OPTS (more options for every snapshot,
# e.g. "--tag nightly --json").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEDUPIMG=${DEDUPIMG:-$ROOT/.venv/bin/dedupimg}
: "${DEDUPIMG_REPO:?set DEDUPIMG_REPO to the repository}"
read -ra SNAPSHOT_OPTS <<<"${DEDUPIMG_SNAPSHOT_OPTS:-}"

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
    "$DEDUPIMG" snapshot "$disk" --name "$name" "${SNAPSHOT_OPTS[@]}"
    return
  fi
  new=$(other "$old")
  # The VM is stopped, so the rotation is atomic: the new bitmap starts, the old one stops.
  qemu-img bitmap --add "$disk" "$new"
  qemu-img bitmap --disable "$disk" "$old"
  if "$DEDUPIMG" snapshot "$disk" --name "$name" --parent "$name@latest" --dirty-bitmap "$old" \
      --verify-unchanged "${VERIFY_UNCHANGED:-1}" "${SNAPSHOT_OPTS[@]}"; then
    qemu-img bitmap --remove "$disk" "$old"
  else
    rc=$?
    qemu-img bitmap --merge "$old" "$disk" "$new"  # nothing lost: the next run sees both
    qemu-img bitmap --remove "$disk" "$old"
    if [ "$rc" -eq 23 ]; then  # a change the bitmap missed: start over with a full snapshot
      "$DEDUPIMG" snapshot "$disk" --name "$name" "${SNAPSHOT_OPTS[@]}"
    fi
    return "$rc"
  fi
}

# ------------------------------------------------------------------------------------------------ live
# QMP goes through libvirt (virsh qemu-monitor-command DOMAIN) for live, or straight to QEMU's QMP socket
# (-qmp unix:PATH,server=on,wait=off) for live-qmp: QMP_PY connects, reads the greeting, negotiates
# capabilities, sends the command and skips events until the reply (one connection per command: the socket
# serves one client at a time). Either way it prints the reply's "return" as JSON, or QEMU's error and fails.
QMP_PY='
import json, socket, sys
command = json.loads(sys.argv[1])
if len(sys.argv) > 2:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[2])
    stream = sock.makefile("rw")
    stream.readline()
    for cmd in ({"execute": "qmp_capabilities"}, command):
        stream.write(json.dumps(cmd) + "\n")
        stream.flush()
        while True:
            line = stream.readline()
            if not line:
                sys.exit("qmp: QEMU closed the connection")
            msg = json.loads(line)
            if "return" in msg or "error" in msg:
                break
        if "error" in msg:
            break
else:
    msg = json.load(sys.stdin)
if "error" in msg:
    sys.exit("qmp: %s: %s" % (command["execute"], msg["error"]["desc"]))
print(json.dumps(msg["return"]))
'
qmp() {  # one QMP command (JSON); prints its "return" as JSON
  if [ -n "${QMP_SOCKET:-}" ]; then
    python3 -c "$QMP_PY" "$1" "$QMP_SOCKET"
  else
    virsh qemu-monitor-command "$DOMAIN" "$1" | python3 -c "$QMP_PY" "$1"
  fi
}

node_state() {  # NODE: lines with its virtual size, driver and image file, then "BITMAP recording|disabled"
  # for each of its dedupimg-* bitmaps
  qmp '{"execute":"query-named-block-nodes","arguments":{"flat":true}}' | python3 -c '
import json, sys
node = next((n for n in json.load(sys.stdin) if n["node-name"] == sys.argv[1]), None)
if node is None:
    sys.exit("vm-guest-backup: no block node %r: give the format node of the disk (query-named-block-nodes)"
             % sys.argv[1])
print(node["image"]["virtual-size"], node["drv"], node["image"]["filename"], sep="\n")
for b in node.get("dirty-bitmaps", []):
    if b.get("name", "").startswith("dedupimg-"):
        print(b["name"], "recording" if b["recording"] else "disabled")' "$1"
}

listed() {  # QUERY KEY VALUE: does an entry of QMP QUERY's list have KEY == VALUE
  qmp "{\"execute\":\"$1\"}" | python3 -c '
import json, sys
sys.exit(not any(e.get(sys.argv[1]) == sys.argv[2] for e in json.load(sys.stdin)))' "$2" "$3"
}

wait_gone() {  # QUERY KEY VALUE: wait (up to 30 s) until no entry of QMP QUERY has KEY == VALUE
  local _
  for _ in $(seq 300); do
    listed "$@" || return 0
    sleep 0.1
  done
  echo "vm-guest-backup: $1 still lists $3" >&2
  return 1
}

# Guest freeze: only through libvirt, and only when the domain's guest agent answers. The QMP socket of
# live-qmp does not reach a guest agent (the agent listens on its own virtio-serial channel, not on QMP), so
# live-qmp never freezes: its snapshot is crash-consistent, as after a power cut at the transaction's moment.
FROZEN=""
guest_freeze() {
  [ -z "${QMP_SOCKET:-}" ] || return 0
  if virsh qemu-agent-command "$DOMAIN" '{"execute":"guest-ping"}' >/dev/null 2>&1; then
    virsh domfsfreeze "$DOMAIN" >/dev/null && FROZEN=1
  else
    echo "vm-guest-backup: no guest agent in $DOMAIN: not frozen (crash-consistent snapshot)" >&2
  fi
}
guest_thaw() { if [ -n "$FROZEN" ]; then virsh domfsthaw "$DOMAIN" >/dev/null; FROZEN=""; fi; }

# What the run has set up (for live_finish): the overlay's node, the fleecing job, the NBD server and export,
# and whether the transaction ran (the new bitmap exists).
L_NODE="" L_WORK="" L_OLD="" L_NEW="" L_FLEECE="" L_JOB="" L_SERVER="" L_EXPORT="" L_TX=""

live_finish() {  # SNAPSHOT-RC: tear down in reverse order (every step tried), then rotate or merge bitmaps
  local rc=$1
  guest_thaw || true
  if [ -n "$L_EXPORT" ]; then
    qmp '{"execute":"block-export-del","arguments":{"id":"dedupimg"}}' >/dev/null || true
    wait_gone query-block-exports id dedupimg || true
  fi
  [ -z "$L_SERVER" ] || qmp '{"execute":"nbd-server-stop"}' >/dev/null || true
  if [ -n "$L_JOB" ]; then
    qmp '{"execute":"block-job-cancel","arguments":{"device":"dedupimg-fleece"}}' >/dev/null || true
    wait_gone query-block-jobs device dedupimg-fleece || true
  fi
  [ -z "$L_FLEECE" ] || qmp '{"execute":"blockdev-del","arguments":{"node-name":"dedupimg-fleece"}}' >/dev/null \
    || true
  [ -z "$L_WORK" ] || rm -rf "$L_WORK"
  L_EXPORT="" L_SERVER="" L_JOB="" L_FLEECE="" L_WORK=""
  [ -n "$L_TX" ] || return 0
  L_TX=""
  if [ "$rc" -eq 0 ]; then  # stored: the old bitmap's changes are in the repository
    [ -z "$L_OLD" ] || bitmap_remove "$L_OLD"
  elif [ -n "$L_OLD" ]; then  # not stored: the next run needs the old changes too
    qmp "{\"execute\":\"block-dirty-bitmap-merge\",
          \"arguments\":{\"node\":\"$L_NODE\",\"target\":\"$L_NEW\",\"bitmaps\":[\"$L_OLD\"]}}" >/dev/null \
      && bitmap_remove "$L_OLD"
  else  # a first run that stored nothing: the next one must be full, with no bitmap
    bitmap_remove "$L_NEW"
  fi
}
bitmap_remove() {
  qmp "{\"execute\":\"block-dirty-bitmap-remove\",\"arguments\":{\"node\":\"$L_NODE\",\"name\":\"$1\"}}" >/dev/null
}

live_leftovers() {  # tear down what a killed run left (this run holds the lock: no other run owns it)
  if listed query-block-exports id dedupimg; then L_EXPORT=1 L_SERVER=1; fi
  if listed query-block-jobs device dedupimg-fleece; then L_JOB=1; fi
  if listed query-named-block-nodes node-name dedupimg-fleece; then L_FLEECE=1; fi
  if [ -n "$L_EXPORT$L_JOB$L_FLEECE" ]; then
    echo "vm-guest-backup: removing the export, job and overlay of an interrupted run" >&2
    live_finish 0  # (L_TX is empty: no bitmap is touched)
  fi
}

live_backup() {  # DISK-NODE [NAME] LOCK-KEY, QMP through qmp()
  L_NODE=$1
  local name=${2:-} size drv file persistent=false rc=0 sock id dir=${FLEECE_DIR:-/var/tmp}
  local -a state bitmaps=()
  # One run per disk at a time: the lock (held until the script exits) also tells that whatever another run set
  # up and is still there was left by a killed run. Lock and overlay directory are named after the VM and node.
  id=$(printf '%s %s' "$3" "$L_NODE" | md5sum | cut -c1-12)
  exec 9>"$dir/dedupimg-live.$id.lock"
  flock -n 9 || { echo "vm-guest-backup: another run is backing up $L_NODE" >&2; exit 1; }
  mapfile -t state < <(node_state "$L_NODE")
  [ ${#state[@]} -ge 3 ] || exit 1  # (node_state said why)
  size=${state[0]} drv=${state[1]} file=${state[2]}
  bitmaps=("${state[@]:3}")
  name=${name:-$(basename "$file")}
  # Persistent bitmaps are stored in a qcow2 image; any other disk keeps them in QEMU's memory only, and after
  # a QEMU restart there is no bitmap: the next run is a full snapshot again.
  [ "$drv" != qcow2 ] || persistent=true

  live_leftovers
  L_WORK=$dir/dedupimg-fleece.$id
  rm -rf "$L_WORK"  # (a killed run's)
  mkdir -m 0700 "$L_WORK"
  trap 'live_finish 1' EXIT
  trap 'exit 130' INT TERM
  sock=$L_WORK/nbd.sock
  qemu-img create -q -f qcow2 "$L_WORK/fleece.qcow2" "$size"
  qmp "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"qcow2\",\"node-name\":\"dedupimg-fleece\",
        \"file\":{\"driver\":\"file\",\"filename\":\"$L_WORK/fleece.qcow2\"},\"backing\":\"$L_NODE\"}}" >/dev/null
  L_FLEECE=1

  # The old bitmap: none (first run), one, or two when a run was killed between its transaction and its end
  # (the disabled one is that run's old bitmap: fold it into the recording one, which then is the old one).
  L_OLD=""
  if [ ${#bitmaps[@]} -eq 2 ] && [ "${bitmaps[0]#* }" != "${bitmaps[1]#* }" ]; then
    local keep=${bitmaps[0]% *} fold=${bitmaps[1]% *}
    [ "${bitmaps[0]#* }" = recording ] || { keep=${bitmaps[1]% *}; fold=${bitmaps[0]% *}; }
    echo "vm-guest-backup: merging $fold into $keep (left by an interrupted run)" >&2
    qmp "{\"execute\":\"block-dirty-bitmap-merge\",
          \"arguments\":{\"node\":\"$L_NODE\",\"target\":\"$keep\",\"bitmaps\":[\"$fold\"]}}" >/dev/null
    bitmap_remove "$fold"
    L_OLD=$keep
  elif [ ${#bitmaps[@]} -eq 1 ]; then
    L_OLD=${bitmaps[0]% *}
  elif [ ${#bitmaps[@]} -gt 1 ]; then
    echo "vm-guest-backup: cannot tell which bitmap is current: ${bitmaps[*]}" >&2
    exit 1
  fi
  if [ -n "$L_OLD" ] && [ "$("$DEDUPIMG" snapshots --name "$name" --json)" = "[]" ]; then
    echo "vm-guest-backup: no snapshot named $name for bitmap $L_OLD: a full snapshot" >&2
    bitmap_remove "$L_OLD"
    L_OLD=""
  fi
  L_NEW=$(other "${L_OLD:-dedupimg-B}")

  local actions="{\"type\":\"block-dirty-bitmap-add\",
                  \"data\":{\"node\":\"$L_NODE\",\"name\":\"$L_NEW\",\"persistent\":$persistent}}"
  [ -z "$L_OLD" ] || actions="$actions,{\"type\":\"block-dirty-bitmap-disable\",
                                        \"data\":{\"node\":\"$L_NODE\",\"name\":\"$L_OLD\"}}"
  actions="$actions,{\"type\":\"blockdev-backup\",\"data\":{\"device\":\"$L_NODE\",\"target\":\"dedupimg-fleece\",
                     \"sync\":\"none\",\"job-id\":\"dedupimg-fleece\"}}"
  guest_freeze
  qmp "{\"execute\":\"transaction\",\"arguments\":{\"actions\":[$actions]}}" >/dev/null  # all or nothing
  L_TX=1 L_JOB=1
  guest_thaw

  local bitmaps_json="[]"
  [ -z "$L_OLD" ] || bitmaps_json="[\"$L_OLD\"]"
  qmp "{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"$sock\"}}}}" \
    >/dev/null
  L_SERVER=1
  qmp "{\"execute\":\"block-export-add\",\"arguments\":{\"type\":\"nbd\",\"id\":\"dedupimg\",
        \"node-name\":\"dedupimg-fleece\",\"name\":\"vm\",\"writable\":false,\"bitmaps\":$bitmaps_json}}" >/dev/null
  L_EXPORT=1
  # For tests only: a shell command run here, while the fleecing export is up and before it is read
  # (tests/integration/test_vm_live.py writes to the disk through QMP with it).
  if [ -n "${DEDUPIMG_FLEECE_HOOK:-}" ]; then eval "$DEDUPIMG_FLEECE_HOOK"; fi

  local uri="nbd+unix:///vm?socket=$sock"
  if [ -n "$L_OLD" ]; then
    "$DEDUPIMG" snapshot "$uri" --name "$name" --parent "$name@latest" --dirty-bitmap "$L_OLD" \
      --verify-unchanged "${VERIFY_UNCHANGED:-1}" "${SNAPSHOT_OPTS[@]}" || rc=$?
  else
    "$DEDUPIMG" snapshot "$uri" --name "$name" "${SNAPSHOT_OPTS[@]}" || rc=$?
  fi
  local stored=$rc
  if [ "$rc" -eq 23 ]; then  # a change the bitmap missed: a full snapshot of the same moment (the export)
    echo "vm-guest-backup: the bitmap missed a change: taking a full snapshot" >&2
    stored=0
    "$DEDUPIMG" snapshot "$uri" --name "$name" "${SNAPSHOT_OPTS[@]}" || stored=$?
  fi
  trap - EXIT INT TERM
  live_finish "$stored"
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

usage() { sed -n '2,7p' "$0"; exit 2; }
case "${1:-}" in
  live) [ $# -ge 3 ] || usage; DOMAIN=$2; live_backup "$3" "${4:-$2}" "$DOMAIN" ;;
  live-qmp) [ $# -ge 3 ] || usage; QMP_SOCKET=$2; live_backup "$3" "${4:-}" "$(realpath "$QMP_SOCKET")" ;;
  offline) [ $# -ge 2 ] || usage; shift; offline "$@" ;;
  demo) demo ;;
  *) usage ;;
esac
