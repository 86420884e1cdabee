"""Safe, content-based format detection (never trusts the file name).

All of oslo.utils' format inspectors (the detector Glance, Nova and Cinder use)
run over the same bounded prefix of the file at once, and a magic-number sniff
catches what they miss (files shorter than their capture regions, qcow v1, VMDK3,
text VMDK descriptors without ``createType``, formats QEMU probes but oslo does
not know). A file that more than one format claims is a polyglot and is refused
(an attacker hides one header inside another), except an ISO 9660 image that also
carries an MBR/GPT: a hybrid ISO, which is a legitimate and common layout.

Also home of the small bounded-read helpers the format verifiers share.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import stat
import struct
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagekit.errors import ImageReadError
from imagekit.formats import registry
from imagekit.formats.base import FormatReport, report
from imagekit.verdict import Finding


def _import_format_inspector() -> types.ModuleType:
    """oslo.utils' ``format_inspector``, imported without running ``oslo_utils.imageutils/__init__``.

    That ``__init__`` imports the qemu-img output parser and, through it,
    ``oslo_utils.strutils``, which compiles its password-masking regexes at import:
    about 60 ms that every ``imagekit check`` would pay for nothing. The package is
    stood in for by a bare module with the same ``__path__`` while the submodule
    loads, then removed, so a later ``import oslo_utils.imageutils`` runs the real one.
    """
    name, pkg = "oslo_utils.imageutils.format_inspector", "oslo_utils.imageutils"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(pkg) if pkg not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        return importlib.import_module(name)
    stub = types.ModuleType(pkg)
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules[pkg] = stub
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get(pkg) is stub:
            del sys.modules[pkg]


if TYPE_CHECKING:
    from oslo_utils.imageutils import format_inspector as fi
else:
    fi = _import_format_inspector()

VerifyResult = tuple[dict[str, object], tuple[Finding, ...]]

# oslo logs every failed check at WARNING; without this an application that has not
# configured logging would get them printed on stderr by logging's last resort.
logging.getLogger(fi.__name__).addHandler(logging.NullHandler())

QCOW_MAGIC = b"QFI\xfb"
HEAD_LIMIT = 64 * 1024 * 1024  # most bytes read from the start of a file to detect/inspect it
TAIL_LIMIT = 64 * 1024  # most bytes read from the end (footers)
CHUNK = 256 * 1024

# Magic numbers QEMU probes for (block/*.c ``*_probe``), checked at offset 0.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (QCOW_MAGIC, "qcow2"),  # refined to qcow (v1) by the version field
    (b"QED\x00", "qed"),
    (b"KDMV", "vmdk"),
    (b"COWD", "vmdk"),  # VMDK3
    (b"conectix", "vhd"),
    (b"vhdxfile", "vhdx"),
    (b"LUKS\xba\xbe", "luks"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
)


# ---------------------------------------------------------------- bounded reads


def read_at(fd: int, offset: int, length: int) -> bytes:
    """Read up to ``length`` bytes at ``offset`` (may return fewer at EOF)."""
    if offset < 0 or length < 0:
        return b""
    out = bytearray()
    while len(out) < length:
        chunk = os.pread(fd, min(length - len(out), 4 * 1024 * 1024), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_exact(fd: int, offset: int, length: int) -> bytes | None:
    """Read exactly ``length`` bytes at ``offset``; None on a short read (never zero-filled)."""
    data = read_at(fd, offset, length)
    return data if len(data) == length else None


def open_image(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open an image read-only, with a clear error for missing/directory/unreadable paths."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {p}", "check the path (and that the disk is mounted)") from None
    except OSError as e:
        raise ImageReadError(f"cannot stat image {p}: {e.strerror}", "check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"{p} is a directory, not a disk image file", "pass the path of the image file itself")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{p} is not a regular file (device, FIFO or socket)",
                             "copy the image into a regular file first (e.g. 'qemu-img convert' or 'dd')")
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise ImageReadError(f"image is not readable: {p}", "check the file permissions (or run as a user that can read it)") from None
    except OSError as e:
        raise ImageReadError(f"cannot open image {p}: {e.strerror}", "check the path and its permissions") from None
    return fd, st


# ---------------------------------------------------------------- VHD footer sniff


def verify_file(path: str | os.PathLike[str], verify_fd: Callable[..., VerifyResult], *args: object) -> FormatReport:
    """Open ``path`` (regular files only), run a format's ``verify_fd(fd, size, *args)`` (which returns its
    info mapping and findings), always close it; the result as a FormatReport."""
    fd, st = open_image(path)
    try:
        info, findings = verify_fd(fd, st.st_size, *args)
    finally:
        os.close(fd)
    return report(info, findings)


def vhd_checksum(buf: bytes, csum_offset: int) -> int:
    """VHD one's-complement checksum of ``buf`` with the 4-byte checksum field zeroed."""
    total = sum(buf) - sum(buf[csum_offset:csum_offset + 4])
    return (~total) & 0xFFFFFFFF


