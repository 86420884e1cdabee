"""Cluster compression as QEMU does it, in parallel workers, and the spool that holds the result.

* zlib: raw deflate (``wbits=-12``, ``memLevel`` 9, the default level and strategy) of the whole
  cluster, the parameters of ``qcow2_zlib_compress`` in QEMU's ``block/qcow2-threads.c``. With the
  ``zlib-ng`` package installed its deflate does it (the stream is plain raw deflate within a 4 KiB
  window, which QEMU's ``inflateInit2(-12)`` reads); without it, Python's zlib. Measured on the
  debian-12 image's clusters, against zlib's level 6 (QEMU's): zlib-ng's level 6 is 2.8x as fast and
  2.0% larger, its 7 (the default) 1.7x as fast and 1.7% larger, its 9 as fast and 0.5% smaller
  (builds use 9);
* zstd: one zstd frame of the whole cluster at zstd's default level (``qcow2_zstd_compress``),
  through the system's ``libzstd.so.1`` (the library QEMU itself links; ctypes releases the GIL
  during the call, as zlib does).

A cluster whose compressed form is not smaller than ``cluster_size - 1`` bytes is stored whole, as
QEMU stores it; an all-zero cluster is not stored at all. :func:`compress_all` runs the codec on
``workers`` threads over the input pieces, keeping the order (the output is the same whatever the
number of workers). :class:`Spool` keeps the compressed runs in memory up to a budget and in an
unlinked temporary file past it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

from imagekit.errors import ImagekitError, ToolNotFound

ZLIB_WBITS = -12
ZLIB_MEMLEVEL = 9
ZLIB_LEVEL = 6  # Z_DEFAULT_COMPRESSION, QEMU's
ZLIB_NG_LEVEL = 7
ZSTD_LEVEL = 3  # ZSTD_CLEVEL_DEFAULT, QEMU's

Codec = Callable[[bytes], bytes]


class CompressError(ImagekitError):
    code = "compression-failed"


def deflate_module() -> Any:
    """zlib-ng's zlib-compatible module when installed (faster), else Python's zlib."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return zlib
    return zlib_ng


def zlib_codec(cluster_size: int, level: int = ZLIB_LEVEL) -> Codec:
    z = deflate_module()

    def compress(data: bytes) -> bytes:
        c = z.compressobj(level, z.DEFLATED, ZLIB_WBITS, ZLIB_MEMLEVEL, z.Z_DEFAULT_STRATEGY)
        return bytes(c.compress(data) + c.flush(z.Z_FINISH))

    return compress


class _Zstd:
    """The three calls of libzstd imagekit needs, one compression context per thread."""

    _lib: ctypes.CDLL | None = None

    def __init__(self, cluster_size: int, level: int = ZSTD_LEVEL) -> None:
        self.lib = self.load()
        self.level = level
        self.cs = cluster_size
        self.bound = int(self.lib.ZSTD_compressBound(cluster_size))
        self.local = threading.local()

    @classmethod
    def load(cls) -> ctypes.CDLL:
        if cls._lib is None:
            name = ctypes.util.find_library("zstd") or "libzstd.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError as exc:
                raise ToolNotFound("zstd compression needs libzstd (libzstd.so.1)",
                                   "install the Debian package libzstd1 ('make setup' does)") from exc
            lib.ZSTD_createCCtx.restype = ctypes.c_void_p
            lib.ZSTD_compressCCtx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                                              ctypes.c_size_t, ctypes.c_int]
            lib.ZSTD_compressCCtx.restype = ctypes.c_size_t
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
            lib.ZSTD_isError.restype = ctypes.c_uint
            lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
            lib.ZSTD_compressBound.restype = ctypes.c_size_t
            cls._lib = lib
        return cls._lib

    def __call__(self, data: bytes) -> bytes:
        st = self.local
        if not hasattr(st, "ctx"):
            st.ctx = self.lib.ZSTD_createCCtx()
            st.buf = ctypes.create_string_buffer(self.bound)
        src = data if isinstance(data, bytes) else bytes(data)
        n = self.lib.ZSTD_compressCCtx(st.ctx, st.buf, self.bound, src, len(src), self.level)
        if self.lib.ZSTD_isError(n):
            raise CompressError("zstd failed to compress a cluster")
        return st.buf.raw[:n]


def default_zlib_level() -> int:
    """QEMU's level 6 with Python's zlib (the very bytes QEMU writes); 7 with zlib-ng, whose level 6 is 2%
    larger than zlib's on disk images (7: 1.7% larger, still 1.7x as fast as zlib's 6)."""
    return ZLIB_LEVEL if deflate_module() is zlib else ZLIB_NG_LEVEL


def codec(name: str, cluster_size: int, level: int | None = None) -> Codec:
    """The cluster compressor; ``level`` None: zlib :func:`default_zlib_level`, zstd 3 (QEMU's)."""
    if name == "zlib":
        return zlib_codec(cluster_size, default_zlib_level() if level is None else level)
    if name == "zstd":
        return _Zstd(cluster_size, ZSTD_LEVEL if level is None else level)
    raise ValueError(f"unknown compression {name!r}")


def _compress_piece(compress: Codec, piece: bytes, cs: int, zero: bytes) -> list[bytes | None]:
    """Each cluster of ``piece``: its compressed run, ``b""`` when it is all zero, None when stored whole."""
    out: list[bytes | None] = []
    for i in range(0, len(piece), cs):
        cl = piece[i:i + cs]
        if cl == zero:
            out.append(b"")
            continue
        z = compress(cl)
        out.append(z if len(z) < cs else None)
    return out


def compress_all(pieces: Iterator[bytes], cluster_size: int, name: str, workers: int,
                 level: int | None = None) -> Iterator[list[bytes | None]]:
    """Compress every cluster of every piece on ``workers`` threads; results in input order, one list per piece."""
    compress = codec(name, cluster_size, level)
    zero = bytes(cluster_size)
    inflight: deque[Future[list[bytes | None]]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="imagekit-compress") as pool:
        try:
            for piece in pieces:
                inflight.append(pool.submit(_compress_piece, compress, piece, cluster_size, zero))
                while len(inflight) > 2 * workers:
                    yield inflight.popleft().result()
            while inflight:
                yield inflight.popleft().result()
        finally:
            for f in inflight:
                f.cancel()


class Spool:
    """Compressed runs in order: in memory up to ``budget`` bytes, then in an unlinked temporary file."""

    def __init__(self, budget: int, spill_dir: str | os.PathLike[str] | None = None) -> None:
        self.budget = budget
        self.spill_dir = spill_dir
        self.in_memory = 0
        self.spilled = 0
        self._items: list[bytes | tuple[int, int]] = []
        self._file: IO[bytes] | None = None

    def add(self, run: bytes) -> None:
        if self.in_memory + len(run) <= self.budget:
            self._items.append(run)
            self.in_memory += len(run)
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir, prefix=".imagekit-spool-")  # noqa: SIM115
        pos = self.spilled
        self._file.write(run)
        self._items.append((pos, len(run)))
        self.spilled += len(run)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, i: int) -> bytes:
        item = self._items[i]
        if isinstance(item, bytes):
            return item
        assert self._file is not None
        pos, n = item
        return os.pread(self._file.fileno(), n, pos)

    def finish(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        self._items = []
        if self._file is not None:
            self._file.close()
            self._file = None
