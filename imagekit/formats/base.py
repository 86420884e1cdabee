"""The contract of a format verifier: ``verify(path, options) -> FormatReport``.

A verifier checks an image of one format from its bytes (bounded reads; a short read is a
finding, never zeros) and returns a :class:`FormatReport`, the one result type of every
verifier: its findings, the virtual size the format's metadata declares, a JSON-ready mapping
of what it read (``details.format_info`` in ``imagekit check --json``) and the few typed facts
callers act on (qcow2 compat and internal snapshot count, the deep walk's counters). It raises
``ImageReadError`` only when the file cannot be opened or read. Verifiers are reached through
their row in :mod:`imagekit.formats.registry`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from imagekit.verdict import Finding, VerdictName, verdict_of


@dataclass(frozen=True)
class VerifyOptions:
    """What a caller asks of a verifier. Formats without a deep walk or size limit ignore them."""

    deep: bool = True  # qcow2: walk every L1/L2/refcount/bitmap table and recompute the refcounts
    max_virtual_size: int | None = None  # qcow2: a larger virtual size is a finding


@dataclass(frozen=True, kw_only=True)
class FormatReport:
    """What a format verifier found."""

    findings: tuple[Finding, ...] = ()
    virtual_size: int | None = None  # as the format's metadata declares it (None: not known)
    format_info: Mapping[str, object] = field(default_factory=dict)  # JSON-ready: what the verifier read
    compat: str | None = None  # qcow2: "0.10" or "1.1"
    snapshots: int = 0  # internal snapshots (qcow2)
    stats: Mapping[str, int] = field(default_factory=dict)  # counters of a deep walk (qcow2 allocation)

    @property
    def verdict(self) -> VerdictName:
        return verdict_of(self.findings)

    @property
    def rejected(self) -> bool:
        return self.verdict == "reject"

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def to_dict(self) -> dict[str, object]:
        """The JSON form (what ``check --json`` shows as ``details.format_info``)."""
        return dict(self.format_info)


Verifier = Callable[[str | os.PathLike[str], VerifyOptions], FormatReport]


def report(info: dict[str, object], findings: tuple[Finding, ...]) -> FormatReport:
    """A FormatReport from a verifier's info mapping (its ``virtual_size`` key, if an int, is the size)."""
    vsize = info.get("virtual_size")
    return FormatReport(findings=findings, virtual_size=vsize if isinstance(vsize, int) else None, format_info=info)
