"""imagekit's own qcow2 writer: one sequential pass, hashed as written, verified without re-reading.

From the input's allocation map (an NBD export of the checked input, :mod:`.source`) the planner
(:mod:`.layout`) decides the whole file before the first byte is written: header, refcount table
and blocks, L1 and L2 tables, then the data clusters in guest order. The output can therefore go to
a file or to a stream (an HTTP upload to Glance) front to back. Compression (zlib as QEMU writes it,
zstd on request) runs in parallel workers (:mod:`.compress`); compressed runs are planned once
they are all known. :mod:`.emit` produces the bytes and hashes exactly what it writes or sends.
:mod:`.verify` compares ``qemu-img map`` of the result with the plan. The same input and options
always give the same bytes (no timestamps, no dependence on the number of workers).

Never written: backing files, snapshots, bitmaps, extended L2 entries, external data files,
encryption, lazy refcounts. Refcounts are 16-bit.

Typical use::

    with NbdSource(path, "qcow2", limits=LIMITS) as src:
        prepared = prepare(src, WriteOptions(compression="zlib"))
        digests = write_file(prepared, fd, ("sha256",))
    verify_map(out_path, prepared.layout)
"""

from __future__ import annotations

from imagekit.qcow2write.emit import Hasher, Prepared, StreamBody, WriteOptions, WriteStats, prepare, write_file
from imagekit.qcow2write.layout import Geometry, Layout, LayoutError, plan_compressed, plan_plain
from imagekit.qcow2write.source import NbdError, NbdSource, RawSource, Source, open_source
from imagekit.qcow2write.verify import MapMismatch, qemu_map, verify_map

__all__ = ["Geometry", "Hasher", "Layout", "LayoutError", "MapMismatch", "NbdError", "NbdSource", "Prepared",
           "RawSource", "Source", "StreamBody", "WriteOptions", "open_source", "WriteStats", "plan_compressed", "plan_plain", "prepare", "qemu_map",
           "verify_map", "write_file"]
