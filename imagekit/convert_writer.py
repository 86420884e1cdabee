"""qcow2 output through imagekit's own writer, and its verification without reading data back.

``convert()`` calls :func:`write_qcow2` for qcow2 output: the input (already checked) is opened
with its detected format (:func:`imagekit.qcow2write.open_source`), the output planned, written
into the temporary name in one pass and hashed as written (sha256), then verified by
:func:`verify_file`: imagekit's deep check of the written metadata, ``qemu-img check`` and ``qemu-img
map`` equal to the plan run side by side (no data is read); ``verify="content"`` adds ``qemu-img
compare`` with the input. A disk without room for the planned size is refused before writing.

:func:`write_skeleton` writes only the metadata of a planned output into a sparse file of the
output's size (data areas are holes): the streaming upload verifies the plan on it before the first
byte leaves, without a file of the image's size on disk.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagekit import run as runner
from imagekit.check import check
from imagekit.errors import ImagekitError, UnsafeImageError
from imagekit.qcow2write import Layout, Prepared, WriteOptions, open_source, prepare, verify_map, write_file
from imagekit.verdict import Verdict

if TYPE_CHECKING:
    from imagekit.convert import ConvertOptions

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class Verified:
    verdict: Verdict
    qemu_check: str
    compare: str
    map_ranges: int


@dataclass(frozen=True)
class Written(Verified):
    sha256: str
    size: int


def writer_options(opts: ConvertOptions, spill_dir: str | None = None) -> WriteOptions:
    return WriteOptions(cluster_size=opts.cluster_size or 65536, compat=opts.compat,
                        compression=opts.compress or "none", level=opts.compress_level, spill_dir=spill_dir)


def _limits() -> runner.Limits:
    from imagekit.convert import LIMITS

    return LIMITS


def _in_parallel(*jobs: Callable[[], Any]) -> list[Any]:
    """Run the jobs in threads (the first in this one); results in order. If jobs fail, the error of the
    first failing job in argument order is raised, whichever failed first in time, so that the verdict
    (and exit code) does not depend on thread timing."""
    results: list[Any] = [None] * len(jobs)
    failures: list[BaseException | None] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failures[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, len(jobs))]
    for t in threads:
        t.start()
    try:
        run(0)
    finally:
        for t in threads:
            t.join()
    first = next((e for e in failures if e is not None), None)
    if first is not None:
        raise first
    return results


def _qemu_check(path: Path, timeout: float) -> str:
    res = runner.run(["qemu-img", "check", "-q", "-f", "qcow2", str(path)], timeout=timeout, limits=_limits(),
                     check=False)
    if res.returncode != 0:
        raise ImagekitError(f"qemu-img check found problems in the written qcow2 (exit {res.returncode}); "
                            "it was not kept", (res.stderr or res.stdout).strip()[-500:] or None)
    return "consistent"


def _deep_check(path: Path) -> Verdict:
    v = check(path, declared="qcow2")
    if not v.ok:
        raise UnsafeImageError(
            f"the written qcow2 failed imagekit's check ({', '.join(v.codes())}); it was not kept",
            "this is unexpected: report it with the input's 'imagekit inspect --json'", v)
    return v


def verify_file(path: Path, layout: Layout, timeout: float) -> Verified:
    """Deep check, ``qemu-img check`` and ``qemu-img map`` against the plan, side by side."""
    verdict, qcheck, ranges = _in_parallel(lambda: _deep_check(path), lambda: _qemu_check(path, timeout),
                                           lambda: verify_map(path, layout, timeout, _limits()))
    return Verified(verdict, qcheck, "map-as-planned", ranges)


def compare_content(src: Path, in_fmt: str, out: Path, timeout: float) -> str:
    res = runner.run(["qemu-img", "compare", "-f", in_fmt, "-F", "qcow2", str(src), str(out)], timeout=timeout,
                     limits=_limits(), check=False)
    if res.returncode == 1:
        raise ImagekitError(f"the converted output differs from the input: {res.stdout.strip()}; it was removed",
                            "the conversion is not trustworthy; try again, and report it if it repeats")
    if res.returncode != 0:
        raise runner.failed(res)
    return "identical"


def _check_space(directory: Path, size: int) -> None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if size > free:
        from imagekit.convert import DiskFullError

        raise DiskFullError(f"the output needs {size} bytes but {directory} has {free} free; nothing was written "
                            "(the disk filled up otherwise)", f"free space on {directory} or write elsewhere with -o")


def write_skeleton(prepared: Prepared, path: Path) -> None:
    """The planned file's metadata, its data areas left as holes (a sparse file of the output's size)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for part in prepared.layout.metadata():
            os.write(fd, part)
        os.ftruncate(fd, prepared.size)
    finally:
        os.close(fd)


def write_qcow2(src: Path, in_fmt: str, out: Path, opts: ConvertOptions, progress: Progress | None,
                seconds: dict[str, float]) -> Written:
    """Write ``src`` as qcow2 into ``out``'s temporary name, verify it, rename it (see the module doc)."""
    from imagekit.convert import DiskFullError, temp_name

    tmp = temp_name(out)
    tmp.unlink(missing_ok=True)  # a leftover of an earlier run with this PID
    ok = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            t = time.monotonic()
            with open_source(src, in_fmt, limits=_limits()) as source:
                prepared = prepare(source, writer_options(opts, str(out.parent)), progress)
                try:
                    _check_space(out.parent, prepared.size)
                    digests = write_file(prepared, fd, ("sha256",), progress)
                finally:
                    prepared.close()
        finally:
            os.close(fd)
        seconds["convert"] = round(time.monotonic() - t, 3)
        if progress is not None:
            progress("convert", 1.0)
        t = time.monotonic()
        v = verify_file(tmp, prepared.layout, opts.timeout)
        compare = v.compare
        if opts.verify == "content":
            if progress is not None:
                progress("compare", 0.0)
            compare = compare_content(src, in_fmt, tmp, opts.timeout)
        seconds["verify"] = round(time.monotonic() - t, 3)
        os.replace(tmp, out)
        ok = True
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"the disk filled up while writing {out}; the partial output was removed",
                                f"free space on {out.parent} or write elsewhere with -o") from exc
        raise ImagekitError(f"conversion failed: {exc}") from exc
    finally:
        if not ok:
            tmp.unlink(missing_ok=True)
    return Written(v.verdict, v.qemu_check, compare, v.map_ranges, digests["sha256"], prepared.size)
