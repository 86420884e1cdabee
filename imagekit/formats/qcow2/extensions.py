"""qcow2 header extensions and the backing file name (QEMU's ``qcow2_read_extensions``).

Extensions follow the header inside cluster 0, before the backing file name: (type u32, length
u32, data padded to 8), each type at most once, ending with type 0. The backing-format,
feature-name table, bitmaps, encryption-header and external data file extensions are decoded into
the :class:`Hdr`; a backing file or an external data file is a ``backing-file`` / ``data-file``
reject (QEMU would open that host file: CVE-2024-32498; ``json:`` names: CVE-2024-4467).
"""

from __future__ import annotations

import struct

from imagekit.formats.qcow2.constants import (
    AUTOCLEAR_BITMAPS,
    EXT,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO_HEADER,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    EXT_NAMES,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
    QCOW2_MAX_BITMAPS,
)
from imagekit.formats.qcow2.model import Hdr, Reader, decode, hexstr
from imagekit.verdict import Findings


def parse_extensions(rd: Reader, h: Hdr, out: Findings) -> None:
    """Walk the header extensions (``qcow2_read_extensions``) and the backing file name."""
    cs = h.cluster_size
    start = h.header_length if h.version == 3 and 104 <= h.header_length <= cs else (72 if h.version == 2 else 104)
    seen = _walk_extensions(rd, h, out, start)
    bfo = h.backing_file_offset
    if bfo:
        _backing_file(rd, h, out, start)
    if h.backing_format and not bfo:
        out.info("backing-format-without-file", f"backing format {h.backing_format!r} given without a backing file")

    if h.autoclear & AUTOCLEAR_BITMAPS and EXT_BITMAPS not in seen:
        out.info("bitmaps-bit-without-extension", "bitmaps autoclear bit set but no bitmaps extension")
    if h.crypt_method == 2 and h.crypto_header is None:
        out.reject("bad-extension", "LUKS encrypted image without the encryption header extension")


def _walk_extensions(rd: Reader, h: Hdr, out: Findings, start: int) -> set[int]:
    """Decode each extension from ``start`` to the backing file name (or the end of cluster 0)."""
    cs = h.cluster_size
    bfo = h.backing_file_offset
    end = bfo if 0 < bfo <= cs else cs
    cluster0 = rd.upto(0, cs)
    seen: set[int] = set()
    off = start
    while off < end:
        if off + 8 > end:
            out.reject("bad-extension", f"header extension at {off} has no room before {end}")
            break
        if off + 8 > len(cluster0):
            out.reject("bad-extension", f"header extension area runs past the end of the file at {off}")
            break
        typ, length = EXT.unpack_from(cluster0, off)
        off += 8
        if length > end - off:  # QEMU checks the length before the type: even the end marker's
            where = "the backing file name" if end == bfo else "the end of cluster 0"
            out.reject("bad-extension",
                       f"header extension {hexstr(typ)} of {length} bytes at {off - 8} runs past {where}")
            break
        if typ == EXT_END:
            break
        if off + length > len(cluster0):
            out.reject("bad-extension", f"header extension {hexstr(typ)} runs past the end of the file")
            break
        data = cluster0[off:off + length]
        name = EXT_NAMES.get(typ, f"unknown-{typ:08x}")
        if typ in seen:
            out.reject("bad-extension", f"header extension {name} appears more than once")
        else:
            seen.add(typ)
            h.extensions.append(name)
            one_extension(h, typ, data, out)
        off += (length + 7) & ~7
    return seen


def _backing_file(rd: Reader, h: Hdr, out: Findings, start: int) -> None:
    """The backing file name (inside cluster 0, after the extensions): always a ``backing-file`` reject."""
    cs = h.cluster_size
    bfo = h.backing_file_offset
    bname: str | None = None
    size = h.backing_file_size
    if size > 1023:
        out.reject("bad-backing-file-name", f"backing file name length {size} > 1023")
    elif bfo > cs or bfo + size > cs:
        out.reject("bad-backing-file-name", f"backing file name at {bfo}+{size} is outside cluster 0")
    elif bfo < start:
        out.reject("bad-backing-file-name", f"backing file name at {bfo} overlaps the header")
    else:
        raw = rd.exact(bfo, size)
        if raw is None:
            out.reject("bad-backing-file-name", f"backing file name at {bfo}+{size} runs past the end of the file")
        else:
            bname = decode(raw)
    if size == 0 and bname == "":
        out.info("empty-backing-file-name", "backing_file_offset is set but the name is empty")
        return
    h.backing_file = bname
    fmt = f" (format {h.backing_format!r})" if h.backing_format else ""
    what = repr(bname) if bname is not None else "(unreadable name)"
    msg = f"image has a backing file {what}{fmt}: QEMU would open that host file"
    if bname is not None and bname.lstrip().startswith("json:"):
        msg += "; it is a json: block specification, which can name any protocol or host file"
    out.reject("backing-file", msg)


