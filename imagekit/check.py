"""``check()``: is this image safe to hand to qemu-img / upload to OpenStack?

Order of checks: the path itself (missing, directory, unreadable -> ImageReadError;
``json:``/protocol names that qemu would parse), content detection (polyglots
refused), the declared format against the detected one (a "raw" file that is
really qcow2/VMDK/... is the format-probing attack, CVE-2015-1850 /
CVE-2024-40767), oslo.utils' ``safety_check()`` for the detected format (what
Glance/Nova/Cinder run), then imagekit's own structural verifier for the format
(its row in :mod:`imagekit.formats.registry`; formats the registry refuses are
rejected) and the virtual size limit. The verdict carries, typed, the detection,
the declared format, oslo's result, the verifier's report and the virtual size.
"""

from __future__ import annotations

import os
import re

from imagekit.formats import registry
from imagekit.formats.base import FormatReport, VerifyOptions
from imagekit.formats.detect import Detection, detect, oslo_safety_check
from imagekit.verdict import Finding, Findings, OsloSafety, Verdict

_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def normalize_format(name: str) -> str:
    """Map a declared format name (any alias: vpc, img, ...) to imagekit's name. UsageError if unknown."""
    return registry.get(name).name


def check(path: str | os.PathLike[str], declared: str | None = None, max_virtual_size: int | None = None,
          deep: bool = True) -> Verdict:
    """Check an image and return a Verdict (accept / warn / reject with findings).

    ``declared`` is the format the caller believes the file has (as given to
    Glance's ``disk_format`` or qemu-img's ``-f``); ``deep`` makes the qcow2
    verifier walk every table. Raises ImageReadError for a missing, unreadable
    or directory path and UsageError for an unknown declared format.
    """
    want = normalize_format(declared) if declared is not None else None
    spath = os.fspath(path)
    det = detect(spath)  # raises ImageReadError
    f = Findings()
    _check_name(spath, f)
    for item in det.findings:
        f.add(item.code, item.severity, item.message)
    if det.file_size == 0:
        f.reject("empty-image", "the file is empty")
    if want is not None and not det.polyglot:
        _check_declared(want, det, f)
    if det.polyglot:
        return Verdict(spath, det.format, f.freeze(), detection=det, declared=declared)

    row = registry.find(det.format)
    vsize = det.virtual_size
    rep: FormatReport | None = None
    if row is None or not row.accepted:
        f.reject("unsupported-format", row.refused if row is not None and row.refused
                 else f"format {det.format!r} is not supported")
    else:
        rep = row.verify(spath, VerifyOptions(deep=deep, max_virtual_size=max_virtual_size))
        for item in rep.findings:
            f.add(item.code, item.severity, item.message)
        if rep.virtual_size is not None:
            vsize = max(rep.virtual_size, vsize or 0)
    safety = _oslo_safety(spath, row, det, f, rep if deep else None)
    if max_virtual_size is not None and vsize is not None and vsize > max_virtual_size \
            and not f.has("virtual-size-too-large"):
        f.reject("virtual-size-too-large", f"virtual size {vsize} bytes exceeds the limit of {max_virtual_size}")
    return Verdict(spath, det.format, f.freeze(), detection=det, declared=declared, oslo_safety=safety,
                   format_report=rep, virtual_size=vsize)


def _oslo_safety(path: str, row: registry.DiskFormat | None, det: Detection, f: Findings,
                 rep: FormatReport | None) -> OsloSafety | None:
    """oslo.utils' safety check: what OpenStack services will run on upload (None: oslo does not know it).

    A qcow2 that oslo refuses only for incompatible feature bits it does not know, all of which imagekit's
    deep verifier knows and checked without a reject (extended L2 entries), is a warning
    (``glance-inspector-refuses``: Glance's inspector will refuse the upload), not a reject."""
    if row is None:
        return None
    name = det.oslo_format if row.oslo_from_detection else row.oslo_name
    if not name:
        return None
    failures = oslo_safety_check(path, name)
    if failures and _verified_features_only(failures, rep):
        f.warn("glance-inspector-refuses",
               f"valid qcow2 features imagekit verified, but oslo.utils' format inspector ({name}) refuses "
               f"them ({'; '.join(failures)}): Glance, Nova and Cinder releases with that inspector will not "
               "accept this image; 'imagekit convert' writes it without them")
    elif failures:
        f.reject("format-inspector-safety",
                 f"oslo.utils format inspector ({name}) safety check failed: {'; '.join(failures)}")
    return OsloSafety(name, tuple(failures))


# incompatible feature bits oslo's qcow2 inspector accepts (dirty, corrupt, data file, compression type):
# a higher bit is "unknown" to it
_OSLO_KNOWN_INCOMPAT = 0xF


def _verified_features_only(failures: list[str], rep: FormatReport | None) -> bool:
    """oslo failed only on unknown qcow2 feature bits, imagekit's deep check knows them all and rejected nothing."""
    from imagekit.formats.qcow2 import Qcow2Report
    from imagekit.formats.qcow2.constants import INCOMPAT_KNOWN

    if not isinstance(rep, Qcow2Report) or rep.info is None or rep.verdict == "reject":
        return False
    if not all(x.startswith("unknown_features:") for x in failures):
        return False
    extra = rep.info.incompatible_features & ~_OSLO_KNOWN_INCOMPAT
    return extra != 0 and not extra & ~INCOMPAT_KNOWN


def _check_name(path: str, f: Findings) -> None:
    """File names qemu would parse as a JSON block spec or protocol instead of a file."""
    base = os.path.basename(path)
    if path.startswith("json:") or base.startswith("json:"):
        f.reject("json-filename",
                 "the file name starts with 'json:': qemu would parse it as a block-device specification "
                 "(QEMU CVE-2024-4467 class); rename the file")
    elif _PROTOCOL_RE.match(path):
        f.warn("protocol-filename",
               f"the path {path!r} looks like a qemu protocol prefix; pass it as ./name or an absolute path")


def _check_declared(want: str, det: Detection, f: Findings) -> None:
    got = det.format
    if want == got:
        return
    if want == "raw" and got == "iso":
        f.warn("format-mismatch", "declared raw but the file is an ISO 9660 image (harmless: read as raw)")
        return
    if want == "raw" and got == "vhd" and det.subformat == "fixed":
        f.warn("format-mismatch", "declared raw but the file is a fixed VHD (raw data plus a 512-byte footer)")
        return
    if want == "raw":
        f.reject("format-mismatch",
                 f"declared raw but the content is {got}: whatever reads it by probing would follow its "
                 f"{got} metadata (backing files, extents) instead of copying bytes: the format-probing attack "
                 "of CVE-2015-1850 / CVE-2024-40767")
        return
    f.reject("format-mismatch", f"declared {want} but the content is {got}")


__all__ = ["check", "normalize_format", "Finding"]
