"""Producing the output: plan from the allocation map, then every byte in file order, hashed as written.

:func:`prepare` reads the input's allocation map and plans the layout. Uncompressed, that is all
it does: the data is read while the output is produced. Compressed, it reads and compresses every
allocated cluster first (:mod:`.compress`, in parallel), because the L2 entries and refcounts in
front of the data depend on the compressed sizes; the runs wait in a :class:`~.compress.Spool`
(clusters stored whole are read again from the input when they are written, not kept).

:meth:`Prepared.chunks` yields the file's bytes in order: metadata, then data. :func:`write_file`
writes them to a file descriptor; :class:`StreamBody` is the same bytes as a sized iterable for an
HTTP request (Glance). Both hash exactly the bytes they pass on (:class:`Hasher`: one thread per
algorithm, hashlib releases the GIL), so the digests describe the output without reading it back.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from imagekit.qcow2write import compress as comp
from imagekit.qcow2write.layout import COMPRESSED, Geometry, Layout, LayoutError, plan_compressed, plan_plain
from imagekit.qcow2write.pieces import BufferPool, Piece, PoolClosed, read_pieces
from imagekit.qcow2write.source import RawSource, Source, allocated_clusters, prefetch, read_clusters

if TYPE_CHECKING:
    import numpy.typing as npt

Progress = Callable[[str, float], None]  # (phase, fraction 0..1)

PIECE = 4 << 20
POOL_BUFFERS = 12
READ_THREADS = 3  # reads in flight from a raw input
HASH_QUEUE = 8  # pieces waiting for each hashing thread
DEFAULT_MEMORY = 1 << 30
_L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


@dataclass(frozen=True)
class WriteOptions:
    """How to write: cluster size, compat (``0.10`` = v2, ``1.1`` = v3), compression (``none``, ``zlib``,
    ``zstd``), compression threads (0: one per CPU), spool memory budget and where it spills."""

    cluster_size: int = 65536
    compat: str = "1.1"
    compression: str = "none"
    level: int | None = None  # compression level; None: compress.default_zlib_level() for zlib, 3 for zstd
    workers: int = 0
    memory: int = DEFAULT_MEMORY
    spill_dir: str | None = None

    def geometry(self, virtual_size: int) -> Geometry:
        cb = self.cluster_size.bit_length() - 1
        if self.cluster_size <= 0 or self.cluster_size != 1 << cb:
            raise LayoutError(f"cluster size {self.cluster_size} is not a power of two", "use 512 bytes to 2M, "
                              "e.g. --cluster-size 64K")
        return Geometry(virtual_size=-(-virtual_size // 512) * 512, cluster_bits=cb,
                        version=2 if self.compat == "0.10" else 3,
                        compression=self.compression if self.compression != "none" else "zlib")


@dataclass
class WriteStats:
    """What the writer did, for reports and tests."""

    allocated_clusters: int = 0
    compressed_clusters: int = 0
    stored_whole: int = 0
    zero_clusters_dropped: int = 0
    spilled_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class Hasher:
    """Digests of every chunk given to :meth:`update`, one thread per algorithm."""

    def __init__(self, algorithms: tuple[str, ...]) -> None:
        self._h = {a: hashlib.new(a) for a in algorithms}
        # bounded: a writer faster than the hash waits instead of queueing copies of the whole output
        self._q: dict[str, queue.Queue[Piece | None]] = {a: queue.Queue(maxsize=HASH_QUEUE) for a in algorithms}
        self._threads = [threading.Thread(target=self._loop, args=(a,), daemon=True, name=f"imagekit-{a}")
                         for a in algorithms]
        for t in self._threads:
            t.start()
        self._done = False

    def _loop(self, algo: str) -> None:
        h, q = self._h[algo], self._q[algo]
        while (piece := q.get()) is not None:
            try:
                h.update(piece.data)
            finally:
                piece.release()

    def update(self, piece: Piece) -> None:
        """Hash ``piece`` (each thread releases it when done; the caller keeps its own reference)."""
        piece.retain(len(self._q))
        for q in self._q.values():
            q.put(piece)

    def close(self) -> None:
        if not self._done:
            self._done = True
            for q in self._q.values():
                q.put(None)
            for t in self._threads:
                t.join()

    def digests(self) -> dict[str, str]:
        self.close()
        return {a: h.hexdigest() for a, h in self._h.items()}


class Prepared:
    """A planned output: its layout and size are known; :meth:`chunks` produces its bytes once."""

    def __init__(self, src: Source, layout: Layout, stats: WriteStats, spool: comp.Spool | None,
                 blobs: list[int] | None) -> None:
        self.src = src
        self.layout = layout
        self.stats = stats
        self._spool = spool
        self._blobs = blobs  # compressed: spool index of each allocated cluster (-1: stored whole)

    @property
    def size(self) -> int:
        return self.layout.file_size

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()

    def chunks(self, progress: Progress | None = None) -> Iterator[Piece]:
        """The output's bytes in order, in pieces of about 4 MiB; the consumer releases each piece."""
        done = 0
        total = self.size or 1
        for piece in self._all():
            done += len(piece)
            if progress is not None:
                progress("write", done / total)
            yield piece

    def _all(self) -> Iterator[Piece]:
        pending = bytearray()
        for part in self.layout.metadata():
            pending += part
            if len(pending) >= PIECE:
                yield Piece(bytes(pending))
                pending = bytearray()
        if pending:
            yield Piece(bytes(pending))
        if self._blobs is None:
            yield from self._plain_data()
        else:
            yield from (Piece(b) for b in self._compressed_data())

    def _plain_data(self) -> Iterator[Piece]:
        pool = BufferPool(POOL_BUFFERS, max(PIECE, self.layout.geo.cs))
        try:
            threads = READ_THREADS if isinstance(self.src, RawSource) else 1
            yield from prefetch(read_pieces(self.src, self.layout.guest, self.layout.geo.cluster_bits, pool, threads),
                                depth=4, on_stop=pool.close)
        except PoolClosed:  # pragma: no cover - only after the consumer stopped
            return
        finally:
            pool.close()

    def _compressed_data(self) -> Iterator[bytes]:
        lay, geo = self.layout, self.layout.geo
        assert self._spool is not None and self._blobs is not None
        pos = lay.data_offset
        buf = bytearray()
        low_mask = (1 << geo.csize_shift) - 1
        for gc, entry, blob in zip(lay.guest.tolist(), lay.entries.tolist(), self._blobs, strict=True):
            if entry & COMPRESSED:
                at, data = entry & low_mask, self._spool.get(blob)
            else:
                at, data = entry & _L2_OFFSET_MASK, self._read_whole(gc)
            gap = at - (pos + len(buf))
            if gap < 0:
                raise AssertionError("compressed runs out of order")
            if gap:
                buf += bytes(gap)
            buf += data
            if len(buf) >= PIECE:
                pos += len(buf)
                yield bytes(buf)
                buf = bytearray()
        tail = lay.file_size - (pos + len(buf))
        buf += bytes(tail)
        if buf:
            yield bytes(buf)

    def _read_whole(self, guest_cluster: int) -> bytes:
        geo = self.layout.geo
        start = guest_cluster << geo.cluster_bits
        have = max(0, min(geo.cs, self.src.size - start))
        data = self.src.read(start, have) if have else b""
        return data + bytes(geo.cs - have) if have < geo.cs else data


