"""VMDK structure check: single-file sparse VMDKs only.

Accepted: a ``KDMV`` hosted sparse extent (version 1-3) with its descriptor
embedded, ``createType`` monolithicSparse or streamOptimized, one SPARSE extent
naming no other file. Refused: text-only descriptor files
(``vmdk-descriptor-file``) and any FLAT/VMFS/... extent or extent naming another
file (``vmdk-flat-extent`` / ``vmdk-external-extent``: CVE-2022-47951, a descriptor
that makes qemu-img read a host file such as /etc/passwd into the image);
parents (``parentCID``/``parentFileNameHint`` -> ``backing-file``); a zero
capacity sparse header (QEMU then treats the embedded descriptor as a
descriptor file); grain directories/tables outside the file. Bounded reads.
"""

from __future__ import annotations

import os
import re
import struct

from imagekit.formats.base import FormatReport, VerifyOptions
from imagekit.formats.detect import read_at, read_exact, verify_file
from imagekit.verdict import Finding, Findings

SECTOR = 512
GD_AT_END = 0xFFFFFFFFFFFFFFFF
MAX_DESC = 1024 * 1024
MAX_GD_BYTES = 16 * 1024 * 1024
MAX_GT_BYTES = 64 * 1024 * 1024
ALLOWED_CREATE_TYPES = {"monolithicsparse", "streamoptimized"}
FLAT_TYPES = {"FLAT", "VMFS", "VMFSRDM", "VMFSRAW", "ZERO"}
SPARSE_TYPES = {"SPARSE", "VMFSSPARSE", "SESPARSE"}
_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$', re.IGNORECASE)
_KV_RE = re.compile(r'^([A-Za-z0-9_.]+)\s*=\s*"?([^"]*)"?\s*$')


def parse_descriptor(text: str) -> dict[str, object]:
    """Parse descriptor text into header fields, extents and unparsed lines (all bounded)."""
    fields: dict[str, str] = {}
    extents: list[dict[str, object]] = []
    unknown: list[str] = []
    for raw in text.splitlines()[:4096]:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            extents.append({"access": m.group(1).upper(), "sectors": int(m.group(2)), "type": m.group(3).upper(),
                            "file": m.group(4), "offset": int(m.group(5) or 0)})
            continue
        kv = _KV_RE.match(line)
        if kv:
            if not kv.group(1).lower().startswith("ddb."):
                fields[kv.group(1)] = kv.group(2)[:1024]
            continue
        unknown.append(line[:200])
    return {"fields": fields, "extents": extents, "unknown_lines": unknown[:20]}


def _check_descriptor(desc: dict[str, object], f: Findings, *, embedded: bool, own_name: str) -> None:
    fields: dict[str, str] = desc["fields"]  # type: ignore[assignment]
    extents: list[dict[str, object]] = desc["extents"]  # type: ignore[assignment]
    lower = {k.lower(): v for k, v in fields.items()}
    ctype = lower.get("createtype", "")
    if ctype.lower() not in ALLOWED_CREATE_TYPES:
        f.reject("vmdk-create-type",
                 f"createType {ctype!r} is not allowed (only monolithicSparse and streamOptimized are single-file)")
    parent_cid = lower.get("parentcid", "ffffffff").lower()
    if parent_cid != "ffffffff" or "parentfilenamehint" in lower:
        hint = lower.get("parentfilenamehint", "")
        f.reject("backing-file",
                 f"VMDK has a parent (parentCID={parent_cid}, parentFileNameHint={hint!r}); a parent can name any "
                 "host file. Flatten it with 'qemu-img convert' first")
    if desc["unknown_lines"]:
        f.warn("vmdk-descriptor-syntax", f"descriptor lines not understood: {desc['unknown_lines'][:3]}")  # type: ignore[index]
    if not extents:
        f.reject("vmdk-no-extent", "the descriptor lists no extent")
    if embedded and len(extents) > 1:
        f.reject("vmdk-external-extent", f"a single-file VMDK lists {len(extents)} extents")
    for ext in extents:
        name = str(ext["file"] or "")
        etype = str(ext["type"])
        if etype in FLAT_TYPES:
            f.reject("vmdk-flat-extent",
                     f"{etype} extent {name!r}: raw data read from another file (CVE-2022-47951 pattern)")
        elif etype not in SPARSE_TYPES:
            f.reject("vmdk-extent-type", f"unknown extent type {etype!r}")
        if name.lower().startswith("json:") or "/" in name or "\\" in name or ":" in name:
            f.reject("vmdk-external-extent",
                     f"extent names a path or protocol {name!r}: it could make qemu-img read a host file "
                     "(CVE-2022-47951)")
        elif not embedded and name:
            f.reject("vmdk-external-extent", f"extent data lives in another file {name!r}")
        elif embedded and name and name != own_name:
            f.info("vmdk-extent-name", f"embedded extent name {name!r} differs from the file name (ignored by QEMU)")


