"""The cheapest real bootable disk image: a 64 MiB qcow2 that boots to a login prompt in seconds.

An MBR disk with one FAT partition holding SYSLINUX (``syslinux --install`` on the
partition image and its ``mbr.bin`` in the MBR), the host's Debian kernel and an initramfs
made of the static busybox whose ``/init`` mounts /proc, /sys, /dev and runs ``getty`` on
ttyS0. So SeaBIOS really boots it from the (virtio) disk, the kernel really starts, and
the gate's boot test really sees a ``login:`` prompt on the serial console: about 5 s under
TCG, against minutes for a distribution image (the Debian image of ``tests/test_build.py``
takes several minutes to build with diskimage-builder and minutes to boot to cloud-init
under TCG). Made without root, loop devices or a VM (``mkfs.fat``, ``syslinux``,
``mcopy``, ``sfdisk``, ``dd``), in about a second; cached in ``IMAGEKIT_TEST_CACHE`` (or
``~/.cache/imagekit-tests``) under a name that changes with this recipe.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.guest_image import cache_dir

VERSION = "tiny-boot-v1"
DISK = 64 << 20
PART_START = 1 << 20
PART_SIZE = 40 << 20
TOOLS = ("mkfs.fat", "syslinux", "mcopy", "sfdisk", "qemu-img")
BUSYBOX = "/bin/busybox"
MBR = ("/usr/lib/SYSLINUX/mbr.bin", "/usr/lib/syslinux/mbr/mbr.bin")
LDLINUX = "/usr/lib/syslinux/modules/bios/ldlinux.c32"
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
hostname imagekit-tiny
echo "imagekit tiny guest: userspace up"
exec setsid getty 115200 ttyS0 vt100
"""
SYSLINUX_CFG = """DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  APPEND console=ttyS0 quiet panic=-1
  INITRD initrd.gz
"""


def kernel() -> Path | None:
    found = sorted(p for p in Path("/boot").glob("vmlinuz-*") if os.access(p, os.R_OK))
    return found[-1] if found else None


def missing() -> str | None:
    """Why the image cannot be made here (None: it can)."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(BUSYBOX, os.X_OK):
        return "busybox-static is not installed"
    if not any(os.path.exists(m) for m in MBR) or not os.path.exists(LDLINUX):
        return "syslinux / syslinux-common are not installed"
    if kernel() is None:
        return "no readable kernel in /boot"
    return None


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A ``newc`` cpio archive of (name, mode, data) entries (directories have no data)."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        head = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out.write(head.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def _initrd() -> bytes:
    entries = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "etc")]
    entries += [("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()), ("init", 0o100755, INIT.encode())]
    return gzip.compress(_cpio_newc(entries), 9)


def _run(*argv: str, stdin: bytes | None = None) -> None:
    subprocess.run(argv, input=stdin, check=True, capture_output=True, timeout=120)


def build(out: Path) -> Path:
    """Write the image to ``out`` (atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imagekit-tiny-", dir=out.parent) as tmp:
        t = Path(tmp)
        fat = t / "fat.img"
        with fat.open("wb") as fh:
            fh.truncate(PART_SIZE)
        _run("mkfs.fat", "-n", "TINY", str(fat))
        _run("syslinux", "--install", str(fat))
        (t / "initrd.gz").write_bytes(_initrd())
        (t / "syslinux.cfg").write_text(SYSLINUX_CFG)
        k = kernel()
        assert k is not None
        for src, name in ((k, "vmlinuz"), (t / "initrd.gz", "initrd.gz"), (t / "syslinux.cfg", "syslinux.cfg")):
            _run("mcopy", "-o", "-i", str(fat), str(src), f"::{name}")
        disk = t / "disk.raw"
        with disk.open("wb") as fh:
            fh.truncate(DISK)
        _run("sfdisk", "-q", str(disk),
             stdin=f"label: dos\nstart={PART_START // 512}, size={PART_SIZE // 512}, type=c, bootable\n".encode())
        mbr = next(m for m in MBR if os.path.exists(m))
        with disk.open("r+b") as fh:
            fh.write(Path(mbr).read_bytes()[:440])
            fh.seek(PART_START)
            with fat.open("rb") as src_fh:
                shutil.copyfileobj(src_fh, fh)
        part = t / "disk.qcow2"
        _run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(disk), str(part))
        os.replace(part, out)
    return out


def tiny_boot_image() -> Path:
    """The cached image, made first if needed."""
    path = cache_dir() / f"{VERSION}-{kernel().name if kernel() else 'nokernel'}.qcow2"
    if not path.is_file():
        build(path)
    return path