def prepare(src: Source, options: WriteOptions, progress: Progress | None = None) -> Prepared:
    """Plan the output of ``src`` (and, compressed, compress every cluster first)."""
    geo = options.geometry(src.size)
    stats = WriteStats()
    t = time.monotonic()
    clusters = allocated_clusters(src.extents(), geo.cluster_bits)
    stats.seconds["map"] = round(time.monotonic() - t, 3)
    if options.compression == "none":
        stats.allocated_clusters = int(clusters.size)
        return Prepared(src, plan_plain(geo, clusters), stats, None, None)
    t = time.monotonic()
    spool = comp.Spool(options.memory, options.spill_dir)
    try:
        guest, sizes, blobs = _compress(src, geo, clusters, options, spool, stats, progress)
        spool.finish()
        stats.seconds["compress"] = round(time.monotonic() - t, 3)
        stats.spilled_bytes = spool.spilled
        layout = plan_compressed(geo, guest, sizes)
    except BaseException:
        spool.close()
        raise
    stats.allocated_clusters = int(guest.size)
    return Prepared(src, layout, stats, spool, blobs)


def _compress(src: Source, geo: Geometry, clusters: npt.NDArray[np.int64], options: WriteOptions,
              spool: comp.Spool, stats: WriteStats,
              progress: Progress | None) -> tuple[npt.NDArray[np.int64], list[int], list[int]]:
    """Compress every allocated cluster: the clusters kept, their run sizes (0: whole), spool indices."""
    workers = options.workers or os.cpu_count() or 1
    pieces = prefetch(read_clusters(src, clusters, geo.cluster_bits), depth=2 * workers)
    kept: list[int] = []
    sizes: list[int] = []
    blobs: list[int] = []
    it = iter(clusters.tolist())
    total = max(1, int(clusters.size))
    done = 0
    for results in comp.compress_all(pieces, geo.cs, options.compression, workers, options.level):
        for run in results:
            gc = next(it)
            if run == b"":
                stats.zero_clusters_dropped += 1
                continue
            kept.append(gc)
            if run is None:
                stats.stored_whole += 1
                sizes.append(0)
                blobs.append(-1)
            else:
                stats.compressed_clusters += 1
                sizes.append(len(run))
                blobs.append(len(spool))
                spool.add(run)
        done += len(results)
        if progress is not None:
            progress("compress", done / total)
    return np.array(kept, dtype=np.int64), sizes, blobs


def write_file(prepared: Prepared, fd: int, algorithms: tuple[str, ...] = ("sha256",),
               progress: Progress | None = None) -> dict[str, str]:
    """Write the output to ``fd`` from its current position; the digests of what was written."""
    hasher = Hasher(algorithms)
    try:
        for piece in prepared.chunks(progress):
            try:
                hasher.update(piece)
                _write_all(fd, piece.data)
            finally:
                piece.release()
    finally:
        hasher.close()
    return hasher.digests()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        view.release()


class StreamBody:
    """The output as an HTTP request body: iterable, sized (Content-Length), hashed as it is sent."""

    def __init__(self, prepared: Prepared, algorithms: tuple[str, ...] = ("sha256", "sha512"),
                 progress: Progress | None = None, tee_fd: int | None = None) -> None:
        self.prepared = prepared
        self.tee_fd = tee_fd  # also written here (the build's output file), before it is sent
        self.size = prepared.size
        self.bytes_sent = 0
        self._hasher = Hasher(algorithms)
        self._progress = progress
        self._started = False

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes | memoryview]:
        if self._started:
            raise RuntimeError("the output can be streamed once")
        self._started = True
        for piece in self.prepared.chunks(self._progress):
            try:
                self._hasher.update(piece)
                if self.tee_fd is not None:
                    _write_all(self.tee_fd, piece.data)
                self.bytes_sent += len(piece)
                yield piece.data  # sent before the next item is asked for
            finally:
                piece.release()

    def digests(self) -> dict[str, str]:
        return self._hasher.digests()

    def close(self) -> None:
        self._hasher.close()
