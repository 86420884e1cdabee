"""Build small real disk images for the format tests (qemu-img, sgdisk, xorriso) and patch them.

Every helper runs external programs with argument lists and a timeout.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

MiB = 1024 * 1024


def need(*programs: str) -> None:
    for p in programs:
        if shutil.which(p) is None:
            pytest.skip(f"{p} not installed")


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=60)


def qemu_img(*argv: str | Path) -> None:
    need("qemu-img")
    run("qemu-img", *argv)


def write_pattern(path: Path, size: int) -> Path:
    """A raw file with some non-zero data at a few places (so converted images allocate clusters)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, size // 3, size - 4096):
            f.seek(off)
            f.write(bytes(range(256)) * 16)
    return path


def create(path: Path, fmt: str, size: str = "8M", *opts: str) -> Path:
    args = ["create", "-q", "-f", fmt]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, path, size)
    return path


def convert(src: Path, dst: Path, fmt: str, *opts: str) -> Path:
    args = ["convert", "-q", "-f", "raw", "-O", fmt]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, src, dst)
    return dst


def patch(path: Path, offset: int, data: bytes) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def vhd_fix_checksum(path: Path, offset: int, length: int = 512, csum_at: int = 64) -> None:
    buf = bytearray(read(path, offset, length))
    buf[csum_at:csum_at + 4] = b"\0\0\0\0"
    patch(path, offset + csum_at, struct.pack(">I", (~sum(buf)) & 0xFFFFFFFF))


def gpt_disk(path: Path, size: int = 16 * MiB) -> Path:
    """A raw disk with a GPT: an ESP and a Linux partition."""
    need("sgdisk")
    with open(path, "wb") as f:
        f.truncate(size)
    run("sgdisk", "-n", "1:2048:+4M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300", path)
    return path


def mbr_disk(path: Path, size: int = 16 * MiB) -> Path:
    need("sfdisk")
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", str(path)], input=b"label: dos\n2048,,83,*\n", check=True,
                   capture_output=True, timeout=60)
    return path


def gpt_header_crc_fix(path: Path) -> None:
    hdr = bytearray(read(path, 512, 92))
    hdr[16:20] = b"\0\0\0\0"
    patch(path, 512 + 16, struct.pack("<I", zlib.crc32(bytes(hdr))))


def iso(path: Path, tmp: Path, mode: str = "plain") -> Path:
    """An ISO 9660 image: ``plain``, ``gpt`` (EFI partition appended, GPT) or ``mbr`` (protective msdos label)."""
    need("xorriso")
    root = tmp / f"isoroot-{path.stem}"
    root.mkdir(exist_ok=True)
    (root / "hello.txt").write_text("hello\n")
    args: list[str | Path] = ["xorriso", "-as", "mkisofs", "-quiet", "-V", "IMAGEKIT"]
    if mode == "gpt":
        efi = tmp / f"efi-{path.stem}.img"
        with open(efi, "wb") as f:
            f.truncate(1024 * 1024)
        args += ["-append_partition", "2", "0xef", efi, "-appended_part_as_gpt",
                 "-e", "--interval:appended_partition_2:all::", "-no-emul-boot"]
    elif mode == "mbr":
        args += ["--protective-msdos-label"]
    run(*args, "-o", path, root)
    return path


def qcow2_header(size: int = 1 * MiB, version: int = 3) -> bytes:
    """A bare qcow2 (or qcow v1) header: magic, version, cluster_bits=16, virtual size."""
    hdr = bytearray(104)
    hdr[0:4] = b"QFI\xfb"
    struct.pack_into(">I", hdr, 4, version)
    struct.pack_into(">I", hdr, 20, 16)
    struct.pack_into(">Q", hdr, 24, size)
    struct.pack_into(">I", hdr, 96, 4)
    struct.pack_into(">I", hdr, 100, 104)
    return bytes(hdr)
