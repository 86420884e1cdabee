"""Artifacts: image files imagekit produced or consumed, with their digest."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from imagekit.errors import ImageReadError

CHUNK = 4 << 20


@dataclass(frozen=True)
class Artifact:
    path: str
    format: str
    virtual_size: int
    size: int  # bytes in the file
    sha256: str | None = None
    compat: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def hash_file(path: str | os.PathLike[str], algorithms: tuple[str, ...] = ("sha256",),
              progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Digests of a file in one read pass.

    A reader thread fills buffers while this thread hashes (both release the GIL),
    so reading and hashing overlap: hashing is CPU-bound, reading I/O-bound.
    """
    hashers = {name: hashlib.new(name) for name in algorithms}
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {exc.strerror}") from exc
    full: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue(maxsize=2)
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(3):
        free.put(bytearray(CHUNK))
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                buf = free.get()
                n = os.readv(fd, [buf])
                if n == 0:
                    full.put(None)
                    return
                full.put((buf, n))
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread
            full.put(exc)

    try:
        total = os.fstat(fd).st_size
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        done = 0
        try:
            while True:
                item = full.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, OSError):
                        raise ImageReadError(f"error reading {path}: {item.strerror}") from item
                    raise item
                buf, n = item
                chunk = memoryview(buf)[:n]
                for h in hashers.values():
                    h.update(chunk)
                chunk.release()
                free.put(buf)
                done += n
                if progress is not None:
                    progress(done, total)
        finally:
            stop.set()
            free.put(bytearray(0))  # unblock the reader if it waits for a buffer
            thread.join()
    finally:
        os.close(fd)
    return {name: h.hexdigest() for name, h in hashers.items()}


def file_size(path: str | os.PathLike[str]) -> int:
    return Path(path).stat().st_size