def looks_like_vhd_footer(buf: bytes) -> bool:
    """True for a 512-byte block that is a valid VHD footer (cookie and checksum)."""
    if len(buf) < 512 or not buf.startswith(b"conectix"):
        return False
    (stored,) = struct.unpack_from(">I", buf, 64)
    return stored == vhd_checksum(buf[:512], 64)


# ---------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    """What a file is, by content. ``format`` uses imagekit names; ``qemu_format`` is the ``-f`` name."""

    format: str
    qemu_format: str | None
    matches: tuple[str, ...]
    virtual_size: int | None
    actual_size: int  # allocated bytes (st_blocks * 512)
    file_size: int
    oslo_format: str | None = None  # what oslo's detector alone said (None: polyglot/error)
    subformat: str | None = None
    hybrid: bool = False
    partition_table: str | None = None  # "gpt", "mbr" or None
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def polyglot(self) -> bool:
        return self.format == "polyglot"

    def to_dict(self) -> dict[str, object]:
        return {
            "format": self.format,
            "qemu_format": self.qemu_format,
            "matches": list(self.matches),
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "file_size": self.file_size,
            "oslo_format": self.oslo_format,
            "subformat": self.subformat,
            "hybrid": self.hybrid,
            "partition_table": self.partition_table,
            "findings": [f.to_dict() for f in self.findings],
        }


def _regions_done(insp: fi.FileInspector) -> bool:
    """All ordinary capture regions complete (end-of-file regions need EOF, not more head)."""
    for name in insp.context_info:
        region = insp.region(name)
        if not isinstance(region, fi.EndCaptureRegion) and not region.complete:
            return False
    return True


def _feed(inspectors: list[fi.FileInspector], fd: int, size: int, head_limit: int) -> set[int]:
    """Feed the head of the file (bounded) to the inspectors, then the tail for end regions.

    Returns the ids of inspectors that raised (they stop receiving data, as in
    oslo's InspectWrapper). Skipping the middle is safe: the tail is only fed
    once every ordinary region is complete, and end regions only keep the last
    bytes they see.
    """
    errored: set[int] = set()

    def eat(chunk: bytes) -> None:
        for insp in inspectors:
            if id(insp) in errored:
                continue
            try:
                insp.eat_chunk(chunk)
            except Exception:  # noqa: BLE001 - an inspector that cannot parse simply does not match
                errored.add(id(insp))

    pos = 0
    while pos < min(size, head_limit):
        chunk = os.pread(fd, min(CHUNK, head_limit - pos), pos)
        if not chunk:
            break
        pos += len(chunk)
        eat(chunk)
        live = [i for i in inspectors if id(i) not in errored]
        if all(_regions_done(i) for i in live):
            break
    wants_tail = any(
        isinstance(i.region(n), fi.EndCaptureRegion) for i in inspectors if id(i) not in errored for n in i.context_info
    )
    if wants_tail and pos < size and all(_regions_done(i) for i in inspectors if id(i) not in errored):
        start = max(pos, size - TAIL_LIMIT)
        tail = read_at(fd, start, size - start)
        if tail:
            eat(tail)
    for insp in inspectors:
        insp.finish()
    return errored


