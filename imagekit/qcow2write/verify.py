"""Verification of a written qcow2 without reading its data: ``qemu-img map`` against the plan.

The deep check of the metadata is imagekit's own (``imagekit.check``); this module asks QEMU where
each guest range of the output lives (``qemu-img map --output=json``, metadata only) and compares it
with :meth:`~.layout.Layout.planned_map`: the same guest ranges hold data, at the same host offsets
(compressed runs have none). A difference raises :class:`MapMismatch`.
"""

from __future__ import annotations

import json
import os

from imagekit import run as runner
from imagekit.errors import ImagekitError
from imagekit.qcow2write.layout import Layout

MapEntry = tuple[int, int, int | None]


class MapMismatch(ImagekitError):
    """QEMU reads the written image differently from what was planned."""

    code = "map-mismatch"


def merge(entries: list[MapEntry]) -> list[MapEntry]:
    """Adjacent data ranges merged as ``qemu-img map`` merges them (contiguous host offsets, or both compressed)."""
    out: list[MapEntry] = []
    for start, length, host in entries:
        if out:
            ps, pl, ph = out[-1]
            if ps + pl == start and ((ph is None and host is None) or
                                     (ph is not None and host is not None and ph + pl == host)):
                out[-1] = (ps, pl + length, ph)
                continue
        out.append((start, length, host))
    return out


def qemu_map(path: str | os.PathLike[str], timeout: float = 600.0,
             limits: runner.Limits | None = None) -> list[MapEntry]:
    """The data ranges of a qcow2 file as ``qemu-img map`` reports them."""
    res = runner.run(["qemu-img", "map", "-f", "qcow2", "--output=json", os.fspath(path)], timeout=timeout,
                     limits=limits)
    rows = json.loads(res.stdout or "[]")
    data = [(int(r["start"]), int(r["length"]), int(r["offset"]) if "offset" in r else None)
            for r in rows if r.get("data")]
    return merge(data)


def verify_map(path: str | os.PathLike[str], layout: Layout, timeout: float = 600.0,
               limits: runner.Limits | None = None) -> int:
    """Raise :class:`MapMismatch` unless QEMU's map of ``path`` is the planned one; the number of ranges."""
    got = qemu_map(path, timeout, limits)
    want = layout.planned_map()
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        g = got[first] if first < len(got) else None
        w = want[first] if first < len(want) else None
        raise MapMismatch(f"qemu-img map of the output differs from the planned layout at range {first}: "
                          f"qemu-img says {g}, planned {w} ({len(got)} vs {len(want)} ranges)",
                          "the writer produced a wrong image; it was removed. Report it with the input's "
                          "'imagekit inspect --json'")
    return len(want)
