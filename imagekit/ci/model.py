"""The pipeline file, ``imagekit-pipeline.yaml``: images over clouds, channels, gate, retention, cache.

.. code-block:: yaml

    name: images                       # owner name: every image carries imagekit_pipeline=images
    images:
      - recipe: recipes/debian.yaml    # a path relative to this file, or a recipe name
        name: debian                   # the units' prefix (default: the recipe's file name)
        matrix: {release: ["12", "13"]}   # recipe variables; one unit per combination
        rebuild: {max_age: 7d, upstream: true}
        paused: false
    clouds:
      - name: prod-a                   # an entry of clouds.yaml
        properties: {hw_qemu_guest_agent: "yes"}
        visibility: public             # of stable images (candidate and tested stay private)
        import_methods: [glance-direct, direct]   # tried in order; a stalled import moves on
        retries: 3
        import_timeout: 30m            # an import that has not finished by then has stalled
    channels: [candidate, tested, stable]
    gate: {cloud: prod-a, boot: {wait_for: cloud-init, timeout: 10m}}
    retention: {candidate: {keep: 1}, tested: {keep: 2}, stable: {keep: 3, action: hide}}
    cache: {oci: {url: registry.example.org/images/cache}, lease_ttl: 10m}
    notify: {webhook: {url: https://chat.example.org/hook, events: [failure, promote]}}
    provenance: {signing_key: keys/ci.pem, builder_id: https://ci.example.org/imagekit}

:func:`load` validates everything knowable before a run and reports every problem at once,
each with its path (``images[1].matrix.release: expected a list``, ``gate.cloud: 'x' is
not one of the clouds``), the recipes of every unit included (loaded with the unit's
variables: ``images[0] (unit debian-13): build.base.url: ...``). Units are
:class:`Unit`: an image and one matrix row, named ``NAME-VALUE...`` in the matrix's key
order (``debian-13``), a name fit for CI job names, Glance properties and file names.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator

from imagekit import recipe as rec
from imagekit import recipe_errors
from imagekit.errors import RecipeError
from imagekit.specs import SpecModel, StrictBool, StrictInt, parse_duration

DEFAULT_FILE = "imagekit-pipeline.yaml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
ImportMethod = Literal["glance-direct", "web-download", "direct"]
WebhookEvent = Literal["run", "gate", "promote", "rotate", "failure"]
DEFAULT_METHODS: tuple[ImportMethod, ...] = ("glance-direct", "direct")
DEFAULT_EVENTS: tuple[WebhookEvent, ...] = ("failure", "promote")
Seconds = Annotated[float, BeforeValidator(parse_duration)]


class PipelineError(RecipeError):
    """The pipeline file is missing, malformed or invalid; ``problems`` lists every finding."""

    code = "pipeline-invalid"


def _name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError("names use lower-case letters, digits, '.', '_' and '-'")
    return v


Name = Annotated[str, BeforeValidator(lambda v: _name(v) if isinstance(v, str) else v)]


class Rebuild(SpecModel):
    max_age: Seconds | None = None  # rebuild (without the cache) when the last build is older
    upstream: StrictBool = True  # rebuild when the upstream base changed (its checksum)


class Image(SpecModel):
    recipe: str
    name: Name | None = None
    matrix: dict[str, list[str]] = Field(default_factory=dict)
    rebuild: Rebuild = Field(default_factory=Rebuild)
    paused: StrictBool = False

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, values in v.items():
            if not re.match(r"^[a-z][a-z0-9_]*$", key):
                raise ValueError(f"matrix variable '{key}': use lower-case letters, digits and '_'")
            if not values:
                raise ValueError(f"matrix variable '{key}' has no values")
            if len(set(values)) != len(values):
                raise ValueError(f"matrix variable '{key}' repeats a value")
            for value in values:
                if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", value):
                    raise ValueError(f"matrix value '{value}': use letters, digits, '.', '_' and '-'")
        return v


class Cloud(SpecModel):
    name: str
    properties: dict[str, str] = Field(default_factory=dict)
    visibility: Literal["public", "private", "shared", "community"] = "private"
    import_methods: list[ImportMethod] = Field(default_factory=lambda: list(DEFAULT_METHODS), min_length=1)
    web_download_url: str | None = None  # a template: {file} {unit} {sha256}
    retries: StrictInt = Field(default=3, ge=0, le=20)
    import_timeout: Seconds = 1800.0


class BootGate(SpecModel):
    wait_for: Literal["login", "cloud-init"] = "cloud-init"
    timeout: Seconds = 600.0
    memory: StrictInt = Field(default=1024, ge=128)


class Gate(SpecModel):
    cloud: str | None = None  # where candidates are uploaded (default: the first cloud)
    boot: BootGate = Field(default_factory=BootGate)


class Retention(SpecModel):
    keep: StrictInt = Field(ge=0)
    action: Literal["hide", "deactivate", "delete"] = "delete"


class OciCache(SpecModel):
    url: str  # HOST[:PORT]/PATH
    insecure: StrictBool = False  # plain http (a registry on loopback)
    username_env: str | None = None  # the variables holding the credentials (e.g. CI_REGISTRY_USER)
    password_env: str | None = None


class CacheConfig(SpecModel):
    oci: OciCache | None = None
    directory: str | None = None  # relative to the pipeline file
    lease_ttl: Seconds = 600.0
    settle: Seconds = 1.0


class Webhook(SpecModel):
    url: str
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_EVENTS))

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError("a webhook URL starts with http:// or https://")
        return v


class Notify(SpecModel):
    webhook: Webhook | None = None


class Provenance(SpecModel):
    signing_key: str | None = None  # a PEM private key (Ed25519 or ECDSA), relative to the pipeline file
    signing_key_env: str | None = None  # or a variable holding the PEM text
    builder_id: str = "https://imagekit.invalid/ci"


class PipelineSpec(SpecModel):
    name: Name
    images: list[Image] = Field(min_length=1)
    clouds: list[Cloud] = Field(default_factory=list)
    channels: list[Name] = Field(default_factory=lambda: ["candidate", "tested", "stable"], min_length=2)
    gate: Gate = Field(default_factory=Gate)
    retention: dict[str, Retention] = Field(default_factory=dict)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    notify: Notify = Field(default_factory=Notify)
    provenance: Provenance = Field(default_factory=Provenance)
    output_dir: str = "ci-out"


@dataclass(frozen=True)
class Unit:
    """One image with one row of its matrix: the thing a CI job builds."""

    name: str
    image: Image
    index: int  # the image's position in the file
    variables: dict[str, str]
    recipe_ref: str  # a path (absolute) or a recipe name

    def load_recipe(self) -> rec.Recipe:
        return rec.load(self.recipe_ref, variables=self.variables)


@dataclass(frozen=True)
class Pipeline:
    spec: PipelineSpec
    path: Path
    units: tuple[Unit, ...]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def unit(self, name: str) -> Unit:
        from imagekit.errors import UsageError

        for u in self.units:
            if u.name == name:
                return u
        raise UsageError(f"no unit named '{name}' in {self.path}",
                         f"units: {', '.join(u.name for u in self.units)}")

    def cloud(self, name: str) -> Cloud:
        return next(c for c in self.spec.clouds if c.name == name)

    @property
    def gate_cloud(self) -> str | None:
        return self.spec.gate.cloud or (self.spec.clouds[0].name if self.spec.clouds else None)

    def output_dir(self, unit: str) -> Path:
        return self.resolve(self.spec.output_dir) / unit

    def resolve(self, path: str) -> Path:
        return (self.folder / os.path.expanduser(path)).resolve()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PipelineError(f"pipeline file {path} does not exist",
                            f"write {DEFAULT_FILE} (see the README's CI section) or pass --pipeline FILE") from exc
    except OSError as exc:
        raise PipelineError(f"cannot read pipeline file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise PipelineError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a pipeline file is a YAML mapping (name, images, clouds, ...)")
    return data


def _known_keys() -> set[str]:
    keys: set[str] = set()
    for model in (PipelineSpec, Image, Rebuild, Cloud, Gate, BootGate, Retention, CacheConfig, OciCache, Notify,
                  Webhook, Provenance):
        keys.update(model.model_fields)
    return keys


def recipe_ref(folder: Path, value: str) -> str:
    """A recipe path relative to the pipeline file when it names a file, else the recipe name."""
    candidate = folder / value
    if value.endswith((".yaml", ".yml")) or os.sep in value or candidate.is_file():
        return str(candidate.resolve())
    return value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    return value if isinstance(value, list) else []


def _map(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _valid_images(data: dict[str, Any]) -> list[tuple[int, Image]]:
    """The images that validate on their own (the others are reported by pydantic)."""
    out = []
    for i, raw in enumerate(_list(data, "images")):
        try:
            out.append((i, Image.model_validate(raw)))
        except ValidationError:
            continue
    return out


def _units_of(images: list[tuple[int, Image]], folder: Path) -> list[Unit]:
    units = []
    for i, img in images:
        base = img.name or (Path(img.recipe).stem if img.recipe.endswith((".yaml", ".yml")) else
                            Path(img.recipe).name)
        keys = list(img.matrix)
        for row in itertools.product(*(img.matrix[k] for k in keys)) if keys else [()]:
            name = "-".join([base, *row]).lower()
            units.append(Unit(name, img, i, dict(zip(keys, row, strict=True)), recipe_ref(folder, img.recipe)))
    return units


def _cross_problems(data: dict[str, Any], folder: Path) -> list[str]:
    """What relates one part of the file to another, checked on the raw data so that it is
    reported together with the field errors."""
    problems: list[str] = []
    clouds = [c.get("name") for c in _list(data, "clouds") if isinstance(c, dict)]
    for dup in sorted({str(c) for c in clouds if clouds.count(c) > 1}):
        problems.append(f"clouds: '{dup}' is listed twice")
    channels = _list(data, "channels") if "channels" in data else ["candidate", "tested", "stable"]
    if len(set(map(str, channels))) != len(channels):
        problems.append("channels: a channel is listed twice")
    gate = _map(data, "gate")
    if gate.get("cloud") is not None and gate.get("cloud") not in clouds:
        problems.append(f"gate.cloud: '{gate.get('cloud')}' is not one of the clouds "
                        f"({', '.join(map(str, clouds)) or 'none'})")
    retention = _map(data, "retention")
    for ch in retention:
        if ch not in channels:
            problems.append(f"retention.{ch}: not a channel (channels: {', '.join(map(str, channels))})")
    for i, c in enumerate(_list(data, "clouds")):
        if isinstance(c, dict) and "web-download" in (c.get("import_methods") or []) and not c.get("web_download_url"):
            problems.append(f"clouds[{i}].web_download_url: required by the web-download import method")
    cache_ = _map(data, "cache")
    if cache_.get("oci") is not None and cache_.get("directory") is not None:
        problems.append("cache: give oci or directory, not both")
    prov = _map(data, "provenance")
    key = prov.get("signing_key")
    if isinstance(key, str) and not (folder / os.path.expanduser(key)).is_file():
        problems.append(f"provenance.signing_key: {key} does not exist (relative to the pipeline file)")
    return problems


def _unit_problems(units: list[Unit]) -> list[str]:
    problems: list[str] = []
    names = [u.name for u in units]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"images: two units are named '{dup}' (give the images distinct names)")
    for u in units:
        if not NAME_RE.match(u.name):
            problems.append(f"images[{u.index}]: unit name '{u.name}' is not lower-case letters, digits, '.', '_', '-'")
        try:
            u.load_recipe()
        except RecipeError as exc:
            where = f"images[{u.index}].recipe" + (f" (unit {u.name})" if u.variables else "")
            problems.extend(f"{where}: {p}" for p in (exc.problems or [exc.message]))
    return problems


def load(path: str | os.PathLike[str] | None = None) -> Pipeline:
    """Read and validate the pipeline file (default ``./imagekit-pipeline.yaml``); PipelineError
    lists every problem: field errors, cross-references and the recipes of every unit."""
    p = Path(path or DEFAULT_FILE).resolve()
    data = _read(p)
    problems: list[str] = []
    spec: PipelineSpec | None = None
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = recipe_errors.problems(exc, data, "", _known_keys())
    units = _units_of(_valid_images(data), p.parent)
    problems += _cross_problems(data, p.parent) + _unit_problems(units)
    if problems or spec is None:
        raise PipelineError(f"{p}: {len(problems)} problem{'s' * (len(problems) != 1)} in the pipeline file",
                            "fix the fields listed; 'imagekit ci validate' checks the file again", problems)
    return Pipeline(spec, p, tuple(units))