def _matches(insp: fi.FileInspector) -> bool:
    try:
        return bool(insp.format_match)
    except Exception:  # noqa: BLE001 - a half-parsed inspector is not a match
        return False


def _vsize(insp: fi.FileInspector) -> int | None:
    try:
        v = int(insp.virtual_size)
    except Exception:  # noqa: BLE001
        return None
    return v or None


def sniff(head: bytes) -> list[str]:
    """Formats QEMU would probe from the first bytes (magic numbers), in imagekit names."""
    found: list[str] = []
    for magic, name in _MAGICS:
        if head.startswith(magic):
            if name == "qcow2" and len(head) >= 8 and struct.unpack_from(">I", head, 4)[0] == 1:
                name = "qcow"
            found.append(name)
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        found.append("vdi")
    if _vmdk_text_probe(head):
        found.append("vmdk")
    return found


def _vmdk_text_probe(head: bytes) -> bool:
    """QEMU's ``vmdk_probe`` for text: after comment and blank lines, a ``version=N`` line."""
    for line in head.split(b"\n")[:512]:
        stripped = line.strip(b" \t\r")
        if not stripped or stripped.startswith(b"#"):
            continue
        return stripped in (b"version=1", b"version=2", b"version=3")
    return False


def _partition_table(head: bytes) -> str | None:
    if len(head) >= 520 and head[510:512] == b"\x55\xaa":
        if head[512:520] == b"EFI PART" or (len(head) >= 4104 and head[4096:4104] == b"EFI PART"):
            return "gpt"
        entries = [head[446 + 16 * i:462 + 16 * i] for i in range(4)]
        if any(e[4] != 0 for e in entries):
            return "mbr"
    return None


def detect(path: str | os.PathLike[str]) -> Detection:
    """Detect the format of ``path`` from its content, reading at most ~64 MiB.

    Raises ImageReadError if the file is missing, a directory or unreadable.
    """
    fd, st = open_image(path)
    try:
        return _detect_fd(fd, st)
    finally:
        os.close(fd)


_VHD_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}


def _detect_fd(fd: int, st: os.stat_result) -> Detection:
    size = st.st_size
    head = read_at(fd, 0, 8192)
    inspectors = [cls() for cls in fi.ALL_FORMATS.values()]
    _feed(inspectors, fd, size, HEAD_LIMIT)
    oslo_hits = [i for i in inspectors if i.NAME != "raw" and _matches(i)]
    by_name = {i.NAME: i for i in inspectors}
    names, tail_type = _claims(fd, size, head, oslo_hits)
    oslo_format: str | None = oslo_hits[0].NAME if len(oslo_hits) == 1 else ("raw" if not oslo_hits else None)
    fmt, hybrid = _classify(names)
    findings: list[Finding] = []
    if fmt == "polyglot":
        shown = sorted({"vhd" if n == "vhd-tail" else n for n in names})
        findings.append(Finding(
            "polyglot", "reject",
            f"content matches more than one format ({', '.join(shown)}): a polyglot file "
            "that different tools would read differently; refusing it",
        ))
    subformat: str | None = None
    if fmt == "vhd" and "vhd-tail" in names:
        subformat = _VHD_TYPES.get(tail_type, f"type-{tail_type}")
    elif fmt == "vhd" and len(head) >= 64:
        t = struct.unpack_from(">I", head, 60)[0]
        subformat = _VHD_TYPES.get(t, f"type-{t}")
    elif fmt == "vmdk" and not head.startswith((b"KDMV", b"COWD")):
        subformat = "descriptor"

    return Detection(
        format=fmt,
        qemu_format=registry.qemu_name(fmt),
        matches=tuple("vhd" if n == "vhd-tail" else n for n in names) or ("raw",),
        virtual_size=_virtual_size(fd, size, fmt, "vhd-tail" in names, head, by_name),
        actual_size=getattr(st, "st_blocks", 0) * 512,
        file_size=size,
        oslo_format=oslo_format,
        subformat=subformat,
        hybrid=hybrid,
        partition_table=_partition_table(head),
        findings=tuple(findings),
    )


