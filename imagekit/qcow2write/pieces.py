"""Pieces of output shared by the writer and the hashing threads, in reused buffers.

The uncompressed data is read into a small pool of big buffers (allocating a fresh 4 MiB object
per read costs a page fault per 4 KiB). A :class:`Piece` is one buffer's valid bytes plus a count of
the consumers still using it (the writer or HTTP sender, each hashing thread); the last
:meth:`Piece.release` gives the buffer back to its :class:`BufferPool`. Metadata and compressed
data are plain ``bytes`` pieces without a pool.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from imagekit.qcow2write.source import Source


class PoolClosed(Exception):
    """The pool was closed while a reader waited for a buffer (the consumer stopped)."""


class BufferPool:
    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(count):
            self._free.put(bytearray(size))
        self._closed = threading.Event()

    def get(self) -> bytearray:
        while True:
            if self._closed.is_set():
                raise PoolClosed
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def put(self, buf: bytearray) -> None:
        self._free.put(buf)

    def close(self) -> None:
        self._closed.set()


class Piece:
    """``data`` (a memoryview of a pooled buffer, or bytes) and the number of consumers still using it."""

    __slots__ = ("data", "_buf", "_pool", "_refs", "_lock")

    def __init__(self, data: bytes | memoryview, buf: bytearray | None = None, pool: BufferPool | None = None) -> None:
        self.data = data
        self._buf = buf
        self._pool = pool
        self._refs = 1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.data)

    def retain(self, n: int) -> None:
        with self._lock:
            self._refs += n

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last and self._pool is not None and self._buf is not None:
            if isinstance(self.data, memoryview):
                self.data.release()
            self._pool.put(self._buf)
            self._buf = None


def _specs(src: Source, clusters: npt.NDArray[np.int64], cluster_bits: int, piece: int) -> Iterator[tuple[int, int, int]]:
    """(input offset, bytes wanted, bytes inside the input) of each piece, in order."""
    from imagekit.qcow2write.source import runs_of

    cs = 1 << cluster_bits
    per = max(1, piece // cs)
    for first, count in runs_of(clusters):
        for c in range(first, first + count, per):
            n = min(per, first + count - c)
            start = c << cluster_bits
            want = n * cs
            yield start, want, max(0, min(want, src.size - start))


def _fill(src: Source, buf: bytearray, start: int, want: int, have: int) -> None:
    if have:
        src.read_into(buf, start, have)
    if have < want:
        buf[have:want] = bytes(want - have)


def read_pieces(src: Source, clusters: npt.NDArray[np.int64], cluster_bits: int,
                pool: BufferPool, threads: int = 1) -> Iterator[Piece]:
    """The bytes of ``clusters`` in order, as pooled pieces of whole clusters (the tail zero padded).

    ``threads`` > 1 keeps that many reads in flight (a cold disk answers several requests faster than
    one after the other, as qemu-img's parallel requests do); the pieces still come out in order."""
    if threads <= 1:
        for start, want, have in _specs(src, clusters, cluster_bits, pool.size):
            buf = pool.get()
            _fill(src, buf, start, want, have)
            yield Piece(memoryview(buf)[:want], buf, pool)
        return
    inflight: deque[tuple[Future[None], bytearray, int]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imagekit-pread") as ex:
        try:
            for start, want, have in _specs(src, clusters, cluster_bits, pool.size):
                if len(inflight) >= threads:
                    fut, b, w = inflight.popleft()
                    fut.result()
                    yield Piece(memoryview(b)[:w], b, pool)
                buf = pool.get()
                inflight.append((ex.submit(_fill, src, buf, start, want, have), buf, want))
            while inflight:
                fut, b, w = inflight.popleft()
                fut.result()
                yield Piece(memoryview(b)[:w], b, pool)
        finally:
            for fut, _b, _w in inflight:
                fut.cancel()
