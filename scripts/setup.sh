#!/usr/bin/env bash
# Installs what dedupimg and its tests need on a fresh Debian machine: system tools (apt) and a virtual
# environment in .venv with dedupimg and its test tools. Safe to run again; it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# tool -> Debian package
declare -A NEED=(
  [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [setpriv]=util-linux [unshare]=util-linux [mount]=mount [losetup]=mount
  [fusermount3]=fuse3 [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [qemu-img]=qemu-utils [qemu-io]=qemu-utils
)
missing=()
for tool in "${!NEED[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/sbin:/usr/sbin" command -v "$tool" >/dev/null 2>&1 \
    || missing+=("${NEED[$tool]}")
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then missing+=(python3-venv); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