def _parse_header(buf: bytes) -> dict[str, int]:
    (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead) = struct.unpack_from(
        "<4sIIQQQQIQQQ", buf, 0)
    return {"version": version, "flags": flags, "capacity": capacity, "grain_size": grain,
            "descriptor_offset": desc_off, "descriptor_size": desc_size, "gtes_per_gt": gtes,
            "rgd_offset": rgd, "gd_offset": gd, "overhead": overhead, "unclean_shutdown": buf[72],
            "newline_chars": int.from_bytes(buf[73:77], "big"), "compress_algorithm": buf[77] | buf[78] << 8}


def verify(path: str | os.PathLike[str], options: VerifyOptions | None = None) -> FormatReport:
    """Check a VMDK file (``options`` are not used: every check is cheap)."""
    return verify_file(path, _verify_fd, os.path.basename(os.fspath(path)))


def _verify_fd(fd: int, size: int, own_name: str) -> tuple[dict[str, object], tuple[Finding, ...]]:
    f = Findings()
    info: dict[str, object] = {"file_size": size}
    head = read_exact(fd, 0, SECTOR)
    magic = head[:4] if head else read_at(fd, 0, 4)
    if magic == b"COWD":
        info["subformat"] = "vmdk3"
        f.reject("vmdk-version", "VMDK3 (COWD) sparse files are not supported")
        return info, f.freeze()
    if magic != b"KDMV":
        _descriptor_file(fd, info, f, own_name)
        return info, f.freeze()
    if head is None:
        f.reject("vmdk-truncated", f"file is {size} bytes, smaller than a sparse header")
        return info, f.freeze()

    hdr = _parse_header(head)
    info["header"] = hdr
    if not _header_ok(hdr, f) or not _embedded_descriptor(fd, size, hdr, info, f, own_name):
        return info, f.freeze()
    gd_off = _gd_offset(fd, size, hdr, info, f)
    if gd_off is not None:
        _grain_tables(fd, size, hdr, gd_off, info, f)
    return info, f.freeze()


def _descriptor_file(fd: int, info: dict[str, object], f: Findings, own_name: str) -> None:
    """A text descriptor: everything it describes lives in other files."""
    text = read_at(fd, 0, MAX_DESC).split(b"\x00", 1)[0].decode("ascii", "replace")
    desc = parse_descriptor(text)
    info["subformat"] = "descriptor"
    info["descriptor"] = desc
    f.reject("vmdk-descriptor-file",
             "text-only VMDK descriptor: its data lives in other files it names (refused: CVE-2022-47951)")
    _check_descriptor(desc, f, embedded=False, own_name=own_name)


def _header_ok(hdr: dict[str, int], f: Findings) -> bool:
    """The sparse header's version, newline bytes, clean shutdown, grain size and grain table size."""
    if hdr["version"] not in (1, 2, 3):
        f.reject("vmdk-version", f"unsupported sparse extent version {hdr['version']}")
        return False
    if hdr["flags"] & 1 and hdr["newline_chars"] != 0x0A200D0A:
        f.reject("vmdk-corrupt-newlines", "newline detection bytes are wrong: the file was corrupted by a text "
                 "mode transfer")
    if hdr["unclean_shutdown"]:
        f.warn("vmdk-unclean-shutdown", "the image was not closed cleanly")
    grain, gtes = hdr["grain_size"], hdr["gtes_per_gt"]
    if grain < 1 or grain & (grain - 1) or grain > 2048:
        f.reject("vmdk-bad-header", f"grain size {grain} sectors is not a power of two up to 1 MiB")
        return False
    if gtes < 1 or gtes > 512:
        f.reject("vmdk-bad-header", f"{gtes} grain table entries per table (QEMU allows up to 512)")
        return False
    return True


