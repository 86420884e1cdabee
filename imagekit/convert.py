"""Convert any accepted input to a verified image (qcow2 by default).

The path: check the input (an unsafe input is refused before anything opens it
with its format), then write the output into a temporary name next to it:

* qcow2 (without ``preallocation``): imagekit's own writer (:mod:`imagekit.qcow2write`)
  reads the input through a read-only NBD export with the *detected* format
  (raw directly), plans the whole file from the allocation map, writes it in one
  sequential pass and hashes it as it writes. Verification reads no data back:
  imagekit's deep check of the written metadata, ``qemu-img check``, and
  ``qemu-img map`` of the output equal to the planned map (``verify="map"``);
  ``verify="content"`` adds ``qemu-img compare`` with the input;
* other formats: ``qemu-img convert -f DETECTED`` under resource limits and a
  timeout, then the checks, ``qemu-img compare`` and a hash pass.

Only then is the output renamed to the final name. Any failure or interruption
removes the temporary file: nothing half-written ever carries the final name,
and the input is never modified.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imagekit import run as runner
from imagekit.artifact import Artifact, hash_file
from imagekit.check import check
from imagekit.errors import ImagekitError, ImageReadError, OutputExistsError, ToolFailed, UnsafeImageError, UsageError
from imagekit.formats import registry
from imagekit.formats.registry import DiskFormat
from imagekit.verdict import Verdict

log = logging.getLogger("imagekit.convert")

# Kept for importers (pipeline.py): the registry is the table. New code calls registry.output_names()
# and registry.suffix(name).
OUT_FORMATS = registry.output_names()
SUFFIX = {name: registry.suffix(name) for name in OUT_FORMATS}
# builds compress harder than convert's default: zlib-ng's level 9 is as fast as QEMU's zlib level 6 and smaller
BUILD_ZLIB_LEVEL = 9
# qemu-img runs on untrusted input: bound its CPU time and address space
LIMITS = runner.Limits(cpu_seconds=6 * 3600, address_space=4 << 30)
_PROGRESS_RE = re.compile(r"\(\s*([0-9.]+)/100%\)")

Progress = Callable[[str, float], None]  # (phase, fraction 0..1)


@dataclass(frozen=True)
class ConvertOptions:
    out_format: str = "qcow2"
    compat: str = "1.1"
    cluster_size: int | None = None
    compress: str | None = None  # zlib | zstd
    compress_level: int | None = None  # imagekit's writer: None is zlib 7 with zlib-ng (6 without), zstd 3
    preallocation: str | None = None  # off | metadata | falloc | full
    keep_snapshots: bool = False
    force: bool = False
    max_virtual_size: int | None = None
    declared: str | None = None  # the input's declared format: a different detected one is refused
    timeout: float = 6 * 3600
    # "map": deep check + qemu-img check + qemu-img map equal to the plan (qcow2 writer only; no data re-read);
    # "content": also qemu-img compare with the input (always done for qemu-img conversions)
    verify: str = "content"
    writer: str = "auto"  # auto: imagekit's qcow2 writer when it can; qemu-img: always qemu-img convert


@dataclass(frozen=True)
class ConvertResult:
    input: Artifact
    output: Artifact
    input_verdict: Verdict
    output_verdict: Verdict
    qemu_check: str
    compare: str
    notes: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    writer: str = "qemu-img"
    verification: str = "content"
    map_ranges: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "verdict": self.output_verdict.verdict,
            "input_verdict": self.input_verdict.verdict,
            "output_findings": [f.to_dict() for f in self.output_verdict.findings],
            "input_findings": [f.to_dict() for f in self.input_verdict.findings],
            "qemu_img_check": self.qemu_check,
            "compare": self.compare,
            "notes": list(self.notes),
            "seconds": self.seconds,
            "writer": self.writer,
            "verification": self.verification,
            "map_ranges": self.map_ranges,
        }


class InstallerIsoError(ImagekitError):
    """An ISO that cannot boot as a disk was given to convert without --force."""

    exit_code = 2


class DiskFullError(ImagekitError):
    pass


def default_output(src: Path, out_format: str) -> Path:
    ext = registry.suffix(out_format)
    out = src.with_suffix(ext)
    if out == src:
        out = src.with_name(f"{src.stem}-converted{ext}")
    return out


def temp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.imagekit-{os.getpid()}.part")


def _input_format(verdict: Verdict, force: bool, notes: list[str]) -> str:
    """The qemu-img -f name for the checked input; ISO policy applied here."""
    fmt = verdict.format or "raw"
    if fmt == "iso":
        if verdict.detection is not None and verdict.detection.hybrid:
            notes.append("hybrid ISO (it carries a partition table): converted as a bootable disk")
        elif force:
            notes.append("installer-only ISO converted with --force: the result will not boot as a disk")
        else:
            raise InstallerIsoError(
                f"{verdict.path} is an installer ISO without a partition table: it cannot boot as a disk",
                "upload it as it is (imagekit upload --disk-format iso) or use it as install media in a recipe; "
                "--force converts it anyway",
            )
    row = registry.find(fmt)
    if row is None or not row.accepted or row.qemu is None:
        raise UsageError(f"cannot convert from format {fmt!r}")
    return row.qemu


def _convert_options(opts: ConvertOptions, out_fmt: DiskFormat) -> list[str]:
    o: list[str] = []
    if out_fmt.name == "qcow2":
        o.append(f"compat={opts.compat}")
        if opts.cluster_size:
            o.append(f"cluster_size={opts.cluster_size}")
        if opts.compress:
            o.append(f"compression_type={opts.compress}")
    if opts.preallocation:
        o.append(f"preallocation={opts.preallocation}")
    if out_fmt.name == "vmdk":
        o.append("subformat=streamOptimized" if opts.compress else "subformat=monolithicSparse")
    return ["-o", ",".join(o)] if o else []


def _space_error(exc: ToolFailed, out: Path) -> ImagekitError | None:
    text = (exc.output or exc.message).lower()
    if "no space left" in text or "enospc" in text or "disk quota" in text:
        return DiskFullError(
            f"the disk filled up while writing {out}; the partial output was removed",
            f"free space on {out.parent} or write the output elsewhere with -o",
        )
    return None


def _output_path(src: Path, dst: str | os.PathLike[str] | None, opts: ConvertOptions) -> Path:
    """Where the output goes (default: next to the input, the output format's suffix); refuses to overwrite
    the input, an existing file without ``force``, or to write into a missing directory."""
    out = Path(dst) if dst is not None else default_output(src, opts.out_format)
    if out.is_dir():
        out = out / default_output(src, opts.out_format).name
    if out.exists() and out.resolve() == src.resolve():
        raise UsageError("the output would overwrite the input", "choose another -o")
    if out.exists() and not opts.force:
        raise OutputExistsError(f"{out} already exists", "use --force to replace it, or -o for another name")
    if not out.parent.is_dir():
        raise UsageError(f"output directory {out.parent} does not exist")
    return out


def _output_format(opts: ConvertOptions) -> DiskFormat:
    """The output format's row, with the options it allows."""
    out_fmt = registry.output_format(opts.out_format)
    if opts.compress and out_fmt.name != "qcow2":
        raise UsageError("--compress is only possible with -O qcow2")
    if opts.compress == "zstd" and opts.compat == "0.10":
        raise UsageError("zstd compression needs --compat 1.1")
    if opts.compress_level is not None and not 1 <= opts.compress_level <= (9 if opts.compress != "zstd" else 19):
        raise UsageError(f"compression level {opts.compress_level} is out of range", "zlib: 1-9, zstd: 1-19")
    if opts.verify not in ("map", "content"):
        raise UsageError(f"unknown verification {opts.verify!r}", "map or content")
    if opts.writer not in ("auto", "qemu-img"):
        raise UsageError(f"unknown writer {opts.writer!r}", "auto or qemu-img")
    return out_fmt


def uses_writer(opts: ConvertOptions, out_fmt: DiskFormat) -> bool:
    """imagekit's own qcow2 writer does this conversion (else qemu-img convert)."""
    return out_fmt.name == "qcow2" and opts.writer == "auto" and not opts.preallocation and not opts.keep_snapshots


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None,
            opts: ConvertOptions | None = None, progress: Progress | None = None) -> ConvertResult:
    """Check ``src``, convert it to ``opts.out_format``, verify the output and move it to ``dst``."""
    opts = opts or ConvertOptions()
    out_fmt = _output_format(opts)
    src_path = Path(src)
    out = _output_path(src_path, dst, opts)
    seconds: dict[str, float] = {}
    notes: list[str] = []

    t = time.monotonic()
    in_verdict = check(src_path, declared=opts.declared, max_virtual_size=opts.max_virtual_size)
    seconds["check_input"] = round(time.monotonic() - t, 3)
    if not in_verdict.ok:
        raise UnsafeImageError(
            f"{src_path} failed the safety check ({', '.join(in_verdict.codes())}); it was not converted",
            "run 'imagekit check' on it for details; never convert images you cannot trust",
            in_verdict,
        )
    in_fmt = _input_format(in_verdict, opts.force, notes)
    if opts.keep_snapshots and not (in_fmt == "qcow2" and out_fmt.name == "qcow2"):
        raise UsageError("--keep-snapshots needs a qcow2 input and qcow2 output")
    snapshots = in_verdict.format_report.snapshots if in_verdict.format_report is not None else 0
    if snapshots and not opts.keep_snapshots:
        notes.append(f"{snapshots} internal snapshot(s) dropped (use --keep-snapshots to keep them)")

    if uses_writer(opts, out_fmt):
        from imagekit.convert_writer import write_qcow2

        w = write_qcow2(src_path, in_fmt, out, opts, progress, seconds)
        out_verdict, qcheck, cmp, digest = w.verdict, w.qemu_check, w.compare, w.sha256
        extra = {"writer": "imagekit", "verification": opts.verify, "map_ranges": w.map_ranges}
    else:
        out_verdict, qcheck, cmp, digest = _write(src_path, in_fmt, out, out_fmt, opts, progress, seconds)
        extra = {"writer": "qemu-img", "verification": "content", "map_ranges": None}
    in_art = Artifact(str(src_path), in_verdict.format or "raw", int(_vsize(in_verdict) or 0), src_path.stat().st_size)
    compat = out_verdict.format_report.compat if out_verdict.format_report is not None else None
    out_art = Artifact(str(out), out_verdict.format or opts.out_format, int(_vsize(out_verdict) or 0),
                       out.stat().st_size, digest, compat)
    return ConvertResult(in_art, out_art, in_verdict, out_verdict, qcheck, cmp, tuple(notes), seconds,
                         **extra)  # type: ignore[arg-type]


