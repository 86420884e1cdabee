"""Partition table check for raw disks and hybrid ISOs: MBR and GPT.

Checked: the MBR signature and its four entries (inside the disk); for GPT the
protective MBR, the header at LBA 1 (``EFI PART``, header CRC32
``gpt-bad-header-crc``), the partition array (CRC32 ``gpt-bad-array-crc``,
entries inside the usable area and the disk, overlaps) and the backup header
at the LBA the primary names. The partitions are reported. Bounded reads.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib

from imagekit.formats.base import FormatReport, VerifyOptions
from imagekit.formats.detect import read_exact, verify_file
from imagekit.verdict import Finding, Findings, Severity

MAX_ARRAY = 1024 * 1024  # 8192 entries of 128 bytes: far beyond any real table
ESP = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
BIOS_BOOT = uuid.UUID("21686148-6449-6E6F-744E-656564454649")


def parse_mbr(sector: bytes) -> dict[str, object] | None:
    """The MBR partition entries of a 512-byte sector, or None if it has no 0x55AA signature."""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return None
    parts = []
    for i in range(4):
        boot, ptype, start, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * i)
        if ptype:
            parts.append({"index": i + 1, "bootable": boot == 0x80, "boot_flag": boot, "type": ptype,
                          "start_lba": start, "sectors": count})
    return {"partitions": parts, "has_boot_code": any(sector[:440]), "protective": any(p["type"] == 0xEE
                                                                                        for p in parts)}


def _parse_header(buf: bytes) -> dict[str, object]:
    (sig, rev, hsize, crc, _res, cur, backup, first, last, dguid, arr_lba, n, esize, arr_crc) = struct.unpack_from(
        "<8sIIIIQQQQ16sQIII", buf, 0)
    ok = False
    if 92 <= hsize <= len(buf):
        h = bytearray(buf[:hsize])
        h[16:20] = b"\x00\x00\x00\x00"
        ok = zlib.crc32(bytes(h)) == crc
    return {"signature_ok": sig == b"EFI PART", "revision": rev, "header_size": hsize, "crc_ok": ok,
            "current_lba": cur, "backup_lba": backup, "first_usable": first, "last_usable": last,
            "disk_guid": str(uuid.UUID(bytes_le=dguid)), "array_lba": arr_lba, "entries": n,
            "entry_size": esize, "array_crc": arr_crc}


def verify(path: str | os.PathLike[str], options: VerifyOptions | None = None, *,
           severity: Severity = "reject") -> FormatReport:
    """Check the partition table of a raw disk (or hybrid ISO); ``options`` are not used.

    ``severity`` is used for structural damage (hybrid ISOs may pass "warn": their
    payload is the ISO 9660 filesystem, the table only helps booting as a disk).
    """
    return verify_file(path, _verify_fd, severity)


def _verify_fd(fd: int, size: int, sev: Severity) -> tuple[dict[str, object], tuple[Finding, ...]]:
    f = Findings()
    info: dict[str, object] = {"partition_table": None}
    mbr_sector = read_exact(fd, 0, 512)
    mbr = parse_mbr(mbr_sector) if mbr_sector else None
    if mbr is None:
        return info, f.freeze()
    info["mbr"] = mbr
    info["partition_table"] = "mbr"
    _check_mbr(mbr, size // 512, sev, f)

    for sector_size in (512, 4096):
        hbuf = read_exact(fd, sector_size, 512)
        if hbuf is not None and hbuf[:8] == b"EFI PART":
            break
    else:
        if mbr["protective"]:
            f.add("gpt-missing", sev, "protective MBR but no GPT header at LBA 1")
        return info, f.freeze()
    info["partition_table"] = "gpt"
    info["sector_size"] = sector_size
    hdr = _parse_header(hbuf)
    info["gpt"] = hdr
    if not mbr["protective"]:
        f.warn("gpt-no-protective-mbr", "GPT disk without a protective (0xEE) MBR entry")
    array = _check_header(fd, hdr, size // sector_size, sector_size, sev, f)
    if array is not None:
        info["partitions"] = _partitions(array, hdr, sev, f)
        _check_backup(fd, hdr, size // sector_size, sector_size, info, f)
    return info, f.freeze()


def _check_mbr(mbr: dict[str, object], disk_sectors: int, sev: Severity, f: Findings) -> None:
    """The MBR entries' boot flags and that each partition ends inside the disk."""
    parts: list[dict[str, object]] = mbr["partitions"]  # type: ignore[assignment]
    for p in parts:
        if p["boot_flag"] not in (0, 0x80):
            f.add("mbr-bad-entry", sev, f"MBR entry {p['index']} has an invalid boot flag {p['boot_flag']:#x}")
        if p["type"] != 0xEE and int(p["start_lba"]) + int(p["sectors"]) > disk_sectors:  # type: ignore[call-overload]
            f.add("mbr-partition-outside-disk", sev,
                  f"MBR partition {p['index']} ends beyond the end of the disk ({disk_sectors} sectors)")


