#!/usr/bin/env bash
# What changed between two nightly snapshots of an ext4 disk image, file by file:
#  1. `dedupimg diff A B --json` gives the changed byte ranges from the manifests alone (no data read);
#  2. debugfs maps those ranges to the files whose blocks lie there (icheck: block -> inode, ncheck: inode ->
#     path), reading only the newer image's metadata;
#  3. mounting the repository and loop-mounting both snapshots read-only, `diff -rq` lists the changed files
#     the slow, certain way, to compare.
# Needs root (loop mounts). Sets up its own environment (scripts/setup.sh) on a fresh Debian machine.
#   bash examples/diff_files.sh       # work files go to examples/work/diff-files/
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then echo "diff_files.sh: run as root (it loop-mounts images)" >&2; exit 1; fi
bash scripts/setup.sh >/dev/null
export PATH="$PATH:/sbin:/usr/sbin"
DEDUPIMG=.venv/bin/dedupimg
PY=.venv/bin/python
WORK="$PWD/examples/work/diff-files"
MNT="$WORK/mnt"                 # the repository, mounted
OLD="$WORK/old"                 # the older snapshot's filesystem
NEW="$WORK/new"                 # the newer one's

cleanup() {
  for m in "$OLD" "$NEW"; do if mountpoint -q "$m" 2>/dev/null; then umount "$m"; fi; done   # before $MNT
  if mountpoint -q "$MNT" 2>/dev/null; then fusermount3 -u "$MNT"; fi
}
trap cleanup EXIT
cleanup                         # left over from an interrupted run
rm -rf "$WORK"; mkdir -p "$WORK" "$MNT" "$OLD" "$NEW"
export DEDUPIMG_REPO="$WORK/repo"
(umask 077; head -c 24 /dev/urandom | base64 > "$WORK/password")
export DEDUPIMG_PASSWORD_FILE="$WORK/password"

make_disk() {   # make_disk VERSION: a small server disk, an ext4 image built from a directory tree
  local tree="$WORK/tree"
  rm -rf "$tree"; mkdir -p "$tree/etc" "$tree/home/admin" "$tree/var/log" "$tree/srv/static"
  echo "web01" > "$tree/etc/hostname"
  printf 'listen 80;\nserver_name example.org;\n' > "$tree/etc/site.conf"
  for i in $(seq 1 20); do seq 1 3000 | sed "s/^/asset $i line /" > "$tree/srv/static/asset$i.txt"; done
  echo "notes, version $1" > "$tree/home/admin/notes.txt"
  seq 1 20000 | sed "s/^/v$1 request /" > "$tree/var/log/access.log"
  if [ "$1" -ge 2 ]; then echo "listen 443 ssl;" >> "$tree/etc/site.conf"; fi
  mkfs.ext4 -q -F -b 4096 -E root_owner=0:0 -U clear -T default -d "$tree" "$WORK/disk.img" 32M
}

$DEDUPIMG init >/dev/null
make_disk 1
A=$($DEDUPIMG snapshot "$WORK/disk.img" --name web01-disk --time 2026-11-24T02:30:00+01:00)
make_disk 2                     # the next night: notes.txt, the log and site.conf changed
B=$($DEDUPIMG snapshot "$WORK/disk.img" --name web01-disk --time 2026-11-25T02:30:00+01:00)

echo "--- changed byte ranges (from the manifests):"
$DEDUPIMG diff "$A" "$B"
$DEDUPIMG diff "$A" "$B" --json > "$WORK/diff.json"

echo "--- candidates: files with blocks in those ranges (debugfs on the newer image; chunks span neighbours too):"
BLOCKS=$($PY -c '
import json, sys
doc = json.load(open(sys.argv[1]))
blocks = sorted({b for r in doc["ranges"] for b in range(r["offset"] // 4096, (r["offset"] + r["length"] - 1) // 4096 + 1)})
print(" ".join(map(str, blocks[:4000])))' "$WORK/diff.json")
INODES=$(debugfs -R "icheck $BLOCKS" "$WORK/disk.img" 2>/dev/null | awk 'NR > 1 && $2 ~ /^[0-9]+$/ {print $2}' | sort -un)
if [ -n "$INODES" ]; then
  debugfs -R "ncheck $(echo $INODES)" "$WORK/disk.img" 2>/dev/null | awk 'NR > 1 {print $2}' | sort -u \
    | tee "$WORK/changed-by-blocks.txt"
fi

echo "--- changed files, mounting both snapshots (diff -rq):"
$DEDUPIMG mount "$MNT"          # returns once mounted; a background process serves it
mount -o loop,ro,noload "$MNT/by-id/$A.img" "$OLD"
mount -o loop,ro,noload "$MNT/by-id/$B.img" "$NEW"
(cd "$WORK" && diff -rq old new || true) | sed "s#$WORK/##g" | tee "$WORK/changed-by-mount.txt"
cleanup
echo "unmounted $OLD, $NEW and $MNT"
