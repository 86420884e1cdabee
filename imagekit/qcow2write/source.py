"""The writer's input: a read-only NBD export of the checked input, read with libnbd.

:class:`NbdSource` starts ``qemu-nbd`` through :class:`imagekit.process.Process` in a
:class:`imagekit.workdir.WorkDir` (so a SIGKILLed run's server is found and ended by the next
``workdir.reap_stale``), under the same resource limits as qemu-img (``prlimit``: CPU seconds and
address space), read-only, with the input's *explicit* format in a block-device spec imagekit
builds itself (the file named by ``file.filename``, never parsed as a protocol; ``backing: null``
for formats that could name one), over a unix socket in the work folder. ``--persistent --shared=N`` lets
several connections read in parallel.

:meth:`NbdSource.extents` is the ``base:allocation`` block status (requests below 4 GiB: libnbd
1.14's limit), so holes and zeroes are never read; :meth:`NbdSource.read` reads at most 32 MiB per
request (the export's maximum). :func:`allocated_clusters` turns the extents into the output's
allocated clusters and :func:`read_clusters` reads exactly those, cluster aligned and zero padded
at the end of the image, in guest order. ``prefetch`` runs such an iterator ahead in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from imagekit.errors import ImagekitError, ImageReadError, ToolNotFound
from imagekit.process import Process
from imagekit.run import Limits
from imagekit.workdir import WorkDir, short_root

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger("imagekit.qcow2write")

EXPORT = "disk"
MAX_REQUEST = 32 << 20  # the export's block_size_maximum
STATUS_REQUEST = 1 << 31  # libnbd 1.14: the count is 32-bit
READ_PIECE = 4 << 20
READY_TIMEOUT = 15.0
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes
_BACKING_FORMATS = ("qcow2", "vmdk", "qed", "qcow")
T = TypeVar("T")


class NbdError(ImagekitError):
    """The NBD export of the input could not be started or read."""

    code = "nbd-failed"


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    zero: bool  # reads as zeroes: never read, never allocated in the output


def block_spec(path: Path, fmt: str) -> str:
    """The block-device spec for ``path`` in format ``fmt`` (qemu's name): read-only, the file driver (the
    name is never parsed as a protocol), no backing file. Built with ``json.dumps``, so whatever the file is
    called it stays one JSON string (it is the only way to say ``backing: null`` on qemu-nbd's command line)."""
    spec: dict[str, Any] = {"driver": fmt, "read-only": True,
                            "file": {"driver": "file", "filename": str(path.resolve())}}
    if fmt in _BACKING_FORMATS:
        spec["backing"] = None
    return "json:" + json.dumps(spec)


def _nbd_module() -> Any:
    try:
        import nbd
    except ImportError as exc:  # pragma: no cover - make setup installs it
        raise ToolNotFound("libnbd's Python binding (nbd) is not importable",
                           "run 'make setup' (it installs python3-libnbd and links it into the venv)") from exc
    return nbd


class NbdSource:
    """A read-only NBD export of ``path`` (qemu format ``fmt``); a context manager (see module doc)."""

    def __init__(self, path: str | os.PathLike[str], fmt: str, *, limits: Limits | None = None,
                 connections: int = 2, work_base: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.limits = limits
        self.connections = max(1, connections)
        self.work_base = work_base
        self.size = 0
        self._nbd = _nbd_module()
        self._work: WorkDir | None = None
        self._proc: Process | None = None
        self._sock = ""
        self._handles: list[Any] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------ start / stop

    def __enter__(self) -> NbdSource:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _argv(self) -> list[str]:
        argv = ["qemu-nbd", "--read-only", "--persistent", f"--shared={self.connections + 1}",
                f"--socket={self._sock}", f"--export-name={EXPORT}", block_spec(self.path, self.fmt)]
        if self.limits is not None:
            lim = ["prlimit"]
            if self.limits.address_space is not None:
                lim.append(f"--as={self.limits.address_space}")
            if self.limits.cpu_seconds is not None:
                lim.append(f"--cpu={self.limits.cpu_seconds}")
            argv = [*lim, "--", *argv]
        return argv

    def _start(self) -> None:
        self._work = WorkDir(prefix="nbd-", base=self.work_base)
        self._sock = str(self._work.path / "nbd.sock")
        if len(self._sock) > SOCKET_PATH_MAX:  # a deep cache folder (CI runners): a short one for the socket
            self._work.cleanup()
            self._work = WorkDir(prefix="nbd-", base=short_root())
            self._sock = str(self._work.path / "nbd.sock")
        if len(self._sock) > SOCKET_PATH_MAX:
            raise NbdError(f"the work folder's path is too long for a unix socket: {self._work.path}",
                           "set TMPDIR to a shorter path")
        self._proc = Process(self._argv(), log_path=self._work.path / "qemu-nbd.log", env=self._work.env(),
                             stop_timeout=5.0).start()
        self._wait_ready()
        try:
            h = self.connect()
        except NbdError:
            if self._proc.wait(2.0) is not None:  # it exited: say why
                self._died()
            raise
        self.size = int(h.get_size())

    def _died(self) -> None:
        assert self._proc is not None
        raise NbdError(f"qemu-nbd could not open {self.path} as {self.fmt}: {self._proc.log_tail(5)}",
                       "the input changed after it was checked, or it is damaged")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._died()
            if os.path.exists(self._sock):
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(self._sock)
                        return
                    except OSError:
                        pass
            time.sleep(0.005)
        raise NbdError(f"qemu-nbd did not start within {READY_TIMEOUT:g} s", self._proc.log_tail(5) or None)

    def connect(self) -> Any:
        """A new connection to the export (one per reading thread)."""
        nbd = self._nbd
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.set_export_name(EXPORT)
        try:
            h.connect_unix(self._sock)
        except nbd.Error as exc:
            raise NbdError(f"cannot connect to the NBD export of {self.path}: {exc}") from exc
        with self._lock:
            self._handles.append(h)
        return h

    def close(self) -> None:
        for h in self._handles:
            try:
                h.shutdown()
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
        self._handles = []
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
        if self._work is not None:
            self._work.cleanup()
            self._work = None

    # ------------------------------------------------------------ reading

    def extents(self) -> list[Extent]:
        """The input's allocation map (``base:allocation``), covering [0, size)."""
        nbd = self._nbd
        h = self._handles[0]
        out: list[Extent] = []
        off = 0
        while off < self.size:
            got: list[tuple[int, int]] = []

            def cb(_ctx: str, _off: int, entries: list[int], _err: Any, got: list[tuple[int, int]] = got) -> int:
                got.extend(zip(entries[0::2], entries[1::2], strict=False))
                return 0

            try:
                h.block_status(min(STATUS_REQUEST, self.size - off), off, cb)
            except nbd.Error as exc:
                raise ImageReadError(f"cannot read the allocation map of {self.path}: {exc}") from exc
            if not got:
                raise ImageReadError(f"the NBD server returned no allocation map for {self.path} at {off}")
            for length, flags in got:
                length = min(int(length), self.size - off)
                if length <= 0:
                    break
                zero = bool(flags & nbd.STATE_ZERO)
                if out and out[-1].zero == zero and out[-1].offset + out[-1].length == off:
                    out[-1] = Extent(out[-1].offset, out[-1].length + length, zero)
                else:
                    out.append(Extent(off, length, zero))
                off += length
                if off >= self.size:
                    break
        return out

    def read(self, offset: int, length: int, handle: Any = None) -> bytes:
        """``length`` bytes at ``offset`` (inside the export), in requests of at most 32 MiB."""
        h = handle if handle is not None else self._handles[0]
        parts = []
        try:
            while length > 0:
                n = min(length, MAX_REQUEST)
                parts.append(h.pread(n, offset))
                offset += n
                length -= n
        except self._nbd.Error as exc:
            raise ImageReadError(f"cannot read {self.path} at offset {offset}: {exc}") from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_into(self, buf: bytearray, offset: int, length: int) -> None:
        buf[:length] = self.read(offset, length)


class Source(Protocol):
    """What the writer reads: a size, an allocation map, bytes at an offset."""

    path: Path
    size: int

    def extents(self) -> list[Extent]: ...

    def read(self, offset: int, length: int, handle: Any = None) -> bytes: ...

    def read_into(self, buf: bytearray, offset: int, length: int) -> None: ...


class RawSource:
    """A raw input read directly (``pread``; map from ``SEEK_DATA``/``SEEK_HOLE``, as QEMU's file driver
    finds it): raw has no metadata for qemu-nbd to interpret, and skipping the socket saves a copy of
    every byte. A context manager, like :class:`NbdSource`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageReadError(f"cannot open {self.path}: {exc.strerror}") from exc
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def __enter__(self) -> RawSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def extents(self) -> list[Extent]:
        out: list[Extent] = []
        off = 0
        try:
            while off < self.size:
                try:
                    data = os.lseek(self._fd, off, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = self.size
                if data > off:
                    out.append(Extent(off, min(data, self.size) - off, True))
                if data >= self.size:
                    break
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), self.size)
                out.append(Extent(data, hole - data, False))
                off = hole
        except OSError as exc:
            raise ImageReadError(f"cannot read the allocation map of {self.path}: {exc.strerror}") from exc
        return out

    def read_into(self, buf: bytearray, offset: int, length: int) -> None:
        view = memoryview(buf)
        done = 0
        try:
            while done < length:
                n = os.preadv(self._fd, [view[done:length]], offset + done)
                if n == 0:
                    raise ImageReadError(f"{self.path} ended at {offset + done} while it was read (it shrank)")
                done += n
        except OSError as exc:
            raise ImageReadError(f"cannot read {self.path} at offset {offset + done}: {exc.strerror}") from exc
        finally:
            view.release()

    def read(self, offset: int, length: int, handle: Any = None) -> bytes:
        buf = bytearray(length)
        self.read_into(buf, offset, length)
        return bytes(buf)


def allocated_clusters(extents: list[Extent], cluster_bits: int) -> npt.NDArray[np.int64]:
    """The output clusters that hold any byte of a non-zero extent, ascending."""
    marks: list[npt.NDArray[np.int64]] = []
    for e in extents:
        if e.zero or e.length <= 0:
            continue
        first = e.offset >> cluster_bits
        last = (e.offset + e.length - 1) >> cluster_bits
        marks.append(np.arange(first, last + 1, dtype=np.int64))
    if not marks:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate(marks))


def runs_of(clusters: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """(first cluster, count) of each run of consecutive clusters."""
    if clusters.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(clusters) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [clusters.size]))
    return [(int(clusters[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def read_clusters(src: Source, clusters: npt.NDArray[np.int64], cluster_bits: int,
                  piece: int = READ_PIECE, handle: Any = None) -> Iterator[bytes]:
    """The bytes of ``clusters`` in order, in pieces of whole clusters (the image's tail padded with zeroes)."""
    cs = 1 << cluster_bits
    per = max(1, piece // cs)
    for first, count in runs_of(clusters):
        for c in range(first, first + count, per):
            n = min(per, first + count - c)
            start = c << cluster_bits
            want = n * cs
            have = max(0, min(want, src.size - start))
            data = src.read(start, have, handle) if have else b""
            if have < want:
                data += bytes(want - have)
            yield data


_DONE = object()


def prefetch(it: Iterator[T], depth: int = 4, on_stop: Callable[[], None] | None = None) -> Iterator[T]:
    """Run ``it`` in a thread, ``depth`` items ahead; its exception is raised in the consumer.

    ``on_stop`` is called when the consumer stops early, before waiting for the thread (to unblock it)."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    t = threading.Thread(target=run, daemon=True, name="imagekit-read")
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def open_source(path: str | os.PathLike[str], fmt: str, *, limits: Limits | None = None, nbd: bool = False,
                work_base: str | os.PathLike[str] | None = None) -> RawSource | NbdSource:
    """The writer's input for ``path`` in qemu format ``fmt``: raw read directly (unless ``nbd``), every
    other format through qemu-nbd. Use it as a context manager."""
    if fmt == "raw" and not nbd:
        return RawSource(path)
    return NbdSource(path, fmt, limits=limits, work_base=work_base)