def _embedded_descriptor(fd: int, size: int, hdr: dict[str, int], info: dict[str, object], f: Findings,
                         own_name: str) -> bool:
    """The descriptor embedded in a sparse file; False: the grain directory must not be walked."""
    d_off, d_len = hdr["descriptor_offset"] * SECTOR, hdr["descriptor_size"] * SECTOR
    if d_off == 0 or d_len == 0:
        f.reject("vmdk-bad-header", "sparse header has no embedded descriptor")
        return False
    if d_len > MAX_DESC or d_off + d_len > size:
        f.reject("vmdk-bad-header", f"descriptor ({d_off}+{d_len}) is too large or beyond the end of the file")
        return False
    raw = read_exact(fd, d_off, d_len) or b""
    text = raw.split(b"\x00", 1)[0].decode("ascii", "replace")
    desc = parse_descriptor(text)
    info["descriptor"] = desc
    fields: dict[str, str] = desc["fields"]  # type: ignore[assignment]
    ctype = {k.lower(): v for k, v in fields.items()}.get("createtype", "")
    info["subformat"] = ctype
    if hdr["capacity"] == 0:
        f.reject("vmdk-external-extent", "zero-capacity sparse header: QEMU reads the embedded descriptor as a "
                 "descriptor file, whose extents can name host files")
        _check_descriptor(desc, f, embedded=False, own_name=own_name)
        return False
    _check_descriptor(desc, f, embedded=True, own_name=own_name)
    info["virtual_size"] = hdr["capacity"] * SECTOR
    return True


def _gd_offset(fd: int, size: int, hdr: dict[str, int], info: dict[str, object], f: Findings) -> int | None:
    """The grain directory's sector (streamOptimized: from the footer header); None: unusable footer."""
    gd_off = hdr["gd_offset"]
    if gd_off != GD_AT_END:
        return gd_off
    footer = read_exact(fd, size - 1024, SECTOR) if size >= 1536 + SECTOR else None
    if footer is None or footer[:4] != b"KDMV":
        f.reject("vmdk-bad-footer", "grain directory is 'at end' but there is no footer header")
        return None
    fhdr = _parse_header(footer)
    if fhdr["gd_offset"] == GD_AT_END or fhdr["capacity"] != hdr["capacity"] or fhdr["grain_size"] != hdr["grain_size"]:
        f.reject("vmdk-bad-footer", "footer header disagrees with the header")
        return None
    gd_off = fhdr["gd_offset"]
    info["footer_gd_offset"] = gd_off
    return gd_off


def _grain_tables(fd: int, size: int, hdr: dict[str, int], gd_off: int, info: dict[str, object],
                  f: Findings) -> None:
    """The grain directory and every grain table: inside the file, and every allocated grain too."""
    grain, gtes = hdr["grain_size"], hdr["gtes_per_gt"]
    n_gts = -(-hdr["capacity"] // (grain * gtes))
    gd_bytes = n_gts * 4
    info["grain_tables"] = n_gts
    if gd_off == 0 or gd_off * SECTOR + gd_bytes > size:
        f.reject("vmdk-gd-outside-file",
                 f"grain directory ({gd_off * SECTOR}+{gd_bytes}) lies outside the file ({size} bytes)")
        return
    if hdr["flags"] & 2 and hdr["rgd_offset"] * SECTOR + gd_bytes > size:
        f.warn("vmdk-gd-outside-file", "redundant grain directory lies outside the file")
    if gd_bytes > MAX_GD_BYTES or n_gts * gtes * 4 > MAX_GT_BYTES:
        f.warn("vmdk-gt-not-checked", "grain directory too large to check every table")
        return
    gd = read_exact(fd, gd_off * SECTOR, gd_bytes)
    if gd is None:
        f.reject("vmdk-truncated", "short read on the grain directory")
        return
    gt_out = grain_out = allocated = 0
    for (gt_sec,) in struct.iter_unpack("<I", gd):
        if gt_sec == 0:
            continue
        gt = read_exact(fd, gt_sec * SECTOR, gtes * 4)
        if gt is None:
            gt_out += 1
            continue
        for (g,) in struct.iter_unpack("<I", gt):
            if g > 1:  # 0 unallocated, 1 zero grain
                allocated += 1
                if g * SECTOR >= size:
                    grain_out += 1
    info["allocated_grains"] = allocated
    if gt_out:
        f.reject("vmdk-gt-outside-file", f"{gt_out} grain table(s) lie outside the file")
    if grain_out:
        f.reject("vmdk-grain-outside-file", f"{grain_out} grain(s) point beyond the end of the file")
