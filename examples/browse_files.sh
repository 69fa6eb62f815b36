#!/usr/bin/env bash
# File-level restore from an image backup: mount the repository (every snapshot appears as an image file),
# loop-mount an older snapshot read-only and copy one file out of it. Needs root for the loop mount.
# Sets up its own environment (scripts/setup.sh) on a fresh Debian machine.
#   bash examples/browse_files.sh       # work files go to examples/work/browse-files/
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then echo "browse_files.sh: run as root (it loop-mounts an image)" >&2; exit 1; fi
bash scripts/setup.sh
export PATH="$PATH:/sbin:/usr/sbin"
DEDUPIMG=.venv/bin/dedupimg
WORK="$PWD/examples/work/browse-files"
MNT="$WORK/mnt"                 # the repository, mounted
FILES="$WORK/files"             # one snapshot's filesystem, loop-mounted from $MNT

cleanup() {
  if mountpoint -q "$FILES" 2>/dev/null; then umount "$FILES"; fi   # the loop mount first: it reads from $MNT
  if mountpoint -q "$MNT" 2>/dev/null; then fusermount3 -u "$MNT"; fi
}
trap cleanup EXIT
cleanup                         # left over from an interrupted run
rm -rf "$WORK"; mkdir -p "$WORK" "$MNT" "$FILES"
export DEDUPIMG_REPO="$WORK/repo"
# An encrypted repository (the default): its password from a file only the owner reads (or DEDUPIMG_PASSWORD,
# --password-command, or asked on the terminal). Lose the password and the backups are lost with it.
(umask 077; mkdir -p "$WORK"; head -c 24 /dev/urandom | base64 > "$WORK/password")
export DEDUPIMG_PASSWORD_FILE="$WORK/password"

# A small server disk: an ext4 image built from a directory tree.
make_disk() {   # make_disk VERSION
  local tree="$WORK/tree"
  rm -rf "$tree"; mkdir -p "$tree/etc" "$tree/home/admin" "$tree/var/log"
  echo "web01" > "$tree/etc/hostname"
  printf 'listen 80;\nserver_name example.org;\n' > "$tree/etc/site.conf"
  echo "notes, version $1: the database password rotates on Mondays" > "$tree/home/admin/notes.txt"
  seq 1 20000 | sed "s/^/v$1 request /" > "$tree/var/log/access.log"
  mkfs.ext4 -q -F -E root_owner=0:0 -d "$tree" "$WORK/disk.img" 32M
}

$DEDUPIMG init
make_disk 1
$DEDUPIMG snapshot "$WORK/disk.img" --name web01-disk
make_disk 2                     # the next night: notes.txt and the log changed
$DEDUPIMG snapshot "$WORK/disk.img" --name web01-disk
$DEDUPIMG snapshots

$DEDUPIMG mount "$MNT"          # returns once mounted; a background process serves it
ls -l "$MNT" "$MNT/web01-disk"
OLDER=$(.venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])' \
  < <($DEDUPIMG snapshots --name web01-disk --json))
mount -o loop,ro "$MNT/by-id/$OLDER.img" "$FILES"
echo "--- home/admin/notes.txt in the older snapshot:"
cat "$FILES/home/admin/notes.txt"
cp "$FILES/home/admin/notes.txt" "$WORK/notes-restored.txt"   # the file-level restore
grep -q "version 1" "$WORK/notes-restored.txt" && echo "restored notes.txt from the older snapshot"
cleanup
echo "unmounted $FILES and $MNT"
