"""Findings and verdicts: the result of checking an image.

A finding has a stable ``code`` (for machines), a ``severity`` and a human
``message``. The verdict is the worst severity: ``reject`` > ``warn`` > ``accept``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

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
class Verdict:
    path: str
    format: str | None
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    details: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def verdict(self) -> VerdictName:
        return verdict_of(self.findings)

    @property
    def ok(self) -> bool:
        return self.verdict != "reject"

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": self.format,
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in self.findings],
            "details": self.details,
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
