"""``inspect()``: describe an image (format, sizes, format details, allocation).

Informational, not a verdict: use ``imagekit.check.check`` to decide whether an
image is safe. Allocation comes from the qcow2 verifier's statistics when
``deep`` is set, otherwise from ``qemu-img map`` (explicit ``-f``, argument list,
timeout), which is only run on images whose cheap structure check found nothing
that would make qemu open other files (backing files, data files, extents).
"""

from __future__ import annotations

import json
import os
from typing import Any

from imagekit.errors import ImageReadError, ToolError
from imagekit.formats import registry
from imagekit.formats.detect import detect

MAP_TIMEOUT = 120.0


def _jsonable(value: Any) -> Any:
    """Coerce a value into plain JSON types (bytes become hex, unknown objects strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return _jsonable(to_dict())
    return str(value)


def map_summary(path: str, qemu_format: str, timeout: float = MAP_TIMEOUT) -> dict[str, object]:
    """Summarise ``qemu-img map --output=json -f FMT`` as data/zero/unallocated byte counts."""
    from imagekit.run import run  # imported lazily: only needed when qemu-img is used

    argv = ["qemu-img", "map", "--output=json", "-f", qemu_format, os.path.abspath(path)]
    try:
        done = run(argv, timeout=timeout)
    except ToolError as e:
        return {"error": e.message}
    try:
        extents = json.loads(done.stdout)
    except ValueError:
        return {"error": "qemu-img map printed invalid JSON"}
    data = zero = unalloc = 0
    for ext in extents:
        length = int(ext.get("length", 0))
        if ext.get("data"):
            data += length
        elif ext.get("zero"):
            zero += length
        else:
            unalloc += length
    return {"source": "qemu-img map", "extents": len(extents), "data_bytes": data, "zero_bytes": zero,
            "unallocated_bytes": unalloc}


def inspect(path: str | os.PathLike[str], deep: bool = False) -> dict[str, object]:
    """Describe ``path``: detected format, virtual/actual/file size and format details (JSON-serialisable).

    Raises ImageReadError if the path is missing, unreadable or a directory.
    """
    spath = os.fspath(path)
    det = detect(spath)
    out: dict[str, Any] = {
        "path": spath,
        "format": det.format,
        "qemu_format": det.qemu_format,
        "subformat": det.subformat,
        "virtual_size": det.virtual_size,
        "actual_size": det.actual_size,
        "file_size": det.file_size,
        "matches": list(det.matches),
        "hybrid": det.hybrid,
        "partition_table": det.partition_table,
    }
    row = registry.find(det.format)
    safe_to_map = False
    if det.format == "qcow2":
        safe_to_map = _describe_qcow2(spath, deep, out)
    elif row is not None and row.accepted:
        rep = row.verify(spath)
        out["format_info"] = rep.to_dict()
        out["findings"] = [f.to_dict() for f in rep.findings]
        safe_to_map = not rep.rejected
    if "allocation" not in out:
        if safe_to_map and det.qemu_format and not det.polyglot:
            out["allocation"] = map_summary(spath, det.qemu_format)
        else:
            out["allocation"] = {"skipped": "not mapped: the image may reference other files or is not understood"}
    return _jsonable(out)


def _describe_qcow2(path: str, deep: bool, out: dict[str, Any]) -> bool:
    """The qcow2 header (and with ``deep`` the verifier's allocation and findings) into ``out``; whether
    ``qemu-img map`` may open the image (no backing or data file)."""
    from imagekit.formats import qcow2  # numpy: imported only for qcow2 images

    try:
        info = qcow2.read_info(path)
    except ImageReadError as e:  # a corrupt header: describe what we can, do not map it
        out["qcow2"] = {"error": e.message}
        info = None
    safe_to_map = False
    if info is not None:
        out["virtual_size"] = info.virtual_size
        out["qcow2"] = qcow2.describe(info)
        safe_to_map = not info.backing_file and not info.data_file
    if deep:
        rep = qcow2.verify(path, deep=True)
        out["allocation"] = {"source": "verify", **dict(rep.stats)}
        out["findings"] = [f.to_dict() for f in rep.findings]
    return safe_to_map
