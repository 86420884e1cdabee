#!/usr/bin/env bash
# `make demo`: the main job end to end on local defaults (no cloud account needed):
# a real local Glance, `imagekit build debian-12 --upload` to it, then what went where.
# Work files are in .demo/ in the checkout; safe to run again (the step cache makes reruns fast).
set -euo pipefail
IMAGEKIT=${1:-imagekit}
cd "$(dirname "$0")/.."
WORK=.demo
mkdir -p "$WORK"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "host check (tools, accelerator, libguestfs appliance)"
"$IMAGEKIT" doctor

step "recipes shipped with imagekit"
"$IMAGEKIT" recipes list
"$IMAGEKIT" recipes validate

step "check: a clean qcow2 is accepted, a qcow2 pointing at a host file is refused"
rm -f "$WORK"/clean.qcow2 "$WORK"/hostile.qcow2 "$WORK"/disk.img "$WORK"/disk.qcow2
qemu-img create -q -f qcow2 "$WORK/clean.qcow2" 1G
"$IMAGEKIT" check "$WORK/clean.qcow2"
qemu-img create -q -f qcow2 -b /etc/hostname -F raw "$WORK/hostile.qcow2" 1G
if "$IMAGEKIT" check "$WORK/hostile.qcow2"; then echo "hostile image was accepted!" >&2; exit 1; fi
echo "(refused as expected, exit code 3)"

step "convert: a raw disk to a verified qcow2"
qemu-img create -q -f raw "$WORK/disk.img" 256M
printf 'imagekit demo data\n' | dd of="$WORK/disk.img" bs=1M seek=100 conv=notrunc status=none
"$IMAGEKIT" convert "$WORK/disk.img" -o "$WORK/disk.qcow2"

step "a real Glance on 127.0.0.1 (cloud 'imagekit-local' in clouds.yaml)"
"$IMAGEKIT" glance serve
trap '"$IMAGEKIT" glance stop >/dev/null 2>&1 || true' EXIT

step "build debian-12 with diskimage-builder, customise, convert, check, upload"
"$IMAGEKIT" build debian-12 --output-dir "$WORK/out" --upload --cloud imagekit-local

step "the image in Glance (imagekit, and the standard OpenStack client with the same clouds.yaml entry)"
"$IMAGEKIT" images list --cloud imagekit-local --name-prefix debian-12
OPENSTACK="$(dirname "$IMAGEKIT")/openstack"
if [ -x "$OPENSTACK" ]; then "$OPENSTACK" --os-cloud imagekit-local image list; fi

step "done"
echo "image and manifest: $WORK/out/"
echo "(the local Glance is stopped again; 'imagekit glance serve' starts it with its images kept)"
