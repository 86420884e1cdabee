"""Streaming an image file to Glance: read once, hashed in the same pass, sent in big sized pieces.

``HashingReader`` hashes (sha512, md5, ...) exactly the bytes it yields, in one
thread per algorithm, so hashing overlaps with sending; ``body()`` is what
requests sends, with a Content-Length. Used by ``imagekit.glance.upload``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator

from imagekit.errors import ImageReadError

Progress = Callable[[str, float], None]

CHUNK = 1 << 20
SEND_CHUNK = 4 << 20


class HashingReader:
    """A file-like object that hashes (sha512, md5, ...) exactly the bytes it yields.

    The upload reads the file through it once; ``digests()`` then describe what
    was sent. Each algorithm runs in its own thread (hashlib releases the GIL), fed
    the chunks ``read()`` returns, so hashing overlaps with sending instead of
    delaying it. ``progress(phase, fraction)`` is called as chunks are read.
    """

    QUEUE_CHUNKS = 8

    def __init__(self, path: str | os.PathLike[str], algorithms: tuple[str, ...] = ("sha512",),
                 progress: Progress | None = None, phase: str = "upload") -> None:
        try:
            self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()/context
        except OSError as exc:
            raise ImageReadError(f"cannot read {path}: {exc.strerror}") from exc
        self.path = os.fspath(path)
        self.size = os.fstat(self._f.fileno()).st_size
        self._hashers = {a: hashlib.new(a) for a in algorithms}
        self._queues: dict[str, queue.Queue[bytes | None]] = {
            a: queue.Queue(maxsize=self.QUEUE_CHUNKS) for a in algorithms}
        self._threads = [threading.Thread(target=self._hash_loop, args=(a,), daemon=True,
                                          name=f"imagekit-{a}") for a in algorithms]
        for t in self._threads:
            t.start()
        self._finished = False
        self.bytes_read = 0
        self._progress = progress
        self._phase = phase
        self._last = -1.0
        try:
            os.posix_fadvise(self._f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass

    def _hash_loop(self, algo: str) -> None:
        h, q = self._hashers[algo], self._queues[algo]
        while True:
            chunk = q.get()
            if chunk is None:
                return
            h.update(chunk)

    def read(self, n: int = -1) -> bytes:
        if self._finished:
            return b""
        if n is None or n < 0:
            n = max(self.size - self.bytes_read, CHUNK)
        data = self._f.read(n)
        if data:
            for q in self._queues.values():
                q.put(data)
            self.bytes_read += len(data)
            if self._progress is not None and self.size:
                frac = self.bytes_read / self.size
                if frac - self._last >= 0.002 or frac >= 1.0:
                    self._last = frac
                    self._progress(self._phase, frac)
        return data or b""

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            for q in self._queues.values():
                q.put(None)
            for t in self._threads:
                t.join()

    def digests(self) -> dict[str, str]:
        """The digests of every byte read so far (stops the hashing threads: call it once, at the end)."""
        self._finish()
        return {a: h.hexdigest() for a, h in self._hashers.items()}

    def close(self) -> None:
        self._finish()
        self._f.close()

    def __enter__(self) -> HashingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.size

    def body(self, chunk: int = SEND_CHUNK) -> _Body:
        """An iterable with a length: requests sends it with Content-Length (not chunked) in big pieces."""
        return _Body(self, chunk)


class _Body:
    """What requests/urllib3 send: iterable (no ``read``, so urllib3 does not fall back to 16 KiB reads)
    and sized (so the request has a Content-Length instead of chunked transfer encoding, which the WSGI
    server decodes far more slowly)."""

    def __init__(self, reader: HashingReader, chunk: int) -> None:
        self._reader = reader
        self._chunk = chunk

    def __len__(self) -> int:
        return self._reader.size

    def __iter__(self) -> Iterator[bytes]:
        while True:
            data = self._reader.read(self._chunk)
            if not data:
                return
            yield data
