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
  [qemu-system-x86_64]=qemu-system-x86
)
# installed without their recommended packages: qemu-system-x86's bring a GUI, firmware and ~125 more packages,
# and the tests run a guest-less QEMU (23 packages, 80 MiB without them)
LEAN=" qemu-system-x86 "
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
  full=() lean=()
  for package in "${packages[@]}"; do
    if [[ $LEAN == *" $package "* ]]; then lean+=("$package"); else full+=("$package"); fi
  done
  if [ ${#full[@]} -gt 0 ]; then DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${full[@]}" >/dev/null; fi
  if [ ${#lean[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# Bytecode for dedupimg's modules, as pip writes for a regular install (an editable one leaves it to the first
# run, and never where PYTHONDONTWRITEBYTECODE is set): every command starts in ~0.14 s instead of ~0.22 s.
.venv/bin/python -m compileall -q dedupimg >/dev/null