def _write(src: Path, in_fmt: str, out: Path, out_fmt: DiskFormat, opts: ConvertOptions, progress: Progress | None,
           seconds: dict[str, float]) -> tuple[Verdict, str, str, str]:
    """Convert into a temporary name next to ``out``, verify it, then rename it; the temporary file is
    removed on any failure. Returns the output's verdict, qemu-img check and compare results, sha256."""
    tmp = temp_name(out)
    ok = False
    try:
        t = time.monotonic()
        if opts.keep_snapshots:
            _copy_keeping_snapshots(src, tmp, opts)
        else:
            _qemu_img_convert(src, in_fmt, tmp, out, out_fmt, opts, progress)
        seconds["convert"] = round(time.monotonic() - t, 3)
        if progress is not None:
            progress("convert", 1.0)

        t = time.monotonic()
        verified = _verify_output(src, in_fmt, tmp, out_fmt, opts, progress)
        seconds["verify"] = round(time.monotonic() - t, 3)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        ok = True
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"the disk filled up while writing {out}; the partial output was removed",
                                f"free space on {out.parent} or write elsewhere with -o") from exc
        raise ImagekitError(f"conversion failed: {exc}") from exc
    finally:
        if not ok:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    return verified


def _qemu_img_convert(src: Path, in_fmt: str, tmp: Path, out: Path, out_fmt: DiskFormat, opts: ConvertOptions,
                      progress: Progress | None) -> None:
    """``qemu-img convert -f IN -O OUT`` under limits, its progress reported; a full disk is DiskFullError."""
    argv = ["qemu-img", "convert", "-p", "-f", in_fmt, "-O", out_fmt.output_name, *_convert_options(opts, out_fmt)]
    if opts.compress:
        argv.append("-c")
    argv += [str(src), str(tmp)]

    def on_line(line: str) -> None:
        m = _PROGRESS_RE.search(line)
        if m and progress is not None:
            progress("convert", float(m.group(1)) / 100.0)

    try:
        runner.run(argv, timeout=opts.timeout, limits=LIMITS, on_output=on_line)
    except ToolFailed as exc:
        raise (_space_error(exc, out) or exc) from exc