def one_extension(h: Hdr, typ: int, data: bytes, out: Findings) -> None:
    """Decode one header extension into ``h``."""
    if typ == EXT_BACKING_FORMAT:
        if len(data) >= 16:
            out.reject("bad-extension", f"backing format name of {len(data)} bytes is too long")
        h.backing_format = decode(data[:64])
    elif typ == EXT_FEATURE_TABLE:
        for i in range(len(data) // 48):
            ftype, bit = data[i * 48], data[i * 48 + 1]
            fname = decode(data[i * 48 + 2:i * 48 + 48].split(b"\0", 1)[0])
            h.feature_names.append(fname)
            h.feature_table[(ftype, bit)] = fname
    elif typ == EXT_DATA_FILE:
        h.data_file = decode(data)
        out.reject("data-file", f"image names an external data file {h.data_file!r}: QEMU would read guest data "
                   "from that host file")
    elif typ == EXT_CRYPTO_HEADER:
        _crypto_header(h, data, out)
    elif typ == EXT_BITMAPS:
        _bitmaps_extension(h, data, out)
    else:
        out.info("unknown-extension", f"unknown header extension {hexstr(typ)} ({len(data)} bytes), ignored")


def _crypto_header(h: Hdr, data: bytes, out: Findings) -> None:
    """The full-disk encryption header extension: where the LUKS header lies."""
    if len(data) != 16:
        out.reject("bad-extension", f"encryption header extension has length {len(data)}, expected 16")
        return
    if h.crypt_method != 2:
        out.reject("bad-extension", "encryption header extension on an image that is not LUKS encrypted")
    off, length = struct.unpack(">QQ", data)
    if off % h.cluster_size:
        out.reject("bad-extension", f"encryption header offset {hexstr(off)} is not cluster aligned")
    elif off + length > h.file_size:
        out.reject("crypto-header-outside-file", f"encryption header [{hexstr(off)}, +{length}) runs past EOF")
    else:
        h.crypto_header = (off, length)


def _bitmaps_extension(h: Hdr, data: bytes, out: Findings) -> None:
    """The bitmaps extension: the bitmap directory's size and placement (walked by the deep check)."""
    cs = h.cluster_size
    if len(data) != 24:
        out.reject("bad-extension", f"bitmaps extension has length {len(data)}, expected 24")
        return
    nb, reserved, dsize, doff = struct.unpack(">IIQQ", data)
    if not h.autoclear & AUTOCLEAR_BITMAPS:
        out.info("bitmaps-inconsistent", "bitmaps extension present but its autoclear bit is clear: a program "
                 "without bitmap support wrote the image; QEMU ignores the bitmaps")
        return
    bad = False
    if reserved:
        out.reject("bad-extension", "bitmaps extension reserved field is not zero")
        bad = True
    if nb == 0 or nb > QCOW2_MAX_BITMAPS:
        out.reject("bad-extension", f"bitmaps extension declares {nb} bitmaps (1..{QCOW2_MAX_BITMAPS})")
        bad = True
    if dsize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE or dsize < 24 * nb:
        out.reject("bad-extension", f"bitmap directory size {dsize} impossible for {nb} bitmaps")
        bad = True
    if doff % cs:
        out.reject("bitmap-directory-unaligned", f"bitmap directory offset {hexstr(doff)} is not cluster aligned")
        bad = True
    elif doff + dsize > h.file_size:
        out.reject("bitmap-directory-outside-file", f"bitmap directory [{hexstr(doff)}, +{dsize}) runs past EOF")
        bad = True
    elif doff < cs:
        out.reject("cluster-overlap", "bitmap directory overlaps the header cluster")
        bad = True
    h.nb_bitmaps = nb
    if not bad:
        h.bitmaps_ext = (nb, dsize, doff)


def unknown_feature_message(h: Hdr, bits: int) -> str:
    names = []
    for b in range(64):
        if bits >> b & 1:
            names.append(h.feature_table.get((0, b), f"bit {b}"))
    return "unknown incompatible feature(s): " + ", ".join(names) + "; QEMU refuses to open the image"
