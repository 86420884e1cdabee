"""Deep qcow2 verifier: imagekit's own, independent re-implementation of the
checks QEMU does when it opens (``qcow2_do_open``) and checks
(``qemu-img check``, ``block/qcow2-refcount.c``) a qcow2 image, done on
untrusted input without QEMU.

What is checked, and why
========================

* **Header** (``docs/interop/qcow2.txt``), every field big-endian: magic,
  version 2/3, cluster_bits 9..21 (>= 14 with extended L2), header_length
  rules, refcount_order 0..6 (4 for v2), crypt_method, the incompatible
  feature bits (dirty, corrupt, external data file, compression type,
  extended L2; any unknown bit is refused as QEMU refuses it), the
  compression type byte, and QEMU's size limits (L1 <= 32 MiB and covering
  the virtual size, refcount table <= 8 MiB, <= 65536 snapshots, snapshot
  table <= 64 MiB).  A header QEMU would refuse to open is rejected.
* **Dangerous references**: a backing file or an external data file make
  QEMU open *another* host file named by the image (CVE-2024-32498; ``json:``
  names: CVE-2024-4467); both are rejected and the message names the file.
  Encrypted images cannot be inspected or converted without a key: rejected.
* **Header extensions**: bounded by cluster 0 and the backing file name,
  8-byte padded, each type at most once; bitmaps, encryption-header,
  backing-format, data-file and feature-table extensions are decoded.
* **Every table** (L1, refcount table and blocks, snapshot table, snapshot L1s,
  bitmap directory and tables, every L2 table) must be cluster aligned and
  lie entirely inside the file.  A structure past EOF is a finding: QEMU would
  silently read zeros there, a verifier must not.
* **Every L1/L2 entry** of the active and of each snapshot's L1 table:
  reserved bits, alignment, data inside the file, compressed descriptors,
  the COPIED flag, extended L2 subcluster bitmaps.
* **Refcounts** are recomputed from every reference (exactly what
  ``qemu-img check`` counts: header cluster, L1s, L2s -- once per L1 path --,
  data clusters and every cluster a compressed run touches, refcount table and
  blocks, snapshot table, encryption header, bitmap directory/tables/data)
  and compared with the stored ones: stored < computed means a write would
  free a cluster that is still in use (``refcount-mismatch``, reject; only a
  warning when the dirty bit says QEMU will rebuild them); stored > computed
  is a leak (``leaked-clusters``, warn).
* **Overlaps**: a host cluster used as two different things (data and
  metadata, L2 and data, two metadata structures) is ``cluster-overlap``:
  that is how hostile images make a write to guest data rewrite metadata.

Bounds
======

All reads go through ``os.pread`` on one descriptor.  Every loop runs over a
table whose size was first validated against QEMU's limits and the file size,
and ``time_limit`` stops the deep walk (``time-limit`` reject).  Memory is the
same whatever the size of the image: the deep check works on windows of
``WINDOW_CLUSTERS`` host clusters (1.5M), with three arrays per window (computed
refcount u32, stored refcount u32, role bits u8: 13.5 MiB), walking the tables
again for each window (one pass up to 6 GiB files with 4 KiB clusters, up to
96 GiB with 64 KiB clusters).  Everything else is read in bounded pieces: L1 and
refcount-table entries 64K at a time, L2 tables in 256 KiB batches, and the L2
tables are gathered from the L1 tables 256K host clusters at a time into dense
counters (2.3 MiB).  Measured peak RSS of ``imagekit check`` (Python, click,
numpy and oslo take ~42 MiB of it): see ``bench/bench_check.py``.  At most
``MAX_FINDINGS_PER_CODE`` findings are kept per code; the rest are counted.

Modules
=======

``constants`` (QEMU's limits, bits, masks, structures), ``model`` (the results and the shared
plumbing), ``header`` (the fixed header, limits and table placement: the cheap pass),
``extensions``, ``snapshots``, ``walk`` (the deep walk's state and driver), ``l2``,
``refcounts``, ``bitmaps``. This package's API: :func:`verify`, :func:`read_info`,
:func:`verify_format` (the registry's entry: a :class:`~imagekit.formats.base.FormatReport`,
which :class:`Qcow2Report` is) and :func:`describe`.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from imagekit.errors import ImageReadError
from imagekit.formats.base import VerifyOptions
from imagekit.formats.qcow2.constants import L2_RANGE_CLUSTERS, MAX_FINDINGS_PER_CODE, WINDOW_CLUSTERS
from imagekit.formats.qcow2.header import parse_all
from imagekit.formats.qcow2.model import Qcow2Info, Qcow2Report, Reader, Timeout, new_findings
from imagekit.formats.qcow2.stricter import STRICTER_THAN_QEMU
from imagekit.formats.qcow2.walk import Walk

__all__ = ["STRICTER_THAN_QEMU", "Qcow2Info", "Qcow2Report", "read_info", "verify", "verify_format", "describe", "WINDOW_CLUSTERS",
           "L2_RANGE_CLUSTERS", "MAX_FINDINGS_PER_CODE"]

_Out = new_findings  # the verifier's findings collector (capped per code), as the tests know it


def _open(path: str | os.PathLike[str]) -> tuple[int, int, str]:
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageReadError(f"cannot open {p}: {e.strerror}",
                             hint="check that the file exists and is readable") from e
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) not in (0o100000, 0o060000):  # regular file or block device
            raise ImageReadError(f"{p} is not a regular file")
        size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        os.close(fd)
        raise ImageReadError(f"cannot read {p}: {e.strerror}") from e
    except ImageReadError:
        os.close(fd)
        raise
    return fd, size, p


def read_info(path: str | os.PathLike[str]) -> Qcow2Info:
    """Parse the header, header extensions and snapshot table (cheap: no table walk).

    Raises :class:`ImageReadError` if the file cannot be read, is not qcow2, or
    its header is unusable (the reason is the message).
    """
    fd, size, p = _open(path)
    try:
        out = new_findings()
        h = parse_all(Reader(fd, size, p), out, None)
    finally:
        os.close(fd)
    if h is None:
        msg = next((f.message for f in out.items if f.severity == "reject"), "unusable qcow2 header")
        raise ImageReadError(f"{p}: {msg}")
    return h.info()


def verify(path: str | os.PathLike[str], *, deep: bool = True, max_virtual_size: int | None = None,
           time_limit: float = 300.0, window_clusters: int = WINDOW_CLUSTERS,
           l2_range_clusters: int = L2_RANGE_CLUSTERS) -> Qcow2Report:
    """Verify a qcow2 image; every problem becomes a :class:`Finding` (see module doc).

    ``deep=False`` checks the header, extensions, snapshot table and table
    placement only; ``deep=True`` also walks every L1/L2/refcount/bitmap table
    and recomputes the refcounts.  Raises :class:`ImageReadError` only when the
    file cannot be opened or read (ENOENT, EACCES, EIO).  ``window_clusters`` and
    ``l2_range_clusters`` trade memory for passes (the tests use tiny values to
    show that the result does not depend on them).
    """
    start = time.monotonic()
    fd, size, p = _open(path)
    out = new_findings()
    stats: dict[str, int] = {"file_size": size}
    info: Qcow2Info | None = None
    try:
        rd = Reader(fd, size, p)
        h = parse_all(rd, out, max_virtual_size)
        if h is not None:
            info = h.info()
            stats["cluster_size"] = h.cluster_size
            if deep:
                d = Walk(rd, h, out, start + time_limit, window_clusters, l2_range_clusters)
                try:
                    d.run()
                except Timeout:
                    out.reject("time-limit", f"verification stopped after {time_limit:g} s; the image was not "
                               "fully checked")
                except MemoryError:
                    out.reject("too-many-clusters", "not enough memory to check this image")
                stats.update(d.stats)
    except ImageReadError:
        raise
    except OSError as e:  # pragma: no cover - reads are wrapped; keep the contract anyway
        if e.errno in (errno.EIO, errno.EACCES, errno.ENOENT):
            raise ImageReadError(f"cannot read {p}: {e.strerror}") from e
        raise ImageReadError(f"cannot read {p}: {e}") from e
    finally:
        os.close(fd)
    stats["elapsed_ms"] = int((time.monotonic() - start) * 1000)
    return Qcow2Report.build(info, out.freeze(), stats)


def verify_format(path: str | os.PathLike[str], options: VerifyOptions) -> Qcow2Report:
    """The registry's entry point: :func:`verify` with a caller's :class:`VerifyOptions`."""
    return verify(path, deep=options.deep, max_virtual_size=options.max_virtual_size)


def describe(info: Qcow2Info) -> dict[str, Any]:
    """What ``imagekit inspect`` shows of a qcow2 header (JSON-ready)."""
    return {
        "version": info.version,
        "compat": info.compat,
        "cluster_size": info.cluster_size,
        "compression_type": info.compression_type,
        "features": {
            "extended_l2": info.extended_l2,
            "lazy_refcounts": info.lazy_refcounts,
            "dirty": info.dirty,
            "corrupt": info.corrupt,
            "bitmaps": info.bitmaps,
            "feature_name_table": list(info.feature_names),
        },
        "snapshots": list(info.snapshots),
        "backing_file": info.backing_file,
        "data_file": info.data_file,
        "header": info.to_dict(),
    }
