"""qcow2 fixed header: parse and validate it like QEMU's ``qcow2_do_open``, then QEMU's size limits
and the placement of the L1 and refcount tables (cluster aligned, inside the file, not in the header
cluster). ``parse_all`` runs the whole cheap pass: header, extensions, feature bits, limits, snapshots.
Every problem is a finding; ``None`` means the file has no usable qcow2 header at all.
"""

from __future__ import annotations

import struct

from imagekit.formats.qcow2.constants import (
    AUTOCLEAR_DATA_FILE_RAW,
    AUTOCLEAR_KNOWN,
    COMPAT_LAZY_REFCOUNTS,
    HDR_V2,
    HDR_V3,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    INT_MAX,
    MAGIC,
    MAX_CLUSTER_BITS,
    MAX_VIRTUAL_SIZE,
    MIN_CLUSTER_BITS,
    MIN_EXTL2_CLUSTER_BITS,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
)
from imagekit.formats.qcow2.extensions import parse_extensions, unknown_feature_message
from imagekit.formats.qcow2.model import Hdr, Reader, hexstr
from imagekit.formats.qcow2.snapshots import parse_snapshots
from imagekit.verdict import Findings


def parse_all(rd: Reader, out: Findings, max_virtual_size: int | None) -> Hdr | None:
    """The cheap pass: header, extensions, unknown feature bits, limits and table placement, snapshots."""
    h = parse_header(rd, out)
    if h is None:
        return None
    parse_extensions(rd, h, out)
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        out.reject("unknown-incompatible-feature", unknown_feature_message(h, unknown))
    check_limits(h, out, max_virtual_size)
    parse_snapshots(rd, h, out)
    return h


def parse_header(rd: Reader, out: Findings) -> Hdr | None:
    """Parse and validate the fixed header like ``qcow2_do_open``.

    Returns None when the file is not a usable qcow2 header at all (not qcow2,
    qcow v1, unknown version, truncated header, cluster size QEMU cannot use).
    """
    read = _read_fixed(rd, out)
    if read is None:
        return None
    h, head = read
    if h.version == 3 and not _check_v3(rd, h, head, out):
        return None
    # encryption
    if h.crypt_method in (1, 2):
        out.reject("encrypted", f"image is encrypted ({'AES' if h.crypt_method == 1 else 'LUKS'}); "
                   "it cannot be inspected or converted without its key")
    elif h.crypt_method != 0:
        out.reject("bad-crypt-method", f"unknown encryption method {h.crypt_method}")
    _check_features(h, out)
    return h


def _read_fixed(rd: Reader, out: Findings) -> tuple[Hdr, bytes] | None:
    """Magic, version and the fixed fields (v2: 72 bytes, v3: 104); the cluster size QEMU can use."""
    h = Hdr(file_size=rd.size)
    head = rd.upto(0, 112)
    if len(head) < 4 or head[:4] != MAGIC:
        out.reject("not-qcow2", "file does not start with the qcow2 magic QFI\\xfb")
        return None
    if len(head) < 8:
        out.reject("header-truncated", f"file is only {len(head)} bytes long; no qcow2 version field")
        return None
    h.version = struct.unpack_from(">I", head, 4)[0]
    if h.version == 1:
        out.reject("qcow-v1", "qcow version 1 image (legacy qcow, not qcow2)")
        return None
    if h.version not in (2, 3):
        out.reject("bad-version", f"unsupported qcow2 version {h.version} (QEMU knows 2 and 3)")
        return None
    need = 72 if h.version == 2 else 104
    if len(head) < need:
        out.reject("header-truncated", f"file ends at byte {len(head)}, inside the {need}-byte v{h.version} header")
        return None
    (_, _, h.backing_file_offset, h.backing_file_size, h.cluster_bits, h.size, h.crypt_method,
     h.l1_size, h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters,
     h.nb_snapshots, h.snapshots_offset) = HDR_V2.unpack_from(head, 0)
    if h.version == 3:
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = HDR_V3.unpack_from(head, 72)

    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        out.reject("bad-cluster-bits",
                   f"cluster_bits {h.cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS} "
                   "(512 B .. 2 MiB clusters)")
        return None
    return h, head


def _check_v3(rd: Reader, h: Hdr, head: bytes, out: Findings) -> bool:
    """header_length rules, the compression type byte and refcount_order; False: the header is truncated."""
    cs = h.cluster_size
    if h.header_length < 104:
        out.reject("bad-header-length", f"v3 header_length {h.header_length} < 104")
    elif h.header_length % 8:
        out.reject("bad-header-length", f"header_length {h.header_length} is not a multiple of 8")
    if h.header_length > cs:
        out.reject("bad-header-length", f"header_length {h.header_length} exceeds the cluster size {cs}")
    if h.header_length > 104 and h.header_length <= cs:
        if rd.exact(0, h.header_length) is None:
            out.reject("header-truncated", f"file ends inside the {h.header_length}-byte header")
            return False
        h.compression_type = head[104]
    if h.refcount_order > 6:
        out.reject("bad-refcount-order", f"refcount_order {h.refcount_order} > 6 (refcounts wider than 64 bits)")
    return True


