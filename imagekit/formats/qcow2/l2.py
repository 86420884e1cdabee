"""qcow2 L2 tables in the deep walk: every entry of every L2 table, checked as arrays.

Standard entries: reserved bits, the zero flag (v3), alignment and data inside the file, extended L2
subcluster bitmaps, and the COPIED flag against the stored refcount (tables reachable from the active
L1). Compressed entries: no COPIED flag, the descriptor's host range inside the file, never with an
external data file. Every referenced host cluster is added to the walk's recomputed refcounts (once
per L1 path) and marked as data. Problems are summed over all tables into one finding per kind
(``Walk.l2_reject``). Functions of the :class:`~.walk.Walk` they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imagekit.formats.qcow2.constants import (
    L2_BATCH_BYTES,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    R_COMPRESSED,
    R_DATA,
)
from imagekit.formats.qcow2.model import hexstr

if TYPE_CHECKING:
    import numpy.typing as npt

    from imagekit.formats.qcow2.constants import I64, U64
    from imagekit.formats.qcow2.walk import Walk

    Mask = npt.NDArray[np.bool_]


@dataclass
class _Batch:
    """The entries of a batch of L2 tables, as arrays (one element per entry)."""

    tables: I64  # host cluster of each table
    e: U64  # the 64-bit entries
    bm: U64  # extended L2: the subcluster bitmaps (empty otherwise)
    per_table: int
    cb: int
    ext: bool
    emult: U64  # L1 paths to the entry's table
    eactive: Mask  # the entry's table is reachable from the active L1

    def where(self, mask: Mask) -> str:
        """The first entry ``mask`` selects, for a finding's message."""
        i = int(np.flatnonzero(mask)[0])
        t, j = divmod(i, self.per_table)
        return f"L2 table at {hexstr(int(self.tables[t]) << self.cb)}, entry {j}: {hexstr(int(self.e[i]))}"


