"""qcow2 persistent dirty bitmaps in the deep walk (QEMU's ``qcow2-bitmap.c``): the bitmap directory
(entry sizes, unique names, type, granularity, flags), each bitmap table (aligned, inside the file,
reserved bits) and the bitmap data clusters, all marked as metadata for the refcount comparison.
Functions of the :class:`~.walk.Walk` they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from imagekit.formats.qcow2.constants import (
    BMDIR,
    BME_FLAG_IN_USE,
    BME_MAX_GRANULARITY_BITS,
    BME_MAX_NAME_SIZE,
    BME_MAX_PHYS_SIZE,
    BME_MAX_TABLE_SIZE,
    BME_MIN_GRANULARITY_BITS,
    BME_OFFSET_MASK,
    BME_RESERVED_FLAGS,
    BME_RESERVED_MASK,
)
from imagekit.formats.qcow2.model import decode, hexstr

if TYPE_CHECKING:
    from imagekit.formats.qcow2.walk import Walk


def walk_bitmaps(w: Walk) -> None:
    """Bitmap directory, bitmap tables and bitmap data clusters (``qcow2-bitmap.c``)."""
    h, out = w.h, w.out
    if h.bitmaps_ext is None:
        return
    nb, dsize, doff = h.bitmaps_ext
    d = w.rd.exact(doff, dsize)
    if d is None:
        out.reject("bitmap-directory-outside-file", "bitmap directory runs past the end of the file")
        return
    w.mark_meta_range(doff, dsize, "bitmap directory")
    pos = 0
    names: set[str] = set()
    for i in range(nb):
        w.tick()
        if pos + 24 > dsize:
            out.reject("bad-bitmap", f"bitmap directory too small for {nb} entries")
            w.complete = False
            return
        toff, tsize, flags, btype, gran, name_size, extra = BMDIR.unpack_from(d, pos)
        ent_len = (24 + extra + name_size + 7) & ~7
        if pos + 24 + extra + name_size > dsize:
            out.reject("bad-bitmap", f"bitmap {i} entry runs past the bitmap directory")
            w.complete = False
            return
        name = decode(d[pos + 24 + extra:pos + 24 + extra + name_size])
        pos += ent_len
        label = f"bitmap {i} ({name!r})"
        if name in names:
            out.reject("bad-bitmap", f"{label}: duplicate bitmap name")
        names.add(name)
        _check_entry(w, label, flags, btype, gran, name_size)
        if extra:
            out.reject("bad-bitmap", f"{label}: {extra} bytes of extra data, which QEMU does not support "
                                     "(it refuses to open the image)")
        _table_sized(w, label, tsize, flags, gran)
        if _table_placed(w, label, toff, tsize):
            _walk_table(w, label, toff, tsize)
        else:
            w.complete = False
    if pos != dsize and (pos + 7) & ~7 != (dsize + 7) & ~7:
        out.reject("bad-bitmap", f"bitmap directory size {dsize} does not match its {nb} entries ({pos} bytes)")


def _check_entry(w: Walk, label: str, flags: int, btype: int, gran: int, name_size: int) -> None:
    """A directory entry's type, granularity, name size and flags."""
    out = w.out
    if btype != 1:
        out.reject("bad-bitmap", f"{label}: unknown bitmap type {btype}")
    if not BME_MIN_GRANULARITY_BITS <= gran <= BME_MAX_GRANULARITY_BITS:
        out.reject("bad-bitmap", f"{label}: granularity bits {gran} outside 9..31")
    if name_size == 0 or name_size > BME_MAX_NAME_SIZE:
        out.reject("bad-bitmap", f"{label}: name size {name_size}")
    if flags & BME_RESERVED_FLAGS:
        out.reject("bad-bitmap", f"{label}: reserved flags {hexstr(flags)}")
    if flags & BME_FLAG_IN_USE:
        out.info("bitmap-in-use", f"{label} is marked in use (inconsistent)")


def _table_sized(w: Walk, label: str, tsize: int, flags: int, gran: int) -> None:
    """The table's size against what the disk needs (``check_dir_entry`` and ``load_bitmap`` in QEMU's
    ``qcow2-bitmap.c``: QEMU refuses to open an image whose bitmap fails these)."""
    out = w.out
    if 0 < tsize <= BME_MAX_TABLE_SIZE and tsize * w.cs > BME_MAX_PHYS_SIZE:
        out.reject("bad-bitmap", f"{label}: bitmap table of {tsize} clusters of data, over QEMU's "
                                 f"{BME_MAX_PHYS_SIZE >> 20} MiB")
    if flags & BME_FLAG_IN_USE or not BME_MIN_GRANULARITY_BITS <= gran <= BME_MAX_GRANULARITY_BITS:
        return  # an in-use bitmap may be stale (a resize); a bad granularity is already rejected
    bits = -((-w.h.size) >> gran)  # one bit per granule, rounded up
    needed = -(-bits // (8 * w.cs))
    if tsize != needed and tsize:
        out.reject("bad-bitmap", f"{label}: bitmap table of {tsize} entries, but the disk's "
                                 f"{w.h.size} bytes at granularity {1 << gran} need {needed}")


def _table_placed(w: Walk, label: str, toff: int, tsize: int) -> bool:
    """The bitmap table's size and placement; False: it cannot be walked."""
    out = w.out
    if tsize > BME_MAX_TABLE_SIZE or toff == 0 or tsize == 0:
        out.reject("bad-bitmap", f"{label}: bitmap table of {tsize} entries at {hexstr(toff)}")
        return False
    if toff % w.cs:
        out.reject("bitmap-table-unaligned", f"{label}: bitmap table offset {hexstr(toff)} is not aligned")
        return False
    if toff + 8 * tsize > w.fsize:
        out.reject("bitmap-table-outside-file", f"{label}: bitmap table runs past the end of the file")
        return False
    return True


def _walk_table(w: Walk, label: str, toff: int, tsize: int) -> None:
    """A bitmap table's entries (reserved bits, data clusters aligned and inside the file), marked as metadata."""
    out, cs = w.out, w.cs
    w.mark_meta_range(toff, 8 * tsize, f"{label} table")
    chunk = 1 << 16
    for s in range(0, tsize, chunk):
        w.tick()
        raw = w.rd.exact(toff + 8 * s, 8 * min(chunk, tsize - s))
        if raw is None:
            break
        e = np.frombuffer(raw, ">u8").astype(np.uint64)
        off = e & np.uint64(BME_OFFSET_MASK)
        res = ((e & np.uint64(BME_RESERVED_MASK)) != 0) | ((off != 0) & ((e & np.uint64(1)) != 0))
        if res.any():
            out.reject("reserved-bits", f"{label}: {int(res.sum())} bitmap table entries have reserved "
                       "bits set")
        nz = off != 0
        unal = nz & ((off & np.uint64(cs - 1)) != 0)
        outside = nz & ~unal & w.past(off, cs)
        if unal.any():
            out.reject("bad-bitmap", f"{label}: {int(unal.sum())} bitmap data offsets are not aligned")
        if outside.any():
            out.reject("bitmap-data-outside-file", f"{label}: {int(outside.sum())} bitmap data clusters "
                       "lie past the end of the file")
        idx = (off[nz & ~unal & ~outside] >> np.uint64(w.cb)).astype(np.int64)
        if w.first:
            w.bitmap_data_idx.append(idx)
        w.mark_meta_idx(idx)
