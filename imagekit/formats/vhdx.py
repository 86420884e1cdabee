"""VHDX structure check (MS-VHDX).

Checked: the ``vhdxfile`` identifier; both 4 KiB headers (``head`` signature,
CRC32C, sequence number; the valid one with the higher sequence is current,
as QEMU and Hyper-V do); a log that still needs replaying; the region table
(``regi``, CRC32C, known required regions); that the BAT and metadata regions
lie inside the file; the metadata table (virtual disk size, block size, sector
sizes, parent locator -> ``backing-file``); and that allocated payload blocks in
the BAT point inside the file. Bounded ``pread``s; a short read is a finding.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass

from imagekit.formats.base import FormatReport, VerifyOptions
from imagekit.formats.detect import read_exact, verify_file
from imagekit.verdict import Finding, Findings

KiB, MiB = 1024, 1024 * 1024
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
REGION_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
META_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
META_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
META_PAGE83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
META_LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
META_PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
META_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
KNOWN_META = {META_FILE_PARAMETERS, META_VIRTUAL_DISK_SIZE, META_PAGE83, META_LOGICAL_SECTOR,
              META_PHYSICAL_SECTOR, META_PARENT_LOCATOR}
MAX_VIRTUAL = 64 * 1024**4  # 64 TiB
MAX_BAT_BYTES = 64 * MiB
PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT = 6, 7


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as VHDX uses for headers, region tables and log entries."""
    c = crc ^ 0xFFFFFFFF
    t = _TABLE
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _crc_ok(buf: bytes, csum_offset: int = 4) -> bool:
    (stored,) = struct.unpack_from("<I", buf, csum_offset)
    zeroed = buf[:csum_offset] + b"\x00\x00\x00\x00" + buf[csum_offset + 4:]
    return stored == crc32c(zeroed)


def _guid(b: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(b))


def verify(path: str | os.PathLike[str], options: VerifyOptions | None = None) -> FormatReport:
    """Check a VHDX file (``options`` are not used: every check is cheap)."""
    return verify_file(path, _verify_fd)


@dataclass(frozen=True)
class _Params:
    """What the metadata says about the virtual disk."""

    block_size: int
    logical_sector: int
    virtual_size: int
    has_parent: bool


def _verify_fd(fd: int, size: int) -> tuple[dict[str, object], tuple[Finding, ...]]:
    f = Findings()
    info: dict[str, object] = {"file_size": size}
    ident = read_exact(fd, 0, 8)
    if ident != b"vhdxfile":
        f.reject("vhdx-bad-signature", "missing the 'vhdxfile' identifier at offset 0")
        return info, f.freeze()
    if not _headers(fd, info, f):
        return info, f.freeze()
    regions = _regions(fd, size, f)
    if regions is None:
        return info, f.freeze()
    info["regions"] = regions
    if "bat" not in regions or "metadata" not in regions:
        f.reject("vhdx-bad-region-table", "BAT or metadata region missing")
        return info, f.freeze()
    if f.has("vhdx-region-outside-file"):
        return info, f.freeze()
    items = _metadata_items(fd, regions["metadata"], f)
    if items is None:
        return info, f.freeze()
    params = _params(items, info, f)
    if params is not None:
        _check_bat(fd, size, regions["bat"], params, info, f)
    return info, f.freeze()


def _headers(fd: int, info: dict[str, object], f: Findings) -> bool:
    """Both 4 KiB headers; the valid one with the higher sequence is current. False: neither is valid."""
    headers = []
    for n, off in enumerate(HEADER_OFFSETS, 1):
        buf = read_exact(fd, off, 4 * KiB)
        if buf is None:
            f.reject("vhdx-truncated", f"header {n} at {off} is beyond the end of the file")
            continue
        if buf[:4] != b"head":
            f.warn("vhdx-bad-header", f"header {n} lacks the 'head' signature")
            continue
        if not _crc_ok(buf):
            f.warn("vhdx-bad-header-crc", f"header {n} has a bad CRC32C (corrupt or tampered)")
            continue
        seq, = struct.unpack_from("<Q", buf, 8)
        log_guid = _guid(buf[48:64])
        log_version, version, log_length, log_offset = struct.unpack_from("<HHIQ", buf, 64)
        headers.append({"index": n, "sequence": seq, "log_guid": str(log_guid), "log_version": log_version,
                        "version": version, "log_length": log_length, "log_offset": log_offset})
    if not headers:
        f.reject("vhdx-no-valid-header", "neither VHDX header is valid; the file cannot be opened safely")
        for i, item in enumerate(f.items):  # a warn on a lone bad header becomes fatal
            if item.code in ("vhdx-bad-header-crc", "vhdx-bad-header"):
                f.items[i] = Finding(item.code, "reject", item.message)
        return False
    cur = max(headers, key=lambda h: int(h["sequence"]))
    info["header"] = cur
    if cur["version"] != 1:
        f.reject("vhdx-version", f"unsupported VHDX version {cur['version']}")
    if cur["log_guid"] != str(uuid.UUID(int=0)):
        f.reject("vhdx-log-replay-needed",
                 "the VHDX log must be replayed before use (opening it would write to the image); "
                 "open it once in Hyper-V or with qemu-img read-write, then re-check")
    return True


