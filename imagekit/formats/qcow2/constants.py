"""qcow2 constants: QEMU's limits (``block/qcow2.h``), feature bits, header extension types, table
entry masks, the on-disk structures, and the bounds of imagekit's deep check (window sizes, batch sizes,
findings kept per code). Numbers only; no behaviour.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # numpy.typing costs import time; only needed by mypy
    import numpy as np
    import numpy.typing as npt

MAGIC = b"QFI\xfb"

# QEMU limits (block/qcow2.h)
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_EXTL2_CLUSTER_BITS = 14
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024  # bytes
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # bytes
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000  # table entries x cluster size (QEMU)
BME_MAX_NAME_SIZE = 1023
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_RESERVED_FLAGS = 0xFFFFFFF8
BME_FLAG_IN_USE = 1
INT_MAX = 2**31 - 1
MAX_VIRTUAL_SIZE = 2**63 - 512  # BDRV_MAX_LENGTH-ish: QEMU keeps sizes in int64

#: Host clusters per pass of the deep check (9 bytes of arrays each: 13.5 MiB); bigger files take
#: more passes, so memory stays the same whatever the size of the image.
WINDOW_CLUSTERS = 3 << 19
#: L2 tables are gathered from the L1 tables this many host clusters at a time (dense u64 counters).
L2_RANGE_CLUSTERS = 1 << 18
#: L1 and refcount-table entries decoded at a time.
L1_CHUNK = 1 << 16
#: Bytes of L2 tables checked as one array batch.
L2_BATCH_BYTES = 256 << 10
#: Data-cluster references buffered before they are added to the refcounts.
PENDING_DATA = 1 << 17
#: Host clusters compared at a time at the end of a window.
COMPARE_SLICE = 1 << 18
#: Findings kept per finding code; the rest are only counted.
MAX_FINDINGS_PER_CODE = 20

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = 0x3

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXT_NAMES = {
    EXT_BACKING_FORMAT: "backing-format",
    EXT_FEATURE_TABLE: "feature-table",
    EXT_BITMAPS: "bitmaps",
    EXT_CRYPTO_HEADER: "crypto-header",
    EXT_DATA_FILE: "data-file",
}

# table entry masks
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

# role bits of a host cluster (deep check)
R_DATA = 1
R_L2 = 2
R_META = 4  # header, L1, refcount table/block, snapshot table, bitmap structures, crypto header
R_META2 = 8  # a metadata cluster referenced a second time
R_ACTIVE_L2 = 16
R_COMPRESSED = 32

if TYPE_CHECKING:
    U64: TypeAlias = npt.NDArray[np.uint64]
    I64: TypeAlias = npt.NDArray[np.int64]

HDR_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
HDR_V3 = struct.Struct(">QQQII")  # 72..104
EXT = struct.Struct(">II")
SNAP = struct.Struct(">QIHHIIQII")  # 40 bytes
BMDIR = struct.Struct(">QIIBBHI")  # 24 bytes
