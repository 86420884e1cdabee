"""VirtualBox VDI structure check.

Checked: the header signature (``0xBEDA107F`` at 0x40) and version (1.x); the image type
(differencing and undo images have a parent: ``backing-file``); sector and block sizes and a
block count covering the disk; the block map inside the file and every allocated block inside
the file. Bounded reads; a short read is a finding.
"""

from __future__ import annotations

import os
import struct

from imagekit.formats.base import FormatReport, VerifyOptions
from imagekit.formats.detect import read_exact, verify_file
from imagekit.verdict import Finding, Findings

SIGNATURE = 0xBEDA107F
IMAGE_TYPES = {1: "dynamic", 2: "fixed", 3: "undo", 4: "diff"}
MAX_BLOCKS = 16 * 1024 * 1024  # block maps larger than 64 MiB are not read


def verify(path: str | os.PathLike[str], options: VerifyOptions | None = None) -> FormatReport:
    """Check a VDI file (``options`` are not used: every check is cheap)."""
    return verify_file(path, _verify_fd)


def _verify_fd(fd: int, size: int) -> tuple[dict[str, object], tuple[Finding, ...]]:
    f = Findings()
    info: dict[str, object] = {"file_size": size}
    hdr = read_exact(fd, 0, 512)
    if hdr is None or struct.unpack_from("<I", hdr, 0x40)[0] != SIGNATURE:
        f.reject("vdi-bad-header", "VDI header missing or truncated")
        return info, f.freeze()
    version, _hsize, itype, _flags = struct.unpack_from("<IIII", hdr, 0x44)
    off_bmap, off_data = struct.unpack_from("<II", hdr, 0x154)
    sector_size, = struct.unpack_from("<I", hdr, 0x168)
    disk_size, block_size, _extra, blocks, allocated = struct.unpack_from("<QIIII", hdr, 0x170)
    parent = hdr[0x1B8:0x1C8]
    info.update({"version": version, "image_type": IMAGE_TYPES.get(itype, f"type-{itype}"),
                 "virtual_size": disk_size, "block_size": block_size, "blocks": blocks,
                 "allocated_blocks": allocated})
    if version >> 16 != 1:
        f.reject("vdi-bad-header", f"unsupported VDI version {version:#x}")
    if itype in (3, 4) or any(parent):
        f.reject("backing-file", "differencing/undo VDI: it depends on a parent image")
    elif itype not in (1, 2):
        f.reject("vdi-bad-header", f"unknown VDI image type {itype}")
    if sector_size != 512 or block_size != 1024 * 1024 or blocks * block_size < disk_size:
        f.reject("vdi-bad-header", "sector/block sizes or block count are invalid")
    if off_bmap + blocks * 4 > size or off_bmap < 512:
        f.reject("vdi-bmap-outside-file", "block map lies outside the file")
    elif blocks <= MAX_BLOCKS:
        bmap = read_exact(fd, off_bmap, blocks * 4) or b""
        outside = sum(1 for (e,) in struct.iter_unpack("<I", bmap)
                      if e < 0xFFFFFFFE and off_data + (e + 1) * block_size > size)
        if outside:
            f.reject("vdi-block-outside-file", f"{outside} block(s) point beyond the end of the file")
    return info, f.freeze()