def _vsize(v: Verdict) -> int | None:
    if v.virtual_size is not None:
        return v.virtual_size
    return v.detection.virtual_size if v.detection is not None else None


def _copy_keeping_snapshots(src: Path, tmp: Path, opts: ConvertOptions) -> None:
    """qcow2 -> qcow2 with internal snapshots: copy, then repair leaks and the dirty bit."""
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 8 << 20)
    runner.run(["qemu-img", "check", "-q", "-r", "all", "-f", "qcow2", str(tmp)], timeout=opts.timeout,
               limits=LIMITS, check=False)
    runner.run(["qemu-img", "amend", "-f", "qcow2", "-o", f"compat={opts.compat}", str(tmp)],
               timeout=opts.timeout, limits=LIMITS)


def _verify_output(src: Path, in_fmt: str, tmp: Path, out_fmt: DiskFormat, opts: ConvertOptions,
                   progress: Progress | None) -> tuple[Verdict, str, str, str]:
    """Check the written output, compare it with the input, and hash it (hash runs alongside)."""
    digest: dict[str, str] = {}
    errors: list[BaseException] = []

    def do_hash() -> None:
        try:
            digest.update(hash_file(tmp))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    hasher = threading.Thread(target=do_hash, daemon=True)
    hasher.start()
    try:
        out_verdict = check(tmp, declared=out_fmt.name)
        if not out_verdict.ok:
            raise UnsafeImageError(
                f"the converted output failed imagekit's check ({', '.join(out_verdict.codes())}); it was removed",
                "this is unexpected: report it with the input's 'imagekit inspect --json'",
                out_verdict,
            )
        qcheck = "not applicable"
        if out_fmt.qemu_checkable:
            res = runner.run(["qemu-img", "check", "-q", "-f", out_fmt.output_name, str(tmp)], timeout=opts.timeout,
                             limits=LIMITS, check=False)
            if res.returncode != 0:
                raise ImagekitError(
                    f"qemu-img check found problems in the converted output (exit {res.returncode}); it was removed",
                    (res.stderr or res.stdout).strip()[-500:] or None,
                )
            qcheck = "consistent"
        if progress is not None:
            progress("compare", 0.0)
        cmp_argv = ["qemu-img", "compare", "-f", in_fmt, "-F", out_fmt.output_name, str(src), str(tmp)]
        res = runner.run(cmp_argv, timeout=opts.timeout, limits=LIMITS, check=False)
        if res.returncode == 1:
            raise ImagekitError(f"the converted output differs from the input: {res.stdout.strip()}; it was removed",
                                "the conversion is not trustworthy; try again, and report it if it repeats")
        if res.returncode != 0:
            raise runner.failed(res)
        if progress is not None:
            progress("compare", 1.0)
    finally:
        hasher.join()
    if errors:
        exc = errors[0]
        if isinstance(exc, ImageReadError):
            raise exc
        raise ImagekitError(f"hashing the output failed: {exc}")
    return out_verdict, qcheck, "identical", digest["sha256"]


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