def _check_header(fd: int, hdr: dict[str, object], disk_lbas: int, sector_size: int, sev: Severity,
                  f: Findings) -> bytes | None:
    """The primary header (CRC32, its own LBA, the usable area) and its partition array (read, CRC32);
    the array, or None if it cannot be read."""
    if not hdr["crc_ok"]:
        f.add("gpt-bad-header-crc", sev, "primary GPT header CRC32 mismatch (corrupt or tampered)")
    n, esize = int(hdr["entries"]), int(hdr["entry_size"])  # type: ignore[call-overload]
    first, last = int(hdr["first_usable"]), int(hdr["last_usable"])  # type: ignore[call-overload]
    if esize < 128 or esize & (esize - 1) or n * esize > MAX_ARRAY or n == 0:
        f.add("gpt-bad-header", sev, f"partition array of {n} entries of {esize} bytes is invalid")
        return None
    if hdr["current_lba"] != 1:
        f.add("gpt-bad-header", sev, f"primary header says it is at LBA {hdr['current_lba']}")
    if last >= disk_lbas or first > last:
        f.add("gpt-bad-header", sev, f"usable area {first}..{last} does not fit a disk of {disk_lbas} sectors")
    arr_off = int(hdr["array_lba"]) * sector_size  # type: ignore[call-overload]
    array = read_exact(fd, arr_off, n * esize)
    if array is None:
        f.add("gpt-truncated", sev, "partition array lies beyond the end of the file")
        return None
    if zlib.crc32(array) != hdr["array_crc"]:
        f.add("gpt-bad-array-crc", sev, "GPT partition array CRC32 mismatch (corrupt or tampered)")
    return array


def _partitions(array: bytes, hdr: dict[str, object], sev: Severity, f: Findings) -> list[dict[str, object]]:
    """The used entries of the partition array (at most 257), each inside the usable area; overlaps."""
    n, esize = int(hdr["entries"]), int(hdr["entry_size"])  # type: ignore[call-overload]
    first, last = int(hdr["first_usable"]), int(hdr["last_usable"])  # type: ignore[call-overload]
    partitions: list[dict[str, object]] = []
    for i in range(n):
        e = array[i * esize:(i + 1) * esize]
        if not any(e[:16]):
            continue
        tguid, pguid = uuid.UUID(bytes_le=e[:16]), uuid.UUID(bytes_le=e[16:32])
        start, end, attrs = struct.unpack_from("<QQQ", e, 32)
        name = e[56:128].decode("utf-16-le", "replace").split("\x00", 1)[0]
        partitions.append({"index": i + 1, "type_guid": str(tguid), "guid": str(pguid), "first_lba": start,
                           "last_lba": end, "attributes": attrs, "name": name,
                           "esp": tguid == ESP, "bios_boot": tguid == BIOS_BOOT})
        if end < start or start < first or end > last:
            f.add("gpt-partition-outside-disk", sev,
                  f"GPT partition {i + 1} ({start}..{end}) lies outside the usable area {first}..{last}")
        if len(partitions) > 256:
            break
    spans = sorted((int(p["first_lba"]), int(p["last_lba"]), p["index"]) for p in partitions)  # type: ignore[call-overload]
    for a, b in zip(spans, spans[1:], strict=False):
        if b[0] <= a[1]:
            f.warn("gpt-partition-overlap", f"GPT partitions {a[2]} and {b[2]} overlap")
    return partitions


def _check_backup(fd: int, hdr: dict[str, object], disk_lbas: int, sector_size: int, info: dict[str, object],
                  f: Findings) -> None:
    """The backup header at the LBA the primary names."""
    backup_lba = int(hdr["backup_lba"])  # type: ignore[call-overload]
    bbuf = read_exact(fd, backup_lba * sector_size, 512) if backup_lba < disk_lbas else None
    if bbuf is None:
        f.warn("gpt-backup-missing", f"backup GPT header LBA {backup_lba} is beyond the end of the disk")
    else:
        bhdr = _parse_header(bbuf)
        if not (bhdr["signature_ok"] and bhdr["crc_ok"]):
            f.warn("gpt-backup-invalid", "backup GPT header is missing or has a bad CRC32")
        info["backup_ok"] = bool(bhdr["signature_ok"] and bhdr["crc_ok"])