def _check_features(h: Hdr, out: Findings) -> None:
    """The incompatible, compatible and autoclear feature bits and the compression type."""
    inc = h.incompatible
    if inc & INCOMPAT_DIRTY:
        out.warn("dirty", "dirty bit set: refcounts may be stale (lazy refcounts); QEMU repairs them on "
                 "read-write open")
    if inc & INCOMPAT_CORRUPT:
        out.reject("corrupt-bit", "corrupt bit set: QEMU found this image's metadata corrupt")
    if inc & INCOMPAT_DATA_FILE:
        out.reject("data-file", "external data file bit set: guest data lives in another host file")
    if inc & INCOMPAT_EXTL2 and h.cluster_bits < MIN_EXTL2_CLUSTER_BITS:
        out.reject("bad-cluster-bits", f"extended L2 entries need clusters >= 16 KiB, cluster_bits is "
                   f"{h.cluster_bits}")
    _check_compression_type(h, out)
    if h.autoclear & AUTOCLEAR_DATA_FILE_RAW and not inc & INCOMPAT_DATA_FILE:
        out.reject("bad-autoclear-feature", "raw-external-data bit set without an external data file")
    if h.autoclear & ~AUTOCLEAR_KNOWN:
        out.info("unknown-autoclear-feature",
                 f"unknown autoclear feature bits {hexstr(h.autoclear & ~AUTOCLEAR_KNOWN)}")
    if h.compatible & ~COMPAT_LAZY_REFCOUNTS:
        out.info("unknown-compatible-feature",
                 f"unknown compatible feature bits {hexstr(h.compatible & ~COMPAT_LAZY_REFCOUNTS)}")


def _check_compression_type(h: Hdr, out: Findings) -> None:
    """The type byte (absent in a 104-byte header: zlib) and the incompatible bit must agree."""
    inc = h.incompatible
    if h.compression_type not in (0, 1):
        out.reject("bad-compression-type", f"unknown compression type {h.compression_type}")
    elif h.compression_type != 0 and not inc & INCOMPAT_COMPRESSION:
        out.reject("bad-compression-type", f"compression type {h.compression_type} without the "
                   "compression-type incompatible bit")
    elif h.compression_type == 0 and inc & INCOMPAT_COMPRESSION:
        out.reject("bad-compression-type", "compression-type incompatible bit set but the type is zlib")


def check_limits(h: Hdr, out: Findings, max_virtual_size: int | None) -> None:
    """QEMU's size limits and the table placement rules (aligned, inside the file)."""
    cs = h.cluster_size
    l2_entries = cs // (16 if h.extended_l2 else 8)
    covered = cs * l2_entries
    l1_needed = -(-h.size // covered)
    if max_virtual_size is not None and h.size > max_virtual_size:
        out.reject("virtual-size-too-large", f"virtual size {h.size} exceeds the allowed {max_virtual_size}")
    if h.size > MAX_VIRTUAL_SIZE or l1_needed > INT_MAX:
        out.reject("virtual-size-too-large", f"virtual size {h.size} is beyond what QEMU can address")
    h.l1_ok = _check_l1(h, out, l1_needed)
    h.reftable_ok = _check_reftable(h, out)


def _check_l1(h: Hdr, out: Findings, l1_needed: int) -> bool:
    """The active L1 table's size and placement; False: it must not be walked."""
    cs, fsize = h.cluster_size, h.file_size
    l1_ok = True
    if h.l1_size > QCOW_MAX_L1_SIZE // 8:
        out.reject("l1-too-large", f"L1 table of {h.l1_size} entries exceeds QEMU's 32 MiB limit")
        l1_ok = False
    if h.l1_size < l1_needed:
        out.reject("l1-too-small", f"L1 table of {h.l1_size} entries cannot map the virtual size {h.size} "
                   f"(needs {l1_needed})")
    if h.l1_table_offset % cs:
        out.reject("l1-unaligned", f"L1 table offset {hexstr(h.l1_table_offset)} is not cluster aligned")
        l1_ok = False
    elif h.l1_table_offset + h.l1_size * 8 > (1 << 63) - 1:  # QEMU refuses to open it, even for an empty L1
        out.reject("l1-outside-file", f"L1 table offset {hexstr(h.l1_table_offset)} exceeds QEMU's maximum")
        l1_ok = False
    if l1_ok and h.l1_size and h.l1_table_offset + h.l1_size * 8 > fsize:
        out.reject("l1-outside-file", f"L1 table [{hexstr(h.l1_table_offset)}, +{h.l1_size * 8}) runs past the "
                   f"end of the file ({fsize} bytes)")
        l1_ok = False
    if l1_ok and h.l1_size and h.l1_table_offset < cs:
        out.reject("cluster-overlap", "L1 table overlaps the header cluster")
        l1_ok = False
    return l1_ok


def _check_reftable(h: Hdr, out: Findings) -> bool:
    """The refcount table's size and placement; False: the stored refcounts cannot be read."""
    cs, fsize = h.cluster_size, h.file_size
    rt_ok = True
    rt_bytes = h.refcount_table_clusters * cs
    if h.refcount_table_clusters == 0:
        out.reject("no-refcount-table", "image has no refcount table")
        rt_ok = False
    if rt_bytes > QCOW_MAX_REFTABLE_SIZE:
        out.reject("refcount-table-too-large", f"refcount table of {h.refcount_table_clusters} clusters exceeds "
                   "QEMU's 8 MiB limit")
        rt_ok = False
    if h.refcount_table_offset % cs:
        out.reject("refcount-table-unaligned",
                   f"refcount table offset {hexstr(h.refcount_table_offset)} is not cluster aligned")
        rt_ok = False
    if rt_ok and h.refcount_table_offset + rt_bytes > fsize:
        out.reject("refcount-table-outside-file", f"refcount table [{hexstr(h.refcount_table_offset)}, "
                   f"+{rt_bytes}) runs past the end of the file ({fsize} bytes)")
        rt_ok = False
    if rt_ok and h.refcount_table_offset < cs:
        out.reject("cluster-overlap", "refcount table overlaps the header cluster")
        rt_ok = False
    if h.refcount_order > 6:
        rt_ok = False
    return rt_ok
