#!/usr/bin/env bash
# `make demo`: the main job end to end on local defaults (no cloud account needed).
# Each step is a real imagekit command; the work directory is .demo/ in the checkout.
set -euo pipefail
IMAGEKIT=${1:-imagekit}
cd "$(dirname "$0")/.."
WORK=.demo
rm -rf "$WORK" && mkdir -p "$WORK"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "host check (tools, accelerator, libguestfs appliance)"
"$IMAGEKIT" doctor

step "recipes shipped with imagekit"
"$IMAGEKIT" recipes list
"$IMAGEKIT" recipes validate

step "the resolved debian-12 recipe"
"$IMAGEKIT" recipes show debian-12

if "$IMAGEKIT" check --help >/dev/null 2>&1; then
  step "check: a clean qcow2 is accepted, a qcow2 pointing at a host file is refused"
  qemu-img create -q -f qcow2 "$WORK/clean.qcow2" 1G
  "$IMAGEKIT" check "$WORK/clean.qcow2"
  qemu-img create -q -f qcow2 -b /etc/hostname -F raw "$WORK/hostile.qcow2" 1G
  if "$IMAGEKIT" check "$WORK/hostile.qcow2"; then echo "hostile image was accepted!" >&2; exit 1; fi
  echo "(refused as expected)"
fi

if "$IMAGEKIT" convert --help >/dev/null 2>&1; then
  step "convert: a raw disk with data to a verified qcow2"
  qemu-img create -q -f raw "$WORK/disk.img" 256M
  printf 'imagekit demo data\n' | dd of="$WORK/disk.img" bs=1M seek=100 conv=notrunc status=none
  "$IMAGEKIT" convert "$WORK/disk.img" -o "$WORK/disk.qcow2"
  "$IMAGEKIT" inspect "$WORK/disk.qcow2"
fi

step "done: outputs are in $WORK/"
ls -la "$WORK"