def _regions(fd: int, size: int, f: Findings) -> dict[str, dict[str, int]] | None:
    """The region table (QEMU reads table 1; table 2 is a copy): the BAT and metadata regions."""
    tables = [read_exact(fd, off, 64 * KiB) for off in REGION_TABLE_OFFSETS]
    ok = [t is not None and t[:4] == b"regi" and _crc_ok(t) for t in tables]
    if not ok[1]:
        f.warn("vhdx-bad-region-crc", "region table 2 (the copy) is corrupt (bad 'regi' signature or CRC32C)")
    table = tables[0]
    if table is None or not ok[0]:
        f.reject("vhdx-bad-region-crc", "region table 1 is corrupt (bad 'regi' signature or CRC32C)")
        return None
    regions: dict[str, dict[str, int]] = {}
    (count,) = struct.unpack_from("<I", table, 8)
    if count > 2047:
        f.reject("vhdx-bad-region-table", f"region table has {count} entries (limit 2047)")
        return None
    for i in range(count):
        e = 16 + 32 * i
        guid = _guid(table[e:e + 16])
        foff, length, required = struct.unpack_from("<QII", table, e + 16)
        name = {REGION_BAT: "bat", REGION_METADATA: "metadata"}.get(guid)
        if name is None:
            if required & 1:
                f.reject("vhdx-unknown-region", f"unknown required region {guid}")
            continue
        if name in regions:
            f.reject("vhdx-bad-region-table", f"region {name} listed twice")
        regions[name] = {"offset": foff, "length": length}
        if foff % MiB or length % MiB or foff < MiB:
            f.reject("vhdx-bad-region-table", f"{name} region {foff}+{length} is not 1 MiB aligned")
        if foff + length > size:
            f.reject("vhdx-region-outside-file",
                     f"{name} region ({foff}+{length}) extends beyond the end of the file ({size})")
    return regions


def _metadata_items(fd: int, region: dict[str, int], f: Findings) -> dict[uuid.UUID, bytes] | None:
    """The known metadata items of the metadata region, read (bounded); None: no usable metadata table."""
    moff, mlen = region["offset"], region["length"]
    mtab = read_exact(fd, moff, 64 * KiB)
    if mtab is None or mtab[:8] != b"metadata":
        f.reject("vhdx-bad-metadata", "metadata table lacks the 'metadata' signature")
        return None
    (mcount,) = struct.unpack_from("<H", mtab, 10)
    if mcount > 2047:
        f.reject("vhdx-bad-metadata", f"metadata table has {mcount} entries (limit 2047)")
        return None
    items: dict[uuid.UUID, bytes] = {}
    for i in range(mcount):
        e = 32 + 32 * i
        guid = _guid(mtab[e:e + 16])
        ioff, ilen, flags = struct.unpack_from("<III", mtab, e + 16)
        if ilen == 0:
            continue
        if ioff < 64 * KiB or ioff + ilen > mlen or ilen > MiB:
            f.reject("vhdx-bad-metadata", f"metadata item {guid} ({ioff}+{ilen}) lies outside the metadata region")
            continue
        if guid not in KNOWN_META:
            if flags & 4:
                f.reject("vhdx-bad-metadata", f"unknown required metadata item {guid}")
            continue
        data = read_exact(fd, moff + ioff, ilen)
        if data is None:
            f.reject("vhdx-truncated", f"short read on metadata item {guid}")
            continue
        items[guid] = data
    return items


