"""The typed results of ``imagekit ci`` commands: what ``--json`` prints.

Kept apart from the modules that make them, and importing nothing but the standard
library, so that the command line declares them (``result_type``) without importing the
CI machinery at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSummary:
    name: str
    cached: bool
    seconds: float
    source: str  # built, local (this machine's cache), shared (pulled)


@dataclass(frozen=True)
class RunResult:
    unit: str
    image: str
    sha256: str
    manifest: str
    output_dir: str
    fresh: bool  # built without the cache (too old)
    stages: tuple[StageSummary, ...]
    pulled: tuple[str, ...]  # stages pulled from the shared cache
    pushed: tuple[str, ...]  # stages pushed to it
    junit: str
    provenance: tuple[str, ...]
    signed: bool
    warnings: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class GateResult:
    unit: str
    cloud: str
    sha256: str
    image_id: str | None
    passed: bool
    already: bool  # tested before: nothing booted
    channel: str | None
    boot_seconds: float
    reached: tuple[str, ...]
    junit: str
    console_log: str | None


@dataclass(frozen=True)
class Attempt:
    method: str
    error: str | None
    seconds: float


@dataclass(frozen=True)
class CloudPromotion:
    cloud: str
    state: str  # done (already there), moved, uploaded, failed
    image_id: str | None
    attempts: tuple[Attempt, ...] = ()
    removed_leftovers: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class PromoteResult:
    unit: str
    sha256: str
    channel: str
    clouds: tuple[CloudPromotion, ...]
    complete: bool


@dataclass(frozen=True)
class RotateRow:
    cloud: str
    unit: str
    channel: str | None
    id: str
    name: str
    created_at: str
    action: str  # keep, skip, hide, deactivate, delete
    reason: str


@dataclass(frozen=True)
class RotateResult:
    dry_run: bool
    rows: tuple[RotateRow, ...]
    changed: int
    errors: tuple[str, ...]


@dataclass(frozen=True)
class Reason:
    code: str
    detail: str


@dataclass(frozen=True)
class CloudState:
    cloud: str
    channel: str | None  # the furthest channel the unit's current output reached there
    image_id: str | None
    error: str | None = None


@dataclass(frozen=True)
class UnitPlan:
    unit: str
    recipe: str
    paused: bool
    key: str | None  # the output's cache key now
    sha256: str | None  # of the last recorded output
    built: str | None
    actions: tuple[str, ...]
    reasons: tuple[Reason, ...]
    clouds: tuple[CloudState, ...] = ()


@dataclass(frozen=True)
class PlanResult:
    pipeline: str
    units: tuple[UnitPlan, ...]
    work: tuple[str, ...]  # the units with something to do
    nothing_to_do: bool
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    cloud: str
    channel: str
    sha256: str | None
    image_id: str | None
    age_days: float | None
    count: int
    latest: bool  # the unit's latest build


@dataclass(frozen=True)
class UnitStatus:
    unit: str
    latest: str | None
    built: str | None
    cells: tuple[Cell, ...]
    drift: tuple[str, ...]


@dataclass(frozen=True)
class StatusReport:
    pipeline: str
    generated: str
    clouds: tuple[str, ...]
    channels: tuple[str, ...]
    units: tuple[UnitStatus, ...]
    errors: tuple[str, ...]
    drift: bool


@dataclass(frozen=True)
class Emitted:
    """The files a CI system needs: name -> text (one file for GitLab's child, several otherwise)."""

    system: str
    units: tuple[str, ...]
    files: dict[str, str]


@dataclass(frozen=True)
class UnitInfo:
    unit: str
    recipe: str
    variables: dict[str, str]
    paused: bool


@dataclass(frozen=True)
class ValidateResult:
    pipeline: str
    file: str
    units: tuple[UnitInfo, ...]
