"""Findings and verdicts: the result of checking an image.

A finding has a stable ``code`` (for machines), a ``severity`` and a human
``message``. The verdict is the worst severity: ``reject`` > ``warn`` > ``accept``.
A :class:`Verdict` carries, typed, what ``check()`` learnt on the way: the content
detection, the declared format, oslo.utils' safety result, the format verifier's
report and the virtual size; ``to_dict()`` is the JSON of ``imagekit check --json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # imported for annotations only: both modules import this one
    from imagekit.formats.base import FormatReport
    from imagekit.formats.detect import Detection

Severity = Literal["info", "warn", "reject"]
VerdictName = Literal["accept", "warn", "reject"]


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def verdict_of(findings: Iterable[Finding]) -> VerdictName:
    """The worst severity of ``findings`` as a verdict."""
    sev = {f.severity for f in findings}
    if "reject" in sev:
        return "reject"
    if "warn" in sev:
        return "warn"
    return "accept"


@dataclass(frozen=True)
class OsloSafety:
    """oslo.utils' ``safety_check()`` for one inspector: what Glance, Nova and Cinder would run."""

    format: str  # the oslo inspector's name
    failures: tuple[str, ...] = ()  # empty: passed

    def to_dict(self) -> dict[str, object]:
        return {"format": self.format, "failures": list(self.failures)}


@dataclass(frozen=True)
class Verdict:
    """The result of ``check()``. ``format`` is the detected format (imagekit's name)."""

    path: str
    format: str | None
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    detection: Detection | None = field(default=None, compare=False)
    declared: str | None = field(default=None, compare=False)  # as the caller gave it (any alias)
    oslo_safety: OsloSafety | None = field(default=None, compare=False)  # None: no oslo inspector for it
    format_report: FormatReport | None = field(default=None, compare=False)  # None: no verifier ran
    virtual_size: int | None = field(default=None, compare=False)  # the largest any reader would see

    @property
    def verdict(self) -> VerdictName:
        return verdict_of(self.findings)

    @property
    def ok(self) -> bool:
        return self.verdict != "reject"

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    @property
    def checked(self) -> bool:
        """False when check() stopped at detection (a polyglot): no format was verified."""
        return self.detection is None or not self.detection.polyglot

    def _details_json(self) -> dict[str, object]:
        """The ``details`` object of the JSON form."""
        d: dict[str, object] = {"detection": self.detection.to_dict() if self.detection is not None else None,
                                "declared": self.declared}
        if self.oslo_safety is not None:
            d["oslo_safety"] = self.oslo_safety.to_dict()
        if self.checked:
            d["format_info"] = self.format_report.to_dict() if self.format_report is not None else {}
            d["virtual_size"] = self.virtual_size
        return d

    @property
    def details(self) -> dict[str, object]:
        """Deprecated (read the typed fields): their JSON form, kept until cli.py and glance.py are rewired."""
        return self._details_json()

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": self.format,
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in self.findings],
            "details": self._details_json(),
        }


class Findings:
    """The collector the verifiers use: at most ``per_code`` findings kept per code and
    ``limit`` in all; the rest are counted and summarised as ``too-many-findings``."""

    def __init__(self, per_code: int = 20, limit: int = 500) -> None:
        self.items: list[Finding] = []
        self.counts: dict[str, int] = {}
        self.per_code = per_code
        self.limit = limit

    def add(self, code: str, severity: Severity, message: str) -> None:
        n = self.counts.get(code, 0)
        self.counts[code] = n + 1
        if n < self.per_code and len(self.items) < self.limit:
            self.items.append(Finding(code, severity, message))

    def reject(self, code: str, message: str) -> None:
        self.add(code, "reject", message)

    def warn(self, code: str, message: str) -> None:
        self.add(code, "warn", message)

    def info(self, code: str, message: str) -> None:
        self.add(code, "info", message)

    def has(self, code: str) -> bool:
        return code in self.counts

    @property
    def rejected(self) -> bool:
        return any(f.severity == "reject" for f in self.items)

    def freeze(self) -> tuple[Finding, ...]:
        out = list(self.items)
        kept: dict[str, int] = {}
        for f in self.items:
            kept[f.code] = kept.get(f.code, 0) + 1
        for code, n in self.counts.items():
            if n > kept.get(code, 0):
                out.append(Finding("too-many-findings", "info", f"{n - kept.get(code, 0)} more '{code}' findings not listed"))
        return tuple(out)