def _item(items: dict[uuid.UUID, bytes], guid: uuid.UUID, fmt: str) -> int:
    """One integer metadata item (0 if missing or short)."""
    data = items.get(guid, b"")
    return int(struct.unpack_from(fmt, data)[0]) if len(data) >= struct.calcsize(fmt) else 0


def _params(items: dict[uuid.UUID, bytes], info: dict[str, object], f: Findings) -> _Params | None:
    """Block size, sector sizes, virtual size and parent locator; None: they make the BAT unreadable."""
    block_size = has_parent = 0
    if META_FILE_PARAMETERS in items and len(items[META_FILE_PARAMETERS]) >= 8:
        block_size, fp_flags = struct.unpack_from("<II", items[META_FILE_PARAMETERS])
        has_parent = fp_flags & 2
        info["leave_blocks_allocated"] = bool(fp_flags & 1)
    vsize = _item(items, META_VIRTUAL_DISK_SIZE, "<Q")
    lss = _item(items, META_LOGICAL_SECTOR, "<I")
    pss = _item(items, META_PHYSICAL_SECTOR, "<I")
    info.update({"virtual_size": vsize, "block_size": block_size, "logical_sector_size": lss,
                 "physical_sector_size": pss})
    if has_parent or META_PARENT_LOCATOR in items:
        info["parent_locator"] = _parent_locator(items.get(META_PARENT_LOCATOR, b""))
        f.reject("backing-file",
                 "differencing VHDX: it has a parent locator naming another file "
                 "(a backing file can name any host file; merge it into a standalone disk first)")
    if not (MiB <= block_size <= 256 * MiB) or block_size & (block_size - 1):
        f.reject("vhdx-bad-metadata", f"block size {block_size} is not a power of two in 1..256 MiB")
        return None
    if lss not in (512, 4096) or pss not in (512, 4096):
        f.reject("vhdx-bad-metadata", f"sector sizes {lss}/{pss} are not 512 or 4096")
        return None
    if not 0 < vsize <= MAX_VIRTUAL or vsize % lss:
        f.reject("vhdx-bad-metadata", f"virtual disk size {vsize} is zero, unaligned or above 64 TiB")
        return None
    return _Params(block_size, lss, vsize, bool(has_parent))


def _check_bat(fd: int, size: int, region: dict[str, int], p: _Params, info: dict[str, object],
               f: Findings) -> None:
    """The BAT: large enough for the disk, and every allocated payload block inside the file."""
    block_size = p.block_size
    chunk_ratio = (1 << 23) * p.logical_sector // block_size
    data_blocks = -(-p.virtual_size // block_size)
    if p.has_parent:
        entries = (-(-data_blocks // chunk_ratio)) * (chunk_ratio + 1)
    else:
        entries = data_blocks + (data_blocks - 1) // chunk_ratio
    boff, blen = region["offset"], region["length"]
    if entries * 8 > blen:
        f.reject("vhdx-bat-too-small", f"BAT region holds {blen // 8} entries, {entries} are needed")
        return
    if entries * 8 > MAX_BAT_BYTES:
        f.warn("vhdx-bat-not-checked", f"BAT of {entries * 8} bytes is too large to check")
        return
    bat = read_exact(fd, boff, entries * 8)
    if bat is None:
        f.reject("vhdx-truncated", "short read on the BAT")
        return
    allocated = outside = 0
    for idx, (entry,) in enumerate(struct.iter_unpack("<Q", bat)):
        if (idx + 1) % (chunk_ratio + 1) == 0:
            continue  # sector bitmap entry
        state = entry & 7
        if state in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
            allocated += 1
            if (entry >> 20) * MiB + block_size > size:
                outside += 1
    info["allocated_blocks"] = allocated
    if outside:
        f.reject("vhdx-block-outside-file", f"{outside} allocated block(s) point beyond the end of the file")


def _parent_locator(data: bytes) -> dict[str, object]:
    """Decode the parent locator key/value pairs (UTF-16LE), bounded."""
    out: dict[str, object] = {}
    if len(data) < 20:
        return out
    count = struct.unpack_from("<H", data, 18)[0]
    for i in range(min(count, 64)):
        e = 20 + 12 * i
        if e + 12 > len(data):
            break
        koff, voff, klen, vlen = struct.unpack_from("<IIHH", data, e)
        key = data[koff:koff + klen].decode("utf-16-le", "replace")
        val = data[voff:voff + vlen].decode("utf-16-le", "replace")
        out[key[:256]] = val[:1024]
    return out