def _claims(fd: int, size: int, head: bytes, oslo_hits: list[fi.FileInspector]) -> tuple[list[str], int]:
    """Every format that claims the file, in imagekit names (``gpt``: a partition table; ``vhd-tail``:
    a fixed VHD's footer at the end), and that footer's disk type."""
    names: list[str] = []
    for i in oslo_hits:
        row = registry.by_oslo(i.NAME)
        names.append(i.NAME if i.NAME == "gpt" or row is None else row.name)
    for s in sniff(head):
        oslo_equiv = "qcow2" if s == "qcow" else s
        if oslo_equiv not in names:
            names.append(s)
        elif s == "qcow":  # oslo calls qcow v1 "qcow2"; keep the precise name
            names[names.index("qcow2")] = "qcow"
    # A fixed VHD has its only footer in the last 512 bytes (QEMU does not probe it,
    # but it is what ``-O vpc -o subformat=fixed`` writes, and ``-f vpc`` reads it).
    tail_type = 0
    if "vhd" not in names and size >= 1024:
        tail = read_at(fd, size - 512, 512)
        if looks_like_vhd_footer(tail):
            tail_type = struct.unpack_from(">I", tail, 60)[0]
            names.append("vhd-tail")
    return names, tail_type


def _classify(names: list[str]) -> tuple[str, bool]:
    """The format the claims make (``polyglot`` when they disagree), and whether it is a hybrid ISO.

    A partition table is a disk's content, not a container format: next to a container format
    (other than ISO 9660, or a fixed VHD's payload) it makes a polyglot.
    """
    structural = [n for n in names if n != "gpt"]
    if "vhd-tail" in structural:
        structural.remove("vhd-tail")
        return ("polyglot" if structural else "vhd"), False
    if not structural:
        return "raw", False
    if structural == ["iso"]:
        return "iso", "gpt" in names
    if len(structural) == 1 and "gpt" not in names:
        return structural[0], False
    return "polyglot", False


def _virtual_size(fd: int, size: int, fmt: str, fixed_vhd: bool, head: bytes,
                  by_name: dict[str, fi.FileInspector]) -> int | None:
    """The virtual size as the format's header (or oslo's inspector for it) says."""
    if fmt == "raw":
        return size
    if fmt == "iso":  # read as raw: the whole file (a hybrid ISO may append partitions)
        return max(_vsize(by_name["iso"]) or 0, size)
    if fmt == "vhd" and fixed_vhd:
        return int(struct.unpack_from(">Q", read_at(fd, size - 512, 512), 48)[0])
    if fmt in ("qcow2", "qcow"):
        return int(struct.unpack_from(">Q", head, 24)[0]) if len(head) >= 32 else None
    if fmt in by_name:
        return _vsize(by_name[fmt])
    return None


def oslo_safety_check(path: str | os.PathLike[str], oslo_format: str) -> list[str]:
    """Run oslo's ``safety_check()`` for one format over a bounded read; return failure reasons.

    An empty list means the inspector found nothing wrong. Unknown formats and
    inspectors that cannot complete within the read bound are failures.
    """
    cls = fi.get_inspector(oslo_format)
    if cls is None:
        return [f"no oslo inspector for format {oslo_format!r}"]
    fd, st = open_image(path)
    try:
        insp = cls()
        errored = _feed([insp], fd, st.st_size, HEAD_LIMIT)
    finally:
        os.close(fd)
    if errored:  # the inspector raised while parsing: never a pass
        return [f"{oslo_format} inspector could not parse the file"]
    try:
        insp.safety_check()
    except fi.SafetyCheckFailed as e:
        return [f"{name}: {exc}" for name, exc in e.failures.items()] or [str(e)]
    except fi.ImageFormatError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001 - anything unexpected is a failure, never a pass
        return [f"inspector error: {e}"]
    return []


def describe(detection: Detection) -> dict[str, Any]:
    """JSON-ready summary (alias of ``Detection.to_dict``)."""
    return detection.to_dict()