def walk_l2s(w: Walk, l2_idx: I64, mult: U64, active: Mask) -> None:
    """Read the L2 tables (sorted, distinct) in batches and check all their entries as arrays."""
    per_batch = max(1, L2_BATCH_BYTES // w.cs)
    for s in range(0, l2_idx.size, per_batch):
        w.tick()
        sl = slice(s, s + per_batch)
        idx = l2_idx[sl]
        bufs = [w.rd.exact(int(c) << w.cb, w.cs) for c in idx.tolist()]
        if any(b is None for b in bufs):  # validated before; defensive
            w.out.reject("l2-outside-file", "an L2 table runs past the end of the file")
            return
        check_l2_batch(w, b"".join(b for b in bufs if b is not None), idx, mult[sl], active[sl])


def check_l2_batch(w: Walk, raw: bytes, tables: I64, mult: U64, active: Mask) -> None:
    """Check the entries of the L2 tables ``tables`` (their bytes concatenated in ``raw``)."""
    a = np.frombuffer(raw, ">u8").astype(np.uint64)
    ext = w.h.extended_l2
    if ext:
        a2 = a.reshape(-1, 2)
        e = a2[:, 0]
        bm = a2[:, 1]
    else:
        e = a
        bm = np.zeros(0, np.uint64)
    per_table = w.cs // (16 if ext else 8)
    b = _Batch(tables, e, bm, per_table, w.cb, ext, np.repeat(mult, per_table), np.repeat(active, per_table))
    comp = (e & np.uint64(OFLAG_COMPRESSED)) != 0
    copied = (e & np.uint64(OFLAG_COPIED)) != 0
    if comp.any():
        _compressed(w, b, comp, copied)
    _standard(w, b, ~comp, copied)


def _compressed(w: Walk, b: _Batch, comp: Mask, copied: Mask) -> None:
    """Compressed entries: flags, then (without an external data file) their host ranges."""
    w.counts["compressed"] += int(comp.sum())
    m = comp & copied
    if m.any():
        w.l2_reject("copied-on-compressed", int(m.sum()), "compressed L2 entries have the COPIED flag", b.where(m))
    if b.ext:
        m = comp & (b.bm != 0)
        if m.any():
            w.l2_reject("reserved-bits", int(m.sum()), "compressed extended L2 entries have a non-zero "
                        "subcluster bitmap", b.where(m))
    if w.h.has_data_file:
        w.l2_reject("compressed-with-data-file", int(comp.sum()), "compressed clusters in an image "
                    "with an external data file", b.where(comp))
    else:
        _compressed_ranges(w, b, comp)


def _compressed_ranges(w: Walk, b: _Batch, comp: Mask) -> None:
    """Decode the compressed descriptors: the host bytes each covers must lie inside the file; the (up to
    three) host clusters each touches are referenced as compressed data."""
    cb = b.cb
    x = 62 - (cb - 8)
    ce = b.e[comp]
    coff = ce & np.uint64((1 << x) - 1)
    if x > 56:
        hi = (coff >> np.uint64(56)) != 0
        if hi.any():
            sub = np.zeros_like(comp)
            sub[np.flatnonzero(comp)[hi]] = True
            w.l2_reject("reserved-bits", int(hi.sum()), "compressed descriptors use offset bits "
                        "above 55", b.where(sub))
            coff = coff & np.uint64((1 << 56) - 1)
    nsec = ((ce >> np.uint64(x)) & np.uint64((1 << (cb - 8)) - 1)) + np.uint64(1)
    end = (coff & np.uint64(~511 & 0xFFFFFFFFFFFFFFFF)) + nsec * np.uint64(512)
    bad = (end - np.uint64(512)) >= np.uint64(w.fsize)
    if bad.any():
        sub = np.zeros_like(comp)
        sub[np.flatnonzero(comp)[bad]] = True
        w.l2_reject("compressed-outside-file", int(bad.sum()), "compressed clusters run past the end "
                    "of the file", b.where(sub))
    ok = ~bad
    first = (coff[ok] >> np.uint64(cb)).astype(np.int64)
    last = np.minimum(((end[ok] - np.uint64(1)) >> np.uint64(cb)).astype(np.int64), w.n - 1)
    cm = b.emult[comp][ok]
    parts = [(first, cm)]
    for k in (1, 2):
        sel = last >= first + k
        if sel.any():
            parts.append((first[sel] + k, cm[sel]))
    for pidx, pm in parts:
        w.set_role(pidx, R_DATA | R_COMPRESSED)
        w.add_weighted(pidx, pm)


def _standard(w: Walk, b: _Batch, std: Mask, copied: Mask) -> None:
    """Standard entries: reserved bits, zero clusters, subclusters, then the data clusters they reference."""
    h, e = w.h, b.e
    se = e[std]
    rmask = L2E_STD_RESERVED_MASK | (OFLAG_ZERO if (h.version == 2 or b.ext) else 0)
    res = std & ((e & np.uint64(rmask)) != 0)
    if res.any():
        w.l2_reject("reserved-bits", int(res.sum()), "L2 entries have reserved bits set", b.where(res))
    if h.version == 3 and not b.ext:
        w.counts["zero"] += int(((se & np.uint64(OFLAG_ZERO)) != 0).sum())
    off = e & np.uint64(L2E_OFFSET_MASK)
    alloc = std & (off != 0)
    if b.ext:
        _subclusters(w, b, std, off)
    if h.has_data_file:
        return  # data offsets refer to the external file
    unal = alloc & ((off & np.uint64(w.cs - 1)) != 0)
    if unal.any():
        w.l2_reject("data-unaligned", int(unal.sum()), "data cluster offsets are not cluster aligned",
                    b.where(unal))
    outside = alloc & ~unal & (off >= np.uint64(w.fsize))
    if outside.any():
        w.l2_reject("data-outside-file", int(outside.sum()), "data clusters lie past the end of the file",
                    b.where(outside))
    good = alloc & ~unal & ~outside
    didx = (off[good] >> np.uint64(b.cb)).astype(np.int64)
    w.set_role(didx, R_DATA)
    w.add_weighted(didx, b.emult[good])
    _copied_flags(w, b, good & b.eactive, off, copied)


def _subclusters(w: Walk, b: _Batch, std: Mask, off: U64) -> None:
    """Extended L2: a subcluster is never both allocated and zero, nor allocated without a host cluster."""
    lo = b.bm & np.uint64(0xFFFFFFFF)
    hi32 = b.bm >> np.uint64(32)
    m = std & ((lo & hi32) != 0)
    if m.any():
        w.l2_reject("bad-subcluster-bitmap", int(m.sum()), "extended L2 entries mark subclusters both "
                    "allocated and zero", b.where(m))
    m = std & (off == 0) & (lo != 0)
    if m.any():
        w.l2_reject("bad-subcluster-bitmap", int(m.sum()), "extended L2 entries allocate subclusters "
                    "without a host cluster", b.where(m))
    w.counts["zero"] += int((std & (hi32 == np.uint64(0xFFFFFFFF))).sum())


def _copied_flags(w: Walk, b: _Batch, act: Mask, off: U64, copied: Mask) -> None:
    """COPIED flag vs stored refcount, for the data clusters of L2 tables reachable from the active L1."""
    if not act.any():
        return
    aidx = (off[act] >> np.uint64(b.cb)).astype(np.int64)
    loc, sel = w.local(aidx)
    acop = copied[act]
    mism = (w.stored[loc] == 1) != (acop if sel is None else acop[sel])
    if mism.any():
        n = int(mism.sum())
        if not w.copied_example:
            pos = np.flatnonzero(act)
            if sel is not None:
                pos = pos[sel]
            sub = np.zeros_like(act)
            sub[pos[mism]] = True
            w.copied_example = b.where(sub)
        w.copied_mismatch += n
