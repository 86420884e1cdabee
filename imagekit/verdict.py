"""Findings and verdicts: the result of checking an image.

A finding has a stable ``code`` (for machines), a ``severity`` and a human
``message``. The verdict is the worst severity: ``reject`` > ``warn`` > ``accept``.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Verdict:
    path: str
    format: str | None
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    details: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def verdict(self) -> VerdictName:
        sev = {f.severity for f in self.findings}
        if "reject" in sev:
            return "reject"
        if "warn" in sev:
            return "warn"
        return "accept"

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
    """A small collector used by the verifiers; caps the number of findings kept."""

    def __init__(self, limit: int = 200) -> None:
        self.items: list[Finding] = []
        self.limit = limit
        self.dropped = 0

    def add(self, code: str, severity: Severity, message: str) -> None:
        if len(self.items) < self.limit:
            self.items.append(Finding(code, severity, message))
        else:
            self.dropped += 1

    def reject(self, code: str, message: str) -> None:
        self.add(code, "reject", message)

    def warn(self, code: str, message: str) -> None:
        self.add(code, "warn", message)

    def info(self, code: str, message: str) -> None:
        self.add(code, "info", message)

    def has(self, code: str) -> bool:
        return any(f.code == code for f in self.items)

    @property
    def rejected(self) -> bool:
        return any(f.severity == "reject" for f in self.items)

    def freeze(self) -> tuple[Finding, ...]:
        out = list(self.items)
        if self.dropped:
            out.append(Finding("too-many-findings", "info", f"{self.dropped} more findings not listed"))
        return tuple(out)
