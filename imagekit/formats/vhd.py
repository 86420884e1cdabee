"""VHD (QEMU ``vpc``) structure check.

Checked: the 512-byte footer (``conectix`` cookie, one's-complement checksum,
disk type) at the end of the file and, for dynamic disks, its copy at offset 0;
the dynamic disk header (``cxsparse``, checksum, block size); that the block
allocation table and every allocated block lie inside the file; differencing
disks (a parent disk named by locators) are refused as backing files. All reads
are bounded ``pread``s and a short read is a finding, never zeros.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from imagekit.formats.base import FormatReport, VerifyOptions
from imagekit.formats.detect import read_exact, verify_file, vhd_checksum
from imagekit.verdict import Finding, Findings

FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
DISK_TYPES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
MAX_BAT_BYTES = 64 * 1024 * 1024  # QEMU caps the BAT at 2^22 entries... 16 MiB; be generous but bounded
MAX_VIRTUAL = 2040 * 1024**3  # VHD limit (~2 TiB)
PLATFORM_CODES = {
    b"W2ru": "windows-relative",
    b"W2ku": "windows-absolute",
    b"Wi2r": "windows-relative-deprecated",
    b"Wi2k": "windows-absolute-deprecated",
    b"Mac ": "mac-alias",
    b"MacX": "mac-url",
}


def parse_footer(buf: bytes) -> dict[str, object]:
    """Decode a 512-byte VHD footer (big-endian)."""
    (cookie, features, version, data_offset, timestamp, creator_app, creator_ver, creator_os,
     orig_size, cur_size, cyl, heads, spt, disk_type, checksum) = struct.unpack_from(
        ">8sIIQI4sIIQQHBBII", buf, 0)
    return {
        "cookie": cookie.decode("latin-1"),
        "features": features,
        "version": version,
        "data_offset": data_offset,
        "timestamp": timestamp,
        "creator_app": creator_app.decode("latin-1"),
        "creator_version": creator_ver,
        "original_size": orig_size,
        "current_size": cur_size,
        "geometry": [cyl, heads, spt],
        "chs_size": cyl * heads * spt * 512,
        "disk_type": disk_type,
        "disk_type_name": DISK_TYPES.get(disk_type, f"unknown-{disk_type}"),
        "checksum": checksum,
        "checksum_ok": checksum == vhd_checksum(buf[:512], 64),
        "saved_state": bool(buf[84]),
    }


def verify(path: str | os.PathLike[str], options: VerifyOptions | None = None) -> FormatReport:
    """Check a VHD file (``options`` are not used: every check is cheap)."""
    return verify_file(path, _verify_fd)


@dataclass
class _Footers:
    """The footer copies at offset 0 and at the end of the file; ``footer`` is the one QEMU uses."""

    footer: dict[str, object]
    head: dict[str, object] | None
    tail: dict[str, object] | None


def _verify_fd(fd: int, size: int) -> tuple[dict[str, object], tuple[Finding, ...]]:
    f = Findings()
    info: dict[str, object] = {"file_size": size}
    if size < 512:
        f.reject("vhd-truncated", f"file is {size} bytes, smaller than a VHD footer (512)")
        return info, f.freeze()
    fts = _footers(fd, size, info, f)
    if fts is None:
        return info, f.freeze()
    footer = fts.footer
    disk_type = footer["disk_type"]
    cur_size = int(footer["current_size"])  # type: ignore[call-overload]
    if disk_type == FIXED:
        if fts.head is not None and fts.tail is None:
            f.reject("vhd-no-footer", "fixed VHD without a footer at the end of the file")
        elif size - 512 < cur_size:
            f.reject("vhd-truncated", f"fixed VHD data area is {size - 512} bytes, footer says {cur_size}")
        return info, f.freeze()
    if disk_type not in (DYNAMIC, DIFFERENCING):
        f.reject("vhd-disk-type", f"unknown VHD disk type {disk_type}")
        return info, f.freeze()
    if fts.head is None:
        f.warn("vhd-no-footer-copy", "dynamic VHD without the footer copy at offset 0")
    dyn = _dynamic_header(fd, size, footer, info, f)
    if dyn is not None:
        bat_end = size - (0 if fts.head and not fts.tail else 512)
        _check_bat(fd, size, bat_end, dyn, cur_size, info, f)
    return info, f.freeze()


def _footers(fd: int, size: int, info: dict[str, object], f: Findings) -> _Footers | None:
    """Read both footer copies, check their checksums and the footer's fields; None: no footer at all."""
    head = read_exact(fd, 0, 512)
    tail = read_exact(fd, size - 512, 512)
    head_ft = parse_footer(head) if head is not None and head.startswith(b"conectix") else None
    tail_ft = parse_footer(tail) if tail is not None and tail.startswith(b"conectix") else None
    # QEMU reads the copy at offset 0 first and falls back to the end of the file.
    footer = head_ft or tail_ft
    if footer is None:
        f.reject("vhd-no-footer", "no 'conectix' footer at offset 0 or in the last 512 bytes")
        return None
    info["footer"] = footer
    info["footer_location"] = "start" if head_ft else "end"
    for where, ft in (("offset 0", head_ft), ("end of file", tail_ft)):
        if ft is not None and not ft["checksum_ok"]:
            f.reject("vhd-bad-checksum", f"VHD footer at {where} has a bad checksum (corrupt or tampered)")
    if head_ft and tail_ft and head != tail and head_ft["checksum_ok"] and tail_ft["checksum_ok"]:
        f.warn("vhd-footer-mismatch", "the footer copies at the start and end of the file differ")

    cur_size = int(footer["current_size"])  # type: ignore[call-overload]
    chs_size = int(footer["chs_size"])  # type: ignore[call-overload]
    info["subformat"] = footer["disk_type_name"]
    info["virtual_size"] = max(cur_size, chs_size)
    if footer["version"] != 0x00010000:
        f.warn("vhd-version", f"unexpected VHD version {footer['version']:#x}")
    if cur_size > MAX_VIRTUAL:
        f.reject("vhd-too-large", f"declared size {cur_size} exceeds the VHD limit of {MAX_VIRTUAL} bytes")
    if footer["saved_state"]:
        f.warn("vhd-saved-state", "the disk is marked as being in a saved state")
    return _Footers(footer, head_ft, tail_ft)


