"""The planner: where every byte of the qcow2 goes, decided before the first byte is written.

Order in the file (every table cluster aligned):

    header cluster | refcount table | refcount blocks | L1 table | L2 tables | data

Uncompressed (:func:`plan_plain`): the allocated guest clusters, in guest order, become host
clusters one after the other from the data offset, so every table is known from the allocation
map alone and the file can be written front to back, even into a stream.

Compressed (:func:`plan_compressed`): each allocated guest cluster is either a compressed run of
bytes (packed one after the other at byte granularity, as QEMU's ``qcow2_alloc_bytes`` packs them;
a run may cross into the next host cluster) or, when compression does not make it smaller, a whole
host cluster at the next cluster boundary. The runs' sizes must be known first (the compressor
runs ahead of the planner); the L2 entry of a run is QEMU's descriptor: bit 62, the host byte
offset in bits ``0..x-1`` and the number of *additional* 512-byte sectors from bit ``x``, with
``x = 62 - (cluster_bits - 8)``. A host cluster's refcount is the number of runs that touch it
(capped below 2**16 - 1: a run that would overflow a cluster starts in the next one).

Refcounts are 16 bits (``refcount_order`` 4, what QEMU creates); standard clusters with refcount 1
and L2 tables carry the COPIED flag (``qemu-img check`` counts a missing one as an error).
Everything here is pure computation over numpy arrays: the same input gives the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imagekit.errors import UsageError

if TYPE_CHECKING:
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]
    U64 = npt.NDArray[np.uint64]

COPIED = 1 << 63
COMPRESSED = 1 << 62
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFCOUNT_MAX = 0xFFFF
HEADER_V3_LENGTH = 112  # 104 + the compression type byte, padded to 8
INCOMPAT_COMPRESSION = 1 << 3
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
COMPRESSION_TYPES = {"zlib": 0, "zstd": 1}
_HDR = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72-byte v2 header
_HDR3 = struct.Struct(">QQQII")  # bytes 72..104 of a v3 header


class LayoutError(UsageError):
    """The requested image cannot be laid out (a cluster size QEMU cannot use, tables past QEMU's limits)."""

    code = "qcow2-layout"


@dataclass(frozen=True)
class Geometry:
    """What the output is: virtual size (bytes, a multiple of 512), cluster size, version, compression."""

    virtual_size: int
    cluster_bits: int = 16
    version: int = 3  # 2: compat 0.10, 3: compat 1.1
    compression: str = "none"  # none | zlib | zstd (the header's type; zlib for none)

    def __post_init__(self) -> None:
        if not 9 <= self.cluster_bits <= 21:
            raise LayoutError(f"cluster size {1 << self.cluster_bits} outside 512..2M", "e.g. --cluster-size 64K")
        if self.virtual_size < 0 or self.virtual_size % 512:
            raise LayoutError("the virtual size must be a non-negative multiple of 512", "round it up to 512 bytes")
        if self.version not in (2, 3):
            raise LayoutError("qcow2 version must be 2 or 3", "--compat 0.10 or 1.1")
        if self.compression == "zstd" and self.version == 2:
            raise LayoutError("zstd compression needs compat 1.1", "--compat 1.1 or --compress zlib")
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise LayoutError(f"a virtual size of {self.virtual_size} bytes needs an L1 table larger than QEMU's "
                              "32 MiB limit", "use bigger clusters (--cluster-size)")

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cs // 8

    @property
    def guest_clusters(self) -> int:
        return -(-self.virtual_size // self.cs)

    @property
    def l1_size(self) -> int:
        return -(-self.guest_clusters // self.l2_entries)

    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)


@dataclass(frozen=True)
class Layout:
    """Every offset of the output file and the table contents' inputs (see the module docstring)."""

    geo: Geometry
    guest: I64  # allocated guest clusters, ascending
    entries: U64  # their L2 entries (host offset | flags, or compressed descriptor)
    data_refs: npt.NDArray[np.uint16]  # refcount of each host cluster of the data area
    rt_offset: int
    rt_clusters: int
    rb_offset: int
    rb_clusters: int
    l1_offset: int
    l1_clusters: int
    l2_offset: int
    l1_indices: I64  # the L1 index of each L2 table, ascending
    data_offset: int
    data_end: int  # last byte of data (before padding to the cluster boundary)
    file_size: int

    @property
    def metadata_size(self) -> int:
        return self.data_offset

    @property
    def host_clusters(self) -> int:
        return self.file_size >> self.geo.cluster_bits

    # ------------------------------------------------------------ bytes of the metadata

    def header(self) -> bytes:
        g = self.geo
        buf = bytearray(g.cs)
        _HDR.pack_into(buf, 0, b"QFI\xfb", g.version, 0, 0, g.cluster_bits, g.virtual_size, 0, g.l1_size,
                       self.l1_offset if g.l1_size else 0, self.rt_offset, self.rt_clusters, 0, 0)
        if g.version == 3:
            ctype = COMPRESSION_TYPES.get(g.compression, 0)
            incompat = INCOMPAT_COMPRESSION if ctype else 0
            _HDR3.pack_into(buf, 72, incompat, 0, 0, REFCOUNT_ORDER, HEADER_V3_LENGTH)
            buf[104] = ctype
        return bytes(buf)

    def refcount_table(self) -> bytes:
        g = self.geo
        t = np.zeros(self.rt_clusters * g.l2_entries, ">u8")
        t[:self.rb_clusters] = self.rb_offset + np.arange(self.rb_clusters, dtype=np.uint64) * np.uint64(g.cs)
        return t.tobytes()

    def refcount_blocks(self) -> Iterator[bytes]:
        """The refcount blocks: 1 for every metadata cluster, the data area's counts, 0 past the end."""
        per = self.geo.cs // 2
        meta = self.data_offset >> self.geo.cluster_bits
        refs = np.zeros(self.rb_clusters * per, ">u2")
        refs[:meta] = 1
        refs[meta:meta + self.data_refs.size] = self.data_refs
        for b in range(self.rb_clusters):
            yield refs[b * per:(b + 1) * per].tobytes()

    def l1_table(self) -> bytes:
        g = self.geo
        t = np.zeros(self.l1_clusters * g.l2_entries, ">u8")
        n = self.l1_indices.size
        t[self.l1_indices] = (np.uint64(self.l2_offset) + np.arange(n, dtype=np.uint64) * np.uint64(g.cs)) \
            | np.uint64(COPIED)
        return t.tobytes()

    def l2_tables(self, batch: int = 64) -> Iterator[bytes]:
        """The L2 tables in L1 order, ``batch`` tables per piece."""
        g = self.geo
        table_of = self.guest // g.l2_entries
        slot = np.searchsorted(self.l1_indices, table_of)  # which L2 table holds each entry
        for s in range(0, self.l1_indices.size, batch):
            n = min(batch, self.l1_indices.size - s)
            t = np.zeros(n * g.l2_entries, ">u8")
            lo, hi = np.searchsorted(slot, [s, s + n])
            pos = (slot[lo:hi] - s) * g.l2_entries + self.guest[lo:hi] % g.l2_entries
            t[pos] = self.entries[lo:hi]
            yield t.tobytes()

    def metadata(self) -> Iterator[bytes]:
        """Every byte before the data offset, in order."""
        yield self.header()
        yield self.refcount_table()
        yield from self.refcount_blocks()
        yield self.l1_table()
        yield from self.l2_tables()

    # ------------------------------------------------------------ the map qemu-img must report

    def planned_map(self) -> list[tuple[int, int, int | None]]:
        """Guest ranges holding data: (start, length, host offset or None when compressed), merged as
        ``qemu-img map`` merges them, clipped to the virtual size."""
        g = self.geo
        out: list[tuple[int, int, int | None]] = []
        comp = (self.entries & np.uint64(COMPRESSED)) != 0
        off = self.entries & np.uint64(0x00FFFFFFFFFFFE00)
        for gc, c, o in zip(self.guest.tolist(), comp.tolist(), off.tolist(), strict=True):
            start = gc << g.cluster_bits
            length = min(g.cs, g.virtual_size - start)
            host = None if c else o
            if out:
                ps, pl, ph = out[-1]
                if ps + pl == start and ((ph is None and host is None) or
                                         (ph is not None and host is not None and ph + pl == host)):
                    out[-1] = (ps, pl + length, ph)
                    continue
            out.append((start, length, host))
        return out


def _metadata_clusters(geo: Geometry, n_l2: int, data_clusters: int) -> tuple[int, int, int]:
    """(refcount table clusters, refcount blocks, L1 clusters) for this many L2 tables and data clusters."""
    l1_clusters = -(-geo.l1_size * 8 // geo.cs)
    per_block = geo.cs // 2
    rt = rb = 1
    while True:
        total = 1 + rt + rb + l1_clusters + n_l2 + data_clusters
        need_rb = -(-total // per_block)
        need_rt = -(-need_rb * 8 // geo.cs)
        if need_rb <= rb and need_rt <= rt:
            break
        rb, rt = max(rb, need_rb), max(rt, need_rt)
    if rt * geo.cs > MAX_REFTABLE_BYTES:
        raise LayoutError("the image needs a refcount table larger than QEMU's 8 MiB limit; use bigger clusters")
    return rt, rb, l1_clusters


def _place(geo: Geometry, guest: I64, data_clusters: int) -> dict[str, int | I64]:
    l1_indices = np.unique(guest // geo.l2_entries) if guest.size else np.zeros(0, np.int64)
    rt, rb, l1c = _metadata_clusters(geo, int(l1_indices.size), data_clusters)
    cs = geo.cs
    rt_off = cs
    rb_off = rt_off + rt * cs
    l1_off = rb_off + rb * cs
    l2_off = l1_off + l1c * cs
    data_off = l2_off + int(l1_indices.size) * cs
    return {"rt_offset": rt_off, "rt_clusters": rt, "rb_offset": rb_off, "rb_clusters": rb, "l1_offset": l1_off,
            "l1_clusters": l1c, "l2_offset": l2_off, "l1_indices": l1_indices.astype(np.int64),
            "data_offset": data_off}


def _check_guest(geo: Geometry, guest: I64) -> I64:
    g = np.asarray(guest, dtype=np.int64)
    if g.size and (g[0] < 0 or g[-1] >= geo.guest_clusters or bool((np.diff(g) <= 0).any())):
        raise LayoutError("allocated guest clusters must be distinct, ascending and inside the virtual size")
    return g


def plan_plain(geo: Geometry, guest: I64) -> Layout:
    """Uncompressed: guest cluster ``guest[i]`` lives in host cluster ``data_offset / cs + i``."""
    g = _check_guest(geo, guest)
    p = _place(geo, g, int(g.size))
    data_off = int(p["data_offset"])
    entries = (np.uint64(data_off) + np.arange(g.size, dtype=np.uint64) * np.uint64(geo.cs)) | np.uint64(COPIED)
    end = data_off + int(g.size) * geo.cs
    return Layout(geo=geo, guest=g, entries=entries, data_refs=np.ones(g.size, np.uint16), data_end=end,
                  file_size=end, **p)  # type: ignore[arg-type]


def pack_compressed(geo: Geometry, sizes: list[int]) -> tuple[list[int], list[int], npt.NDArray[np.uint16], int]:
    """Pack runs of ``sizes`` bytes (0: a whole uncompressed cluster) from offset 0.

    Returns each run's relative offset, its number of additional 512-byte sectors (-1: uncompressed),
    the refcount of every host cluster of the data area, and the end of the data (bytes)."""
    cs, cb = geo.cs, geo.cluster_bits
    refs = [0] * (len(sizes) + 1)
    offsets: list[int] = []
    sectors: list[int] = []
    cur = 0
    for size in sizes:
        if size <= 0 or size >= cs:  # stored as a whole cluster
            cur = -(-cur // cs) * cs
            c = cur >> cb
            if c >= len(refs):
                refs.extend([0] * (c + 1 - len(refs)))
            refs[c] += 1
            offsets.append(cur)
            sectors.append(-1)
            cur += cs
            continue
        first = cur >> cb
        last = (((cur + size + 511) & ~511) - 1) >> cb
        if last >= len(refs):
            refs.extend([0] * (last + 1 - len(refs)))
        if refs[first] >= REFCOUNT_MAX - 1 or refs[last] >= REFCOUNT_MAX - 1:
            cur = (first + 1) << cb
            first = cur >> cb
            last = (((cur + size + 511) & ~511) - 1) >> cb
            if last >= len(refs):
                refs.extend([0] * (last + 1 - len(refs)))
        for c in range(first, last + 1):
            refs[c] += 1
        offsets.append(cur)
        sectors.append(((cur + size - 1) >> 9) - (cur >> 9))
        cur += size
    n_clusters = -(-cur // cs)
    return offsets, sectors, np.array(refs[:n_clusters], dtype=np.uint16), cur


def plan_compressed(geo: Geometry, guest: I64, sizes: list[int]) -> Layout:
    """Compressed: ``sizes[i]`` bytes for guest cluster ``guest[i]`` (0 or >= cluster size: stored whole)."""
    g = _check_guest(geo, guest)
    if len(sizes) != g.size:
        raise LayoutError("one size per allocated cluster")
    offsets, sectors, refs, end = pack_compressed(geo, sizes)
    p = _place(geo, g, int(refs.size))
    data_off = int(p["data_offset"])
    off = np.array(offsets, dtype=np.uint64) + np.uint64(data_off)
    sec = np.array(sectors, dtype=np.int64)
    raw = sec < 0
    entries = np.where(raw, off | np.uint64(COPIED),
                       off | np.uint64(COMPRESSED) | (np.maximum(sec, 0).astype(np.uint64) << np.uint64(geo.csize_shift)))
    if g.size == 0:
        entries = np.zeros(0, np.uint64)
    size = data_off + int(refs.size) * geo.cs
    return Layout(geo=geo, guest=g, entries=entries.astype(np.uint64), data_refs=refs, data_end=data_off + end,
                  file_size=size, **p)  # type: ignore[arg-type]
