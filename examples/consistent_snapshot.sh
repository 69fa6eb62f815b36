#!/usr/bin/env bash
# A consistent snapshot of a disk that is in use: read a frozen or point-in-time copy, never the live disk.
#
# dedupimg reads an image from start to end; a disk written meanwhile gives an image that matches no moment
# of it (a regular file that changed is stored but marked changed_during_read, exit 3; a block device's
# changes cannot even be seen). Three ways to read a still image, as root:
#
#   bash examples/consistent_snapshot.sh lvm VG LV NAME [COW_SIZE] [LIBVIRT_DOMAIN]
#       LVM snapshot of VG/LV (the live VM's or filesystem's logical volume), snapshot that, remove it.
#       Creating the LVM snapshot freezes a filesystem mounted from the LV for an instant by itself; with
#       LIBVIRT_DOMAIN, the guest's filesystems are frozen (virsh domfsfreeze, needs qemu-guest-agent) just
#       while the LVM snapshot is created, so the guest's own caches are on the disk too. COW_SIZE (default
#       10%ORIGIN) must hold every block written to the LV while dedupimg reads.
#   bash examples/consistent_snapshot.sh freeze-guest LIBVIRT_DOMAIN IMAGE NAME
#       Freeze the guest's filesystems for the whole read of its image file (the guest's writes wait).
#   bash examples/consistent_snapshot.sh freeze-fs MOUNTPOINT DEVICE NAME
#       fsfreeze the filesystem mounted at MOUNTPOINT for the whole read of DEVICE (its writers wait).
#
# The repository comes from DEDUPIMG_REPO; DEDUPIMG names the command (default: dedupimg). Whatever happens,
# the filesystems are thawed and the LVM snapshot removed (trap). Exits with dedupimg's code.
set -euo pipefail

DEDUPIMG=${DEDUPIMG:-dedupimg}

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Globals, not locals: the EXIT trap runs after the function has returned.
VG="" SNAP="" DOMAIN="" FROZEN="" MOUNTPOINT=""

cleanup() {
  if [ -n "$FROZEN" ] && [ -n "$DOMAIN" ]; then virsh domfsthaw "$DOMAIN" >/dev/null || true; fi
  if [ -n "$FROZEN" ] && [ -n "$MOUNTPOINT" ]; then fsfreeze --unfreeze "$MOUNTPOINT" || true; fi
  if [ -n "$SNAP" ] && lvs "$VG/$SNAP" >/dev/null 2>&1; then lvremove -y "$VG/$SNAP" >/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

lvm_snapshot() {
  local lv=$2 name=$3 cow=${4:-10%ORIGIN}
  VG=$1 DOMAIN=${5:-}
  if [ -n "$DOMAIN" ]; then
    virsh domfsfreeze "$DOMAIN" >/dev/null
    FROZEN=yes
  fi
  SNAP="${lv}-dedupimg-$$"
  if [[ "$cow" == *%* ]]; then
    lvcreate --snapshot --extents "$cow" --name "$SNAP" "$VG/$lv" >/dev/null
  else
    lvcreate --snapshot --size "$cow" --name "$SNAP" "$VG/$lv" >/dev/null
  fi
  if [ -n "$DOMAIN" ]; then
    virsh domfsthaw "$DOMAIN" >/dev/null
    FROZEN=""
  fi
  # The LVM snapshot is what is read; --name keeps the series of the original volume.
  "$DEDUPIMG" snapshot "/dev/$VG/$SNAP" --name "$name" --tag lvm-snapshot
}

freeze_guest() {
  local image=$2 name=$3
  DOMAIN=$1
  virsh domfsfreeze "$DOMAIN" >/dev/null
  FROZEN=yes
  "$DEDUPIMG" snapshot "$image" --name "$name" --tag guest-frozen
}

freeze_fs() {
  local device=$2 name=$3
  MOUNTPOINT=$1
  sync -f "$MOUNTPOINT"
  fsfreeze --freeze "$MOUNTPOINT"
  FROZEN=yes
  "$DEDUPIMG" snapshot "$device" --name "$name" --tag fs-frozen
}

[ $# -ge 1 ] || usage
mode=$1
shift
case "$mode" in
  lvm) [ $# -ge 3 ] && [ $# -le 5 ] || usage; lvm_snapshot "$@" ;;
  freeze-guest) [ $# -eq 3 ] || usage; freeze_guest "$@" ;;
  freeze-fs) [ $# -eq 3 ] || usage; freeze_fs "$@" ;;
  *) usage ;;
esac
