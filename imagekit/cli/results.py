"""The ``--json`` result types of the commands: what each command's document holds.

Each model is declared on its command with ``@result_type`` (``cli/output.py``). The output
layer validates the command's result against it before printing (unknown keys are refused,
so the code cannot drift from the model), and ``imagekit.cli.schemas`` generates the
published JSON Schemas in ``docs/schemas/`` from the same models. The envelope every
document carries (``schema_version``, ``command``, ``ok``, ``error``) is added by the output
layer and described in ``schemas.py``. Library dataclasses whose fields are already the
document (``BootResult``, ``ServerInfo``, ``UploadResult``, ``EntryInfo``, ``StepResult``)
are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagekit.glance import UploadResult
from imagekit.recipe import Recipe


class Result(BaseModel):
    """Base of the result models: unknown keys refused."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- shared pieces


class FindingOut(Result):
    code: str = Field(description="stable finding code (docs/finding-codes.md)")
    severity: Literal["info", "warn", "reject"]
    message: str


class LintFindingOut(Result):
    code: str = Field(description="property linter rule (imagekit properties rules)")
    severity: Literal["error", "warning"]
    property: str
    message: str


class ArtifactOut(Result):
    path: str
    format: str
    virtual_size: int
    size: int = Field(description="bytes in the file")
    sha256: str | None = None
    compat: str | None = None


# ---------------------------------------------------------------- recipes


class RecipeRow(Result):
    name: str
    description: str | None = None
    method: str | None = None
    abstract: bool
    extends: str | None = None
    path: str
    origin: str = Field(description="where it was found: env, ./recipes, user or shipped")
    valid: bool | None = None
    os: str | None = None
    error: str | None = None


class RecipeList(Result):
    recipes: list[RecipeRow]


class RecipeShow(Recipe):
    """A resolved recipe as ``recipes show --json`` prints it: the recipe plus where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str | None = None
    digest: str | None = None


class ValidateRow(Result):
    recipe: str
    ok: bool
    name: str | None = None
    source: str | None = None
    error: str | None = None
    hint: str | None = None
    problems: list[str]


class ValidateResult(Result):
    ok: bool
    results: list[ValidateRow]


# ---------------------------------------------------------------- doctor


class ToolRow(Result):
    name: str
    version: str | None
    purpose: str
    required: bool
    path: str | None = None
    ok: bool


class DoctorResult(Result):
    ok: bool
    tools: list[ToolRow]
    python: dict[str, str | None]
    accelerator: dict[str, Any]
    device_mapper: bool
    appliance: dict[str, Any]
    problems: list[str]


# ---------------------------------------------------------------- images: inspect, check, convert


class InspectResult(Result):
    path: str
    format: str
    qemu_format: str | None
    subformat: str | None
    virtual_size: int | None
    actual_size: int
    file_size: int
    matches: list[str]
    hybrid: bool
    partition_table: str | None
    format_info: dict[str, Any] | None = None
    findings: list[FindingOut] | None = None
    qcow2: dict[str, Any] | None = None
    allocation: dict[str, Any] | None = None
    rejected: list[str] | None = None


class CheckResult(Result):
    path: str
    format: str | None = Field(description="the detected format (never the file name's)")
    verdict: Literal["accept", "warn", "reject"]
    findings: list[FindingOut]
    details: dict[str, Any] = Field(description="detection, declared format, oslo safety, format information")


class CodeRow(Result):
    code: str
    meaning: str


class CodeList(Result):
    codes: list[CodeRow]


class ConvertResult(Result):
    input: ArtifactOut
    output: ArtifactOut
    verdict: Literal["accept", "warn", "reject"]
    input_verdict: Literal["accept", "warn", "reject"]
    output_findings: list[FindingOut]
    input_findings: list[FindingOut]
    qemu_img_check: str
    compare: str = Field(description="identical (content compared), or map-as-planned (verified by map)")
    notes: list[str]
    seconds: dict[str, float]
    writer: Literal["imagekit", "qemu-img"] = Field(description="who wrote the output")
    verification: str = Field(description="map (metadata + map equal to the plan) or content (full compare)")
    map_ranges: int | None = Field(description="ranges of qemu-img map compared with the plan")


# ---------------------------------------------------------------- publish


class LintResult(Result):
    ok: bool
    properties: dict[str, str]
    findings: list[LintFindingOut]


class RulesResult(Result):
    rules: dict[str, str]


@dataclass
class ConvertedUploadOut(UploadResult):
    """``upload --convert``: the upload, and what the conversion on the way produced."""

    converted: dict[str, Any] = dc_field(default_factory=dict)


class ImageList(Result):
    images: list[dict[str, Any]] = Field(description="Glance image records (id, name, status, ..., properties)")


class PruneRow(Result):
    id: str
    name: str | None
    created_at: str | None
    status: str | None
    protected: bool
    os_hidden: bool
    action: str
    reason: str


class PruneResult(Result):
    name_prefix: str
    keep: int
    action: str
    dry_run: bool
    changed: int
    images: list[PruneRow]


class GlanceStopResult(Result):
    stopped: bool
    home: str
    pid: int | None = None
    reason: str | None = None


class GlanceNotRunning(Result):
    running: Literal[False]


class GlanceEnvResult(Result):
    OS_CLOUD: str
    OS_AUTH_TOKEN: str
    OS_IMAGE_URL: str


# ---------------------------------------------------------------- build, cache


class StageOut(Result):
    name: str
    key: str
    cached: bool
    seconds: float
    output: str | None
    details: dict[str, Any]


class BuildResultOut(Result):
    recipe: str
    output: ArtifactOut
    manifest: str
    verdict: str
    stages: list[StageOut]
    glance: dict[str, Any] | None


class CachePruneResult(Result):
    dry_run: bool
    removed: list[dict[str, Any]]


class CacheList(Result):
    entries: list[dict[str, Any]]


# ---------------------------------------------------------------- guest


class StepOut(Result):
    index: int
    op: str
    summary: str
    duration: float
    ok: bool
    output: str


class CustomiseResult(Result):
    ok: bool
    image: str
    output: str | None
    in_place: bool
    steps: list[StepOut]


class GuestInfo(Result):
    image: dict[str, Any]
    root: str | None
    os: dict[str, Any]
    package_format: str | None
    package_management: str | None
    mountpoints: dict[str, str]
    kernels: list[dict[str, Any]]
    bootloader: str | None
    uefi: bool
    cloud_init: bool
    qemu_guest_agent: bool
    cloudbase_init: bool
    package_count: int
    applications: list[dict[str, Any]]
    windows: dict[str, Any] | None = None