def _dynamic_header(fd: int, size: int, footer: dict[str, object], info: dict[str, object],
                    f: Findings) -> tuple[int, int, int] | None:
    """The dynamic disk header and its parent locators; (BAT offset, BAT entries, block size) or None."""
    disk_type = footer["disk_type"]
    data_offset = int(footer["data_offset"])  # type: ignore[call-overload]
    dyn = read_exact(fd, data_offset, 1024) if data_offset + 1024 <= size else None
    if dyn is None:
        f.reject("vhd-header-outside-file", f"dynamic header at {data_offset} is beyond the end of the file")
        return None
    if not dyn.startswith(b"cxsparse"):
        f.reject("vhd-bad-dynamic-header", "dynamic disk header lacks the 'cxsparse' cookie")
        return None
    (table_offset, hdr_ver, max_entries, block_size, dchecksum) = struct.unpack_from(">QIIII", dyn, 16)
    parent_uuid = dyn[40:56]
    parent_name = dyn[64:576].decode("utf-16-be", "replace").rstrip("\x00")
    dyn_info: dict[str, object] = {
        "table_offset": table_offset,
        "header_version": hdr_ver,
        "max_table_entries": max_entries,
        "block_size": block_size,
        "checksum_ok": dchecksum == vhd_checksum(dyn, 36),
    }
    info["dynamic_header"] = dyn_info
    if not dyn_info["checksum_ok"]:
        f.reject("vhd-bad-checksum", "dynamic disk header has a bad checksum")

    locators = []
    for i in range(8):
        code, space, length, _res, off = struct.unpack_from(">4sIIIQ", dyn, 576 + 24 * i)
        if code != b"\x00\x00\x00\x00":
            locators.append({"platform": PLATFORM_CODES.get(code, code.decode("latin-1")),
                             "data_length": length, "data_offset": off})
    if disk_type == DIFFERENCING or locators or any(parent_uuid) or parent_name:
        info["parent"] = {"name": parent_name, "uuid": parent_uuid.hex(), "locators": locators}
        f.reject("backing-file",
                 f"differencing VHD: depends on a parent disk {parent_name!r}"
                 " (a backing file can name any host file; flatten it with 'qemu-img convert')")
    return table_offset, max_entries, block_size


def _check_bat(fd: int, size: int, bat_end: int, dyn: tuple[int, int, int], cur_size: int,
               info: dict[str, object], f: Findings) -> None:
    """The block allocation table (``dyn``: its offset, its entries, the block size): its size and place
    (before ``bat_end``), and every allocated block inside the file."""
    table_offset, max_entries, block_size = dyn
    if block_size < 512 or block_size & (block_size - 1) or block_size > 256 * 1024 * 1024:
        f.reject("vhd-bad-block-size", f"block size {block_size} is not a power of two in 512..256 MiB")
        return
    if max_entries * block_size < cur_size:
        f.reject("vhd-bat-too-small", f"{max_entries} blocks of {block_size} do not cover {cur_size} bytes")
    bat_len = max_entries * 4
    if table_offset + bat_len > bat_end:
        f.reject("vhd-bat-outside-file",
                 f"block allocation table ({table_offset}+{bat_len}) extends beyond the end of the file ({size})")
        return
    if bat_len > MAX_BAT_BYTES:
        f.warn("vhd-bat-not-checked", f"BAT of {bat_len} bytes is too large to check")
        return
    bat = read_exact(fd, table_offset, bat_len)
    if bat is None:
        f.reject("vhd-truncated", "short read on the block allocation table")
        return
    bitmap = ((block_size // 512 + 7) // 8 + 511) // 512 * 512
    allocated = 0
    outside = 0
    for (entry,) in struct.iter_unpack(">I", bat):
        if entry == 0xFFFFFFFF:
            continue
        allocated += 1
        if entry * 512 + bitmap + block_size > size:
            outside += 1
    info["allocated_blocks"] = allocated
    if outside:
        f.reject("vhd-block-outside-file", f"{outside} allocated block(s) point beyond the end of the file")
