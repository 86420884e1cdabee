"""qcow2 refcounts in the deep walk: the stored ones (refcount table and blocks, read into the
window's ``stored`` array), the comparison with the recomputed ones at the end of each window
(overlaps, stored < referenced = ``refcount-mismatch``, stored > referenced = ``leaked-clusters``)
and the final findings and counters. Functions of the :class:`~.walk.Walk` they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from imagekit.formats.qcow2.constants import (
    COMPARE_SLICE,
    INCOMPAT_DIRTY,
    L1_CHUNK,
    R_COMPRESSED,
    R_DATA,
    R_L2,
    R_META,
    R_META2,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
)
from imagekit.formats.qcow2.model import hexstr

if TYPE_CHECKING:
    from imagekit.formats.qcow2.constants import U64
    from imagekit.formats.qcow2.walk import Walk


def read_refcounts(w: Walk) -> None:
    """Read the refcount table and this window's refcount blocks into ``stored``; mark them as metadata."""
    h, cs, cb = w.h, w.cs, w.cb
    rt_off = h.refcount_table_offset
    rt_len = h.refcount_table_clusters * cs
    if rt_off + rt_len > w.fsize:
        w.out.reject("refcount-table-outside-file", "refcount table runs past the end of the file")
        return
    w.mark_meta_range(rt_off, rt_len, "refcount table")
    order = h.refcount_order
    per_block_bits = cb + 3 - order
    per_block = 1 << per_block_bits
    agg: dict[str, list[int]] = {}
    k = 0
    for s in range(0, rt_len // 8, L1_CHUNK):
        w.tick()
        raw = w.rd.exact(rt_off + 8 * s, 8 * min(L1_CHUNK, rt_len // 8 - s))
        if raw is None:  # cannot happen: checked above
            return
        e = np.frombuffer(raw, ">u8").astype(np.uint64)
        res = (e & np.uint64(REFT_RESERVED_MASK)) != 0
        off = e & np.uint64(REFT_OFFSET_MASK)
        nz = off != 0
        unal = nz & ((off & np.uint64(cs - 1)) != 0)
        outside = nz & ~unal & w.past(off, cs)
        for key, mask in (("res", res), ("unal", unal), ("outside", outside)):
            if mask.any():
                i = int(np.flatnonzero(mask)[0])
                a = agg.setdefault(key, [0, s + i, int(off[i])])
                a[0] += int(mask.sum())
        good = np.flatnonzero(nz & ~unal & ~outside)
        bidx = (off[good] >> np.uint64(cb)).astype(np.int64)
        if w.first:
            w.refblock_idx.append(bidx)
        w.mark_meta_idx(bidx)
        for i, boff in zip((good + s).tolist(), off[good].tolist(), strict=True):
            k += 1
            if k % 64 == 0:
                w.tick()
            first = i << per_block_bits
            lo, hi = max(first, w.base), min(first + per_block, w.base + w.wn)
            if lo >= hi:
                continue
            blk = w.rd.exact(int(boff), cs)
            if blk is None:  # cannot happen: checked above
                continue
            vals = decode_refcounts(blk, order)[lo - first:hi - first]
            w.stored[lo - w.base:hi - w.base] = np.minimum(vals, np.uint64(0xFFFFFFFF)).astype(np.uint32)
    if "res" in agg:
        w.out.reject("reserved-bits", f"refcount table: {agg['res'][0]} entries have reserved bits set "
                        f"(first: index {agg['res'][1]})")
    for key, code, what in (("unal", "refcount-block-unaligned", "is not cluster aligned"),
                            ("outside", "refcount-block-outside-file", "runs past the end of the file")):
        if key in agg:
            cnt, i, o = agg[key]
            w.out.reject(code, f"{cnt} refcount blocks; first, refcount table[{i}] -> {hexstr(o)}, {what}")

# -- L2 --------------------------------------------------------------------


def describe(w: Walk, c: int) -> str:
    """What window-local cluster ``c`` is used as."""
    g = c + w.base
    r = int(w.role[c])
    what = []
    if r & R_DATA:
        what.append("compressed data" if r & R_COMPRESSED else "data")
    if r & R_L2:
        what.append("L2 table")
    for first, last, name in w.meta_ranges:
        if first <= g <= last:
            what.append(name)
    if any(bool((a == g).any()) for a in w.refblock_idx):
        what.append("refcount block")
    if any(bool((a == g).any()) for a in w.bitmap_data_idx):
        what.append("bitmap data")
    return f"cluster {hexstr(g << w.cb)} used as " + " and ".join(what or ["metadata"])

def compare_window(w: Walk, refcounts_known: bool) -> None:
    """Overlaps, refcount mismatches and counters of this window (in slices: small temporaries)."""
    acc = w.acc
    step = COMPARE_SLICE
    for s0 in range(0, w.wn, step):
        sl = slice(s0, min(s0 + step, w.wn))
        role, refs, stored = w.role[sl], w.refs[sl], w.stored[sl]
        kinds = ((role & R_DATA) != 0).astype(np.uint8) + ((role & R_L2) != 0) + ((role & R_META) != 0)
        overlap = (kinds > 1) | ((role & R_META2) != 0)
        no = int(overlap.sum())
        if no:
            for c in np.flatnonzero(overlap)[:3 - len(w.overlap_ex)].tolist():
                w.overlap_ex.append(describe(w, int(c) + s0))
        acc["overlap"] += no
        if refcounts_known:
            low = stored < refs
            nl = int(low.sum())
            if nl:
                for c in np.flatnonzero(low)[:5 - len(w.low_ex)].tolist():
                    w.low_ex.append(f"{hexstr((c + s0 + w.base) << w.cb)} (stored {int(stored[c])}, "
                                       f"referenced {int(refs[c])})")
            high = stored > refs
            nh = int(high.sum())
            if nh and not w.high_ex:
                w.high_ex = hexstr((int(np.flatnonzero(high)[0]) + s0 + w.base) << w.cb)
            acc["low"] += nl
            acc["high"] += nh
        used = refs != 0
        nused = int(np.count_nonzero(used))
        if nused:
            acc["end"] = w.base + sl.stop - int(np.argmax(used[::-1]))
        acc["used"] += nused
        acc["data"] += int(np.count_nonzero(role & R_DATA))
        acc["meta"] += int(np.count_nonzero(role & (R_META | R_L2)))
        acc["l2"] += int(np.count_nonzero(role & R_L2))

def finish(w: Walk, refcounts_known: bool) -> None:
    out, acc = w.report, w.acc
    if acc["overlap"]:
        out.reject("cluster-overlap", f"{acc['overlap']} host clusters are used for two different things: "
                   + "; ".join(w.overlap_ex))
    w.stats["overlapping_clusters"] = acc["overlap"]
    if w.copied_mismatch and refcounts_known:
        # qemu-img check counts these as corruptions (a write in place could change a shared cluster, or
        # copy one that is not); only stale refcounts under the dirty bit make them expected
        msg = (f"{w.copied_mismatch} L1/L2 entries have a COPIED flag that does not match refcount == 1 "
               f"(qemu-img check: OFLAG_COPIED errors); first: {w.copied_example}")
        if w.h.incompatible & INCOMPAT_DIRTY:
            out.warn("copied-flag-mismatch", msg + " (dirty bit set: QEMU rebuilds refcounts)")
        else:
            out.reject("copied-flag-mismatch", msg)
    if refcounts_known:
        nl, nh = acc["low"], acc["high"]
        if nl:
            msg = (f"{nl} clusters have a stored refcount lower than their number of references, so a write "
                   f"could free or overwrite a cluster still in use; first: {', '.join(w.low_ex)}")
            if w.h.incompatible & INCOMPAT_DIRTY:
                out.warn("refcount-mismatch", msg + " (dirty bit set: QEMU rebuilds refcounts)")
            else:
                out.reject("refcount-mismatch", msg)
        if nh and not w.complete:
            w.stats["refcounts_incomplete"] = 1
        elif nh:
            out.warn("leaked-clusters", f"{nh} clusters have a stored refcount higher than their references "
                     f"(leaked space; 'qemu-img check -r leaks' frees them); first: {w.high_ex}")
        w.stats["refcount_mismatches"] = nl
        w.stats["leaked_clusters"] = nh
    w.stats.update({
        "host_clusters": w.n,
        "data_clusters": acc["data"],
        "compressed_clusters": w.walk_counts["compressed"],
        "zero_clusters": w.walk_counts["zero"],
        "metadata_clusters": acc["meta"],
        "l2_tables": acc["l2"],
        "allocated_bytes": acc["used"] * w.cs,
        "image_end_offset": acc["end"] * w.cs,
        "copied_mismatches": w.copied_mismatch,
        "passes": w.passes,
    })



REFCOUNT_DTYPES: dict[int, np.dtype[Any]] = {
    3: np.dtype(np.uint8), 4: np.dtype(">u2"), 5: np.dtype(">u4"), 6: np.dtype(">u8")}


def decode_refcounts(blk: bytes, order: int) -> U64:
    """One refcount block as an array of uint64 (sub-byte widths: LSB first, as QEMU)."""
    if order <= 2:
        bits = np.unpackbits(np.frombuffer(blk, np.uint8), bitorder="little")
        w = 1 << order
        if w == 1:
            return bits.astype(np.uint64)
        weights = (np.uint64(1) << np.arange(w, dtype=np.uint64))
        return (bits.reshape(-1, w).astype(np.uint64) * weights).sum(axis=1).astype(np.uint64)
    dt = REFCOUNT_DTYPES[order]
    return np.frombuffer(blk, dt).astype(np.uint64)

