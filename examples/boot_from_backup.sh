#!/usr/bin/env bash
# Instant recovery: use a backup as a VM disk at once, without restoring it first. dedupimg serves the
# snapshot read-only over NBD; a qcow2 overlay on top takes the VM's writes; the backup never changes.
# Sets up its own environment (scripts/setup.sh) on a fresh Debian machine.
#   bash examples/boot_from_backup.sh              # work files go to examples/work/boot/
#   NBD_PORT=10810 bash examples/boot_from_backup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH:/sbin:/usr/sbin"
WORK=examples/work/boot
PORT="${NBD_PORT:-10809}"
rm -rf "$WORK"; mkdir -p "$WORK/tree/etc" "$WORK/tree/srv/www"
export DEDUPIMG_REPO="$WORK/repo"
# An encrypted repository (the default): its password from a file only the owner reads (or DEDUPIMG_PASSWORD,
# --password-command, or asked on the terminal). Lose the password and the backups are lost with it.
(umask 077; mkdir -p "$WORK"; head -c 24 /dev/urandom | base64 > "$WORK/password")
export DEDUPIMG_PASSWORD_FILE="$WORK/password"

# A small ext4 disk made from a tiny tree (a real VM disk image works the same way).
echo "web01" >"$WORK/tree/etc/hostname"
echo "restored from a dedupimg backup" >"$WORK/tree/etc/motd"
for i in 1 2 3; do head -c 200000 /dev/urandom >"$WORK/tree/srv/www/asset$i.bin"; done
mkfs.ext4 -q -F -L web01 -d "$WORK/tree" "$WORK/disk.img" 64M

dedupimg init
ID=$(dedupimg snapshot "$WORK/disk.img" --name web01)
echo "snapshot $ID of $WORK/disk.img"

# Serve it (read-only). The line "serving N exports on nbd://HOST:PORT" on stderr says it is ready.
dedupimg serve web01@latest --listen "127.0.0.1:$PORT" 2>"$WORK/serve.log" &
SERVER=$!
stop_server() { if kill -0 "$SERVER" 2>/dev/null; then kill -INT "$SERVER"; wait "$SERVER" || true; fi; }
trap stop_server EXIT
for _ in $(seq 100); do
  grep -q '^serving' "$WORK/serve.log" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
  sleep 0.1
done
cat "$WORK/serve.log"
URI="nbd://127.0.0.1:$PORT/$ID"

nbdinfo --no-content "$URI"
echo "allocation map (holes are never stored and never sent):"
nbdinfo --map "$URI"

# The VM's disk: a qcow2 overlay whose backing file is the NBD export. Writes land in the overlay.
qemu-img create -q -f qcow2 -b "$URI" -F raw "$WORK/overlay.qcow2"
qemu-io -c 'write -P 0xab 63M 64k' "$WORK/overlay.qcow2"     # free blocks at the end of the file system
qemu-io -c 'read -P 0xab 63M 64k' "$WORK/overlay.qcow2"      # the VM reads its own write back
qemu-img info "$WORK/overlay.qcow2" | grep -E '^(image|backing file|disk size)'

# The backup is untouched: a copy through the server is still the original image, bit for bit.
nbdcopy "$URI" "$WORK/check.img"
cmp "$WORK/check.img" "$WORK/disk.img" && echo "backup unchanged: the export is still bit-exact"
# And the overlay's view is a healthy file system.
qemu-img convert -f qcow2 -O raw "$WORK/overlay.qcow2" "$WORK/vm-view.img"
e2fsck -fn "$WORK/vm-view.img" >/dev/null 2>&1 && echo "the VM's view of the disk passes e2fsck"

echo
echo "To boot a VM from the backup, keep 'dedupimg serve' running and start it on the overlay:"
echo "  qemu-system-x86_64 -enable-kvm -m 2G -drive file=$WORK/overlay.qcow2,format=qcow2,if=virtio"
echo "(this example's disk holds no OS, so it is not booted here). The VM runs at once; its writes stay"
echo "in the overlay. To keep them, copy the merged disk out while the server still runs:"
echo "  qemu-img convert -O raw $WORK/overlay.qcow2 restored.img"

# Ctrl-C or SIGTERM stops the server cleanly, with exit status 0 (set -e would stop here otherwise).
kill -INT "$SERVER"
wait "$SERVER"
trap - EXIT
echo "server stopped"
