"""Streaming to Glance: a file read once, or a qcow2 converted on the way; hashed in the same pass.

``HashingReader`` hashes (sha512, md5, ...) exactly the bytes it yields, in one
thread per algorithm, so hashing overlaps with sending; ``body()`` is what
requests sends, with a Content-Length. Used by ``imagekit.glance.upload``.

``upload_converted`` (``imagekit upload --convert``, ``build --upload``) checks an
input, plans its qcow2 with imagekit's writer (:mod:`imagekit.qcow2write`) and sends
the bytes as they are produced (:class:`StreamSource`): no scratch copy of the image,
the plan verified beforehand on a metadata-only sparse skeleton, sha256 and sha512
computed on the bytes sent, Glance's image kept only when its size and hash match.
With ``tee`` the same bytes also go to a local file (the build's output), verified
like ``imagekit convert``'s before Glance's image is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imagekit.errors import ImageReadError

if TYPE_CHECKING:
    from imagekit.cloud import Cloud
    from imagekit.convert import ConvertOptions
    from imagekit.convert_writer import Verified
    from imagekit.glance import UploadOptions, UploadResult
    from imagekit.qcow2write import Prepared, StreamBody, WriteStats

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


# ---------------------------------------------------------------- converting on the way (one pass)


class StreamSource:
    """A qcow2 produced while it is sent (``qcow2write.StreamBody``), with the interface of
    :class:`HashingReader` (``size``, ``body()``, ``digests()``, ``bytes_read``) plus ``finish()``: what must
    hold once every byte went out (the tee'd file verified), before Glance's size and hash are compared."""

    def __init__(self, body: StreamBody, finish: Callable[[], None] | None = None) -> None:
        self._body = body
        self._finish = finish
        self.size = body.size

    @property
    def bytes_read(self) -> int:
        return self._body.bytes_sent

    def body(self, chunk: int = SEND_CHUNK) -> StreamBody:
        return self._body

    def digests(self) -> dict[str, str]:
        return self._body.digests()

    def finish(self) -> None:
        if self._finish is not None:
            self._finish()

    def __enter__(self) -> StreamSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._body.close()


@dataclass(frozen=True)
class ConvertedUpload:
    """A streamed upload: Glance's result, what was written (and where, when tee'd), how it was verified."""

    upload: UploadResult
    input_format: str
    sha256: str
    size: int
    virtual_size: int
    map_ranges: int
    qemu_check: str
    output: str | None
    stats: WriteStats
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        d = self.upload.to_dict()
        d["converted"] = {"input_format": self.input_format, "sha256": self.sha256, "size": self.size,
                          "virtual_size": self.virtual_size, "map_ranges": self.map_ranges,
                          "qemu_img_check": self.qemu_check, "output": self.output,
                          "compressed_clusters": self.stats.compressed_clusters, "seconds": self.seconds}
        return d


def _checked_input(src: Path, conv: ConvertOptions) -> tuple[str, int]:
    """check() the input like convert does; its qemu format and virtual size."""
    from imagekit.check import check
    from imagekit.convert import _input_format
    from imagekit.errors import UnsafeImageError

    v = check(src, declared=conv.declared, max_virtual_size=conv.max_virtual_size)
    if not v.ok:
        raise UnsafeImageError(f"{src} failed the safety check ({', '.join(v.codes())}); nothing was sent",
                               "run 'imagekit check' on it for details", v)
    return _input_format(v, conv.force, []), int(v.virtual_size or 0)


def upload_converted(c: Cloud, src: str | os.PathLike[str], options: UploadOptions, conv: ConvertOptions,
                     progress: Progress | None = None, tee: str | os.PathLike[str] | None = None) -> ConvertedUpload:
    """Check ``src``, convert it to qcow2 with imagekit's writer and send it to Glance as it is produced.

    Without ``tee`` no file of the image's size is written: the plan is verified first on a sparse
    skeleton (metadata only) in a work folder, then the bytes go out hashed (sha256 and sha512); Glance
    keeps the image only if its size and hash match. With ``tee`` the bytes also go to that file
    (through its temporary name), verified like ``imagekit convert`` before Glance's image is kept."""
    from imagekit import convert as convmod
    from imagekit import convert_writer as cw
    from imagekit import glance
    from imagekit.qcow2write import StreamBody, open_source, prepare
    from imagekit.workdir import WorkDir

    src_p = Path(src)
    seconds: dict[str, float] = {}
    t = time.monotonic()
    in_fmt, _vsize = _checked_input(src_p, conv)
    if options.import_method == "web-download":
        from imagekit.errors import UsageError

        raise UsageError("--convert streams the image: web-download cannot be used with it")
    opts = dataclasses.replace(options, name=options.name or (None if options.recipe else f"{src_p.stem}.qcow2"))
    base = glance.plan(None, opts, lint_only=True)
    with WorkDir(prefix="stream-") as work, open_source(src_p, in_fmt, limits=convmod.LIMITS) as source:
        prepared = prepare(source, cw.writer_options(conv, str(work.path)), progress)
        try:
            seconds["prepare"] = round(time.monotonic() - t, 3)
            vsize = prepared.layout.geo.virtual_size
            p = dataclasses.replace(base, disk_format="qcow2", size=prepared.size, virtual_size=vsize,
                                    min_disk=glance.min_disk_gib(vsize), verdict="accept", source=str(src_p))
            sink = _Tee(Path(tee), prepared, conv) if tee is not None else None
            if sink is None:  # verify the plan before the first byte leaves
                skeleton = work.path / "skeleton.qcow2"
                cw.write_skeleton(prepared, skeleton)
                verified = cw.verify_file(skeleton, prepared.layout, conv.timeout)
                skeleton.unlink()
            body = StreamBody(prepared, ("sha256", "sha512"), progress, tee_fd=sink.fd if sink else None)
            t = time.monotonic()
            try:
                res = glance.upload(c, None, opts, progress, plan_=p,
                                    stream=StreamSource(body, sink.finish if sink else None))
            finally:
                if sink is not None:
                    sink.close()
            seconds["stream"] = round(time.monotonic() - t, 3)
            if sink is not None:
                assert sink.verified is not None
                verified = sink.verified
        finally:
            prepared.close()
    digests = body.digests()
    return ConvertedUpload(res, in_fmt, digests["sha256"], prepared.size, vsize, verified.map_ranges,
                           verified.qemu_check, str(tee) if tee is not None else None, prepared.stats, seconds)


class _Tee:
    """The file a streamed upload also writes: its temporary name, verified once complete, then renamed."""

    def __init__(self, out: Path, prepared: Prepared, conv: ConvertOptions) -> None:
        from imagekit.convert import temp_name

        self.out = out
        self.tmp = temp_name(out)
        self.tmp.unlink(missing_ok=True)
        self.prepared = prepared
        self.conv = conv
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.verified: Verified | None = None

    def finish(self) -> None:
        from imagekit import convert_writer as cw

        os.close(self.fd)
        self.fd = -1
        self.verified = cw.verify_file(self.tmp, self.prepared.layout, self.conv.timeout)
        os.replace(self.tmp, self.out)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)
