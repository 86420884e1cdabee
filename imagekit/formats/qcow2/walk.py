"""qcow2 deep walk: every L1, L2, refcount and bitmap table, with the refcounts recomputed.

:class:`Walk` holds the state of the walk and drives it (``run``). Host clusters are handled in
windows of ``window`` clusters: the per-cluster arrays (computed refcount u32, stored refcount u32,
role bits u8) cover one window, and the tables are walked once per window. Findings about the
tables themselves and the counters are taken in the first pass only; the overlap check and the
refcount comparison are accumulated over the passes. The L2 tables are gathered from the L1 tables
``l2_range`` host clusters at a time, into dense counters, so memory does not grow with the L1
tables either. The L2 entry checks live in :mod:`.l2`, the refcounts and the end-of-window
comparison in :mod:`.refcounts`, the bitmaps in :mod:`.bitmaps`. ``time_limit`` is enforced by
``tick()`` (raises :class:`Timeout`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # numpy.typing costs import time; only needed by mypy
    import numpy.typing as npt

    from imagekit.formats.qcow2.constants import I64, U64

from imagekit.formats.qcow2 import bitmaps, l2, refcounts
from imagekit.formats.qcow2.constants import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    EXT_NAMES,
    L1_CHUNK,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2_RANGE_CLUSTERS,
    PENDING_DATA,
    QCOW_MAX_L1_SIZE,
    R_L2,
    R_META,
    R_META2,
    WINDOW_CLUSTERS,
)
from imagekit.formats.qcow2.model import Hdr, Reader, Timeout, hexstr, new_findings
from imagekit.verdict import Findings

L1Table = tuple[int, int, bool, str]  # offset, entries, is the active L1, label


class Walk:
    """Walk every table and recompute refcounts (see the module docstring for bounds)."""

    def __init__(self, rd: Reader, h: Hdr, out: Findings, deadline: float,
                 window: int = WINDOW_CLUSTERS, l2_range: int = L2_RANGE_CLUSTERS) -> None:
        self.rd, self.h, self.deadline = rd, h, deadline
        self.report = out  # the check's findings
        self.out = out  # findings of the table walks: the real collector in the first pass only
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.fsize = rd.size
        self.n = (self.fsize + self.cs - 1) >> self.cb
        self.window = max(1, int(window))
        self.l2_range = max(1, int(l2_range))
        self.base = 0
        self.wn = 0
        self.first = True
        self.passes = 0
        self.refs: npt.NDArray[np.uint32] = np.zeros(0, np.uint32)
        self.stored: npt.NDArray[np.uint32] = np.zeros(0, np.uint32)
        self.role: npt.NDArray[np.uint8] = np.zeros(0, np.uint8)
        self.added = 0  # references added to ``refs`` in this window (saturating arithmetic past 2**32 - 1)
        self.meta_ranges: list[tuple[int, int, str]] = []
        self.refblock_idx: list[I64] = []
        self.bitmap_data_idx: list[I64] = []
        self.stats: dict[str, int] = {}
        self.counts = {"compressed": 0, "zero": 0}
        self.walk_counts = self.counts
        self.copied_mismatch = 0
        self.copied_example = ""
        self.l2_findings: dict[tuple[str, str], list[Any]] = {}
        self._pending: list[tuple[I64, int]] = []
        self._pending_len = 0
        self.complete = True
        self.acc = {"overlap": 0, "low": 0, "high": 0, "data": 0, "meta": 0, "l2": 0, "used": 0, "end": 0}
        self.overlap_ex: list[str] = []
        self.low_ex: list[str] = []
        self.high_ex = ""

    def past(self, off: U64, length: int) -> npt.NDArray[np.bool_]:
        """Which ``[off, off+length)`` ranges end past EOF (overflow-safe)."""
        if self.fsize < length:
            return np.ones(off.shape, bool)
        return off > np.uint64(self.fsize - length)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise Timeout

    # -- the window --------------------------------------------------------------

    def begin(self, base: int) -> None:
        self.base = base
        self.wn = min(self.window, self.n - base)
        if self.refs.size == self.wn:  # reuse: never two windows' arrays in memory at once
            self.refs.fill(0)
            self.stored.fill(0)
            self.role.fill(0)
        else:
            self.refs = self.stored = np.zeros(0, np.uint32)
            self.role = np.zeros(0, np.uint8)
            self.refs = np.zeros(self.wn, np.uint32)
            self.stored = np.zeros(self.wn, np.uint32)
            self.role = np.zeros(self.wn, np.uint8)
        self.added = 0
        self._pending = []
        self._pending_len = 0

    def local(self, idx: I64) -> tuple[I64, npt.NDArray[np.bool_] | None]:
        """Host cluster indices -> indices into this window's arrays, and which were kept (None: all)."""
        if self.base == 0 and self.wn >= self.n:
            return idx, None
        sel = (idx >= self.base) & (idx < self.base + self.wn)
        return idx[sel] - self.base, sel

    def add_refs(self, idx: I64, w: int | U64) -> None:
        """refs[idx] += w (window-local idx, repeats allowed), saturating at 2**32 - 1."""
        if idx.size == 0:
            return
        total = int(w) * int(idx.size) if isinstance(w, int) else int(w.sum())
        if self.added + total <= 0xFFFFFFFF:
            np.add.at(self.refs, idx, np.uint32(w) if isinstance(w, int) else w.astype(np.uint32))
            self.added += total
            return
        u, inv = np.unique(idx, return_inverse=True)
        acc = self.refs[u].astype(np.uint64)
        np.add.at(acc, inv, np.uint64(w) if isinstance(w, int) else w.astype(np.uint64))
        self.refs[u] = np.minimum(acc, np.uint64(0xFFFFFFFF)).astype(np.uint32)
        self.added = 1 << 40

    # -- marking ---------------------------------------------------------------

    def mark_meta_idx(self, idx: I64) -> None:
        loc, _sel = self.local(idx)
        if loc.size == 0:
            return
        u, c = np.unique(loc, return_counts=True)
        self.add_refs(u, c.astype(np.uint64))
        had = (self.role[u] & R_META) != 0
        self.role[u] |= R_META
        twice = u[had | (c > 1)]
        if twice.size:
            self.role[twice] |= R_META2

    def mark_meta_range(self, off: int, length: int, what: str) -> None:
        if length <= 0 or off >= self.fsize:
            return
        first = off >> self.cb
        last = min((off + length - 1) >> self.cb, self.n - 1)
        if self.first:
            self.meta_ranges.append((first, last, what))
        lo, hi = max(first, self.base), min(last, self.base + self.wn - 1)
        if lo <= hi:
            self.mark_meta_idx(np.arange(lo, hi + 1, dtype=np.int64))

    def add_data(self, loc: I64, mult: int) -> None:
        self._pending.append((loc, mult))
        self._pending_len += loc.size
        if self._pending_len > PENDING_DATA:
            self.flush_data()

    def flush_data(self) -> None:
        if not self._pending:
            return
        ones = [i for i, m in self._pending if m == 1]
        if ones:
            self.add_refs(np.concatenate(ones), 1)
        for i, m in self._pending:
            if m != 1:
                self.add_refs(i, m)
        self._pending = []
        self._pending_len = 0

    def add_weighted(self, idx: I64, m: U64) -> None:
        """Data references to host clusters ``idx`` (global), ``m`` L1 paths each."""
        loc, sel = self.local(idx)
        if sel is not None:
            m = m[sel]
        if loc.size == 0:
            return
        if bool((m == 1).all()):
            self.add_data(loc, 1)
        else:
            for v in np.unique(m).tolist():
                self.add_data(loc[m == v], int(v))

    def set_role(self, idx: I64, bits: int) -> None:
        loc, _sel = self.local(idx)
        self.role[loc] |= bits

    # -- L1 --------------------------------------------------------------------

    def l1_chunks(self, offset: int, size: int) -> Iterator[tuple[int, U64]]:
        for s in range(0, size, L1_CHUNK):
            self.tick()
            raw = self.rd.exact(offset + 8 * s, 8 * min(L1_CHUNK, size - s))
            if raw is None:
                return
            yield s, np.frombuffer(raw, ">u8").astype(np.uint64)

    def scan_l1(self, offset: int, size: int, label: str) -> None:
        """Validate one L1 table's entries (findings only; done once)."""
        if size == 0:
            return
        if self.rd.exact(offset, 0) is None or offset + 8 * size > self.fsize:
            self.out.reject("l1-outside-file", f"{label} runs past the end of the file")
            return
        agg: dict[str, list[Any]] = {}
        n_nz = n_good = 0
        for s, e in self.l1_chunks(offset, size):
            res = (e & np.uint64(L1E_RESERVED_MASK)) != 0
            off = e & np.uint64(L1E_OFFSET_MASK)
            nz = off != 0
            unal = nz & ((off & np.uint64(self.cs - 1)) != 0)
            outside = nz & ~unal & self.past(off, self.cs)
            flags_only = ~nz & (e != 0)  # e.g. COPIED without a table: qemu-img check walks cluster 0 as one
            for key, mask in (("res", res), ("unal", unal), ("outside", outside), ("flags", flags_only)):
                if mask.any():
                    i = int(np.flatnonzero(mask)[0])
                    a = agg.setdefault(key, [0, s + i, int(e[i]), int(off[i])])
                    a[0] += int(mask.sum())
            n_nz += int(nz.sum())
            n_good += int((nz & ~unal & ~outside).sum())
        if "res" in agg:
            cnt, i, ent, _o = agg["res"]
            self.out.reject("reserved-bits", f"{label}: {cnt} entries have reserved bits set "
                            f"(first: index {i}, entry {hexstr(ent)})")
        if "flags" in agg:
            cnt, i, ent, _o = agg["flags"]
            self.out.reject("l1-entry-without-table", f"{label}: {cnt} entries carry flags but no L2 table offset "
                            f"(first: index {i}, entry {hexstr(ent)}); qemu-img check reads the header cluster as "
                            "their L2 table and counts corruptions")
        for key, code, what in (("unal", "l2-unaligned", "is not cluster aligned"),
                                ("outside", "l2-outside-file", "runs past the end of the file")):
            if key in agg:
                cnt, i, _e, o = agg[key]
                self.out.reject(code, f"{label}: {cnt} L2 table offsets; first, L1[{i}] -> {hexstr(o)}, {what}")
        if n_good != n_nz:
            self.complete = False

    def collect_l2(self, l1s: list[L1Table], lo: int, hi: int,
                   refcounts_known: bool) -> tuple[I64, U64, npt.NDArray[np.bool_]]:
        """The distinct L2 tables in host clusters [lo, hi): (cluster index, number of L1 paths, reachable
        from the active L1). Also checks the active L1's COPIED flags against the stored refcounts."""
        cnt = np.zeros(hi - lo, np.uint64)
        act = np.zeros(hi - lo, bool)
        for offset, size, active, _label in l1s:
            if size == 0 or offset + 8 * size > self.fsize:
                continue
            for _s, e in self.l1_chunks(offset, size):
                off = e & np.uint64(L1E_OFFSET_MASK)
                c = (off >> np.uint64(self.cb)).astype(np.int64)
                good = (off != 0) & ((off & np.uint64(self.cs - 1)) == 0) & ~self.past(off, self.cs) \
                    & (c >= lo) & (c < hi)
                if not good.any():
                    continue
                gi = c[good] - lo
                np.add.at(cnt, gi, np.uint64(1))
                if active:
                    act[gi] = True
                    if refcounts_known:
                        loc, sel = self.local(c[good])
                        cop = (e[good] >> np.uint64(63)).astype(bool)
                        if sel is not None:
                            cop = cop[sel]
                        m = (self.stored[loc] == 1) != cop
                        if m.any():
                            self.copied_mismatch += int(m.sum())
                            if not self.copied_example:
                                self.copied_example = f"L2 table at {hexstr(int(loc[m][0] + self.base) << self.cb)}"
        nz = np.flatnonzero(cnt)
        return nz.astype(np.int64) + lo, cnt[nz], act[nz]

    # -- findings of the L2 entries -------------------------------------------

    def l2_reject(self, code: str, count: int, text: str, first: str) -> None:
        """An L2-entry problem: summed over all L2 tables into one finding per (code, text)."""
        agg = self.l2_findings.get((code, text))
        if agg is None:
            self.l2_findings[(code, text)] = [count, first]
        else:
            agg[0] = int(agg[0]) + count

    def emit_l2_findings(self) -> None:
        for (code, text), (count, first) in sorted(self.l2_findings.items()):
            self.out.reject(code, f"{count} {text}; first: {first}")
        self.l2_findings = {}

    # -- driver ----------------------------------------------------------------

    def run(self) -> None:
        l1s = self._l1_tables()
        # 1. the L1 tables' entries (once)
        for off, size, _active, label in l1s:
            self.tick()
            self.scan_l1(off, size, label)
        refcounts_known = self.h.reftable_ok
        for base in range(0, self.n, self.window):
            self._window(base, l1s, refcounts_known)
        refcounts.finish(self, refcounts_known)

    def _l1_tables(self) -> list[L1Table]:
        """The L1 tables to walk: the active one and each snapshot's that is placed right (sets ``complete``)."""
        h, cs = self.h, self.cs
        l1s: list[L1Table] = []
        if h.l1_ok:
            l1s.append((h.l1_table_offset, h.l1_size, True, "active L1 table"))
        # leaks can only be told apart when every reference was seen
        self.complete = h.l1_ok and h.snapshots_ok and not h.has_data_file and not (
            h.autoclear & AUTOCLEAR_BITMAPS and EXT_NAMES[EXT_BITMAPS] in h.extensions and h.bitmaps_ext is None)
        if h.snapshots_ok:
            for i, sn in enumerate(h.snapshots):
                if (sn.l1_size <= QCOW_MAX_L1_SIZE // 8 and sn.l1_offset % cs == 0 and sn.l1_offset >= cs
                        and sn.l1_offset + 8 * sn.l1_size <= self.fsize):
                    l1s.append((sn.l1_offset, sn.l1_size, False, f"snapshot {i} L1 table"))
                else:
                    self.complete = False
        return l1s

    def _window(self, base: int, l1s: list[L1Table], refcounts_known: bool) -> None:
        """One pass: every reference into host clusters [base, base + window)."""
        h, cs = self.h, self.cs
        self.begin(base)
        self.passes += 1
        # 2. fixed metadata
        for off, size, _active, label in l1s:
            self.mark_meta_range(off, size * 8, label)
        self.mark_meta_range(0, cs, "header")
        if h.snapshots_ok and h.nb_snapshots:
            self.mark_meta_range(h.snapshots_offset, h.snapshots_size, "snapshot table")
        if h.crypto_header is not None:
            self.mark_meta_range(h.crypto_header[0], h.crypto_header[1], "encryption header")
        bitmaps.walk_bitmaps(self)
        # 3. stored refcounts (needed for the COPIED checks of step 4)
        if refcounts_known:
            refcounts.read_refcounts(self)
        # 4. L2 tables, each once, weighted by the number of L1 paths to it
        for lo in range(0, self.n, self.l2_range):
            l2_idx, mult, active = self.collect_l2(l1s, lo, min(lo + self.l2_range, self.n), refcounts_known)
            loc, sel = self.local(l2_idx)
            self.add_refs(loc, mult if sel is None else mult[sel])
            self.role[loc] |= R_L2
            l2.walk_l2s(self, l2_idx, mult, active)
        self.emit_l2_findings()
        self.flush_data()
        # 5. overlaps and refcounts of this window
        refcounts.compare_window(self, refcounts_known)
        if self.first:
            self.first = False
            self.walk_counts = self.counts
            self.counts = {"compressed": 0, "zero": 0}
            self.out = new_findings()  # later passes repeat the table walks: their findings are already known
