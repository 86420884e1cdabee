"""ISO 9660 check: volume descriptors, El Torito boot, hybrid (disk-bootable) layout.

Checked: the primary volume descriptor at 32 KiB (``CD001``, block size,
volume size against the file size), the descriptor set up to its terminator
(bounded), an El Torito boot record and its boot catalog (validation entry
checksum, BIOS and UEFI entries), and whether the image is hybrid: an MBR with
partitions or a GPT at LBA 1 (then it can also be written to a disk and booted,
not only used as an installer CD). Bounded reads.
"""

from __future__ import annotations

import os
import struct

from imagekit.formats import gpt
from imagekit.formats.base import FormatReport, VerifyOptions, report
from imagekit.formats.detect import open_image, read_exact
from imagekit.verdict import Finding, Findings

SECTOR = 2048
PVD_OFFSET = 16 * SECTOR
MAX_DESCRIPTORS = 64
PLATFORMS = {0: "bios", 1: "ppc", 2: "mac", 0xEF: "efi"}


def verify(path: str | os.PathLike[str], options: VerifyOptions | None = None) -> FormatReport:
    """Check an ISO 9660 image (``options`` are not used: every check is cheap)."""
    fd, st = open_image(path)
    try:
        info, findings = _verify_fd(fd, st.st_size)
    finally:
        os.close(fd)
    if info.get("hybrid"):
        # The partition table of a hybrid ISO only matters when booting it as a
        # disk: damage there is worth a warning, not a refusal.
        table = gpt.verify(path, severity="warn")
        pinfo = dict(table.format_info)
        info["partition_info"] = pinfo
        findings = findings + table.findings
        parts: list[dict[str, object]] = pinfo.get("partitions", [])  # type: ignore[assignment]
        mbr: dict[str, object] = pinfo.get("mbr", {})  # type: ignore[assignment]
        info["bootable_as_disk"] = bool(any(p.get("esp") for p in parts) or mbr.get("has_boot_code"))
    else:
        info["bootable_as_disk"] = False
    info["installer_only"] = not info["bootable_as_disk"]
    return report(info, findings)


def _verify_fd(fd: int, size: int) -> tuple[dict[str, object], tuple[Finding, ...]]:
    f = Findings()
    info: dict[str, object] = {"file_size": size}
    pvd = read_exact(fd, PVD_OFFSET, SECTOR)
    if pvd is None:
        f.reject("iso-truncated", "file too short for an ISO 9660 volume descriptor at 32 KiB")
        return info, f.freeze()
    if pvd[1:6] != b"CD001":
        kind = pvd[1:6].decode("latin-1")
        f.reject("iso-not-iso9660", f"no ISO 9660 primary volume descriptor at 32 KiB (found {kind!r}; UDF-only "
                 "images are not supported)")
        return info, f.freeze()
    boot_catalog: int | None = None
    pvd_seen = False
    for i in range(MAX_DESCRIPTORS):
        vd = pvd if i == 0 else read_exact(fd, PVD_OFFSET + i * SECTOR, SECTOR)
        if vd is None or vd[1:6] != b"CD001":
            f.reject("iso-bad-descriptors", f"volume descriptor {16 + i} is missing or invalid (no terminator)")
            break
        vtype = vd[0]
        if vtype == 255:
            break
        if vtype == 1 and not pvd_seen:
            pvd_seen = True
            (vol_blocks,) = struct.unpack_from("<I", vd, 80)
            (block_size,) = struct.unpack_from("<H", vd, 128)
            info["volume_id"] = vd[40:72].decode("latin-1").strip()
            info["system_id"] = vd[8:40].decode("latin-1").strip()
            info["block_size"] = block_size
            info["volume_size"] = vol_blocks * block_size
            info["virtual_size"] = max(vol_blocks * block_size, size)
            if block_size not in (512, 1024, 2048):
                f.reject("iso-bad-descriptors", f"logical block size {block_size} is invalid")
            elif vol_blocks * block_size > size:
                f.reject("iso-truncated", f"volume is {vol_blocks * block_size} bytes but the file only {size}")
        elif vtype == 0 and vd[7:30] == b"EL TORITO SPECIFICATION":
            (boot_catalog,) = struct.unpack_from("<I", vd, 71)
    else:
        f.reject("iso-bad-descriptors", f"more than {MAX_DESCRIPTORS} volume descriptors")
    if not pvd_seen:
        f.reject("iso-bad-descriptors", "no primary volume descriptor")

    eltorito: dict[str, object] = {"present": boot_catalog is not None}
    if boot_catalog is not None:
        eltorito.update(_boot_catalog(fd, boot_catalog, f))
    info["el_torito"] = eltorito

    head = read_exact(fd, 0, 4104) or b""
    mbr = gpt.parse_mbr(head[:512])
    has_gpt = head[512:520] == b"EFI PART"
    info["hybrid"] = bool((mbr is not None and mbr["partitions"]) or has_gpt)
    info["hybrid_table"] = "gpt" if has_gpt else ("mbr" if info["hybrid"] else None)
    return info, f.freeze()


def _boot_catalog(fd: int, lba: int, f: Findings) -> dict[str, object]:
    out: dict[str, object] = {"catalog_lba": lba}
    cat = read_exact(fd, lba * SECTOR, SECTOR)
    if cat is None:
        f.reject("iso-bad-boot-catalog", "El Torito boot catalog lies beyond the end of the file")
        return out
    if cat[0] != 1 or cat[30:32] != b"\x55\xaa" or sum(struct.unpack_from("<16H", cat, 0)) & 0xFFFF:
        f.warn("iso-bad-boot-catalog", "El Torito validation entry is invalid (bad checksum or key)")
        return out
    platforms = {PLATFORMS.get(cat[1], f"platform-{cat[1]:#x}")} if cat[32] == 0x88 else set()
    # Section headers (0x90 more follow, 0x91 last) each with their entries.
    off = 64
    while off + 32 <= SECTOR:
        kind = cat[off]
        if kind not in (0x90, 0x91):
            break
        plat = PLATFORMS.get(cat[off + 1], f"platform-{cat[off + 1]:#x}")
        (count,) = struct.unpack_from("<H", cat, off + 2)
        for j in range(count):
            e = off + 32 * (j + 1)
            if e + 32 <= SECTOR and cat[e] == 0x88:
                platforms.add(plat)
        off += 32 * (count + 1)
        if kind == 0x91:
            break
    out["platforms"] = sorted(platforms)
    out["bios"] = "bios" in platforms
    out["efi"] = "efi" in platforms
    return out
