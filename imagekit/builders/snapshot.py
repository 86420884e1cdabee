"""Builder ``snapshot``: customise a running guest under QEMU and keep its disk (like Packer's qemu builder).

The recipe's ``build:`` section::

    build:
      method: snapshot
      base: {recipe: debian-12}          # another recipe's output (built through the same pipeline
                                         # and its cache), or a cloud image: base: {image: {url, sha256...}}
      provision:                         # what cloud-init does in the guest, in this order:
        packages: [nginx]                #   packages (the guest's package manager, after an index update)
        user_data: |                     #   the recipe's own user-data (#cloud-config, #! script, ...),
          #cloud-config                  #   or user_data_file: a file next to the recipe
          write_files: [...]
        scripts:                         #   scripts, run in order after the packages; each must exit 0
          - "systemctl enable nginx"     #   (inline: run with sh -e), or
          - {file: scripts/setup.sh}     #   a file next to the recipe
      timeouts: {boot: 10m, provision: 30m, generalise: 5m, shutdown: 2m}
      memory: 1G
      cpus: 1
      network: true                      # user-mode networking (NAT) for the guest

The base is booted on a copy-on-write overlay with a NoCloud seed, provisioned,
generalised inside the guest and shut down cleanly (``imagekit.snapshot.local``); the
flattened disk is the base image of the pipeline's next stages (customise, convert,
check, upload), which run as for any method. The stage is cached: its key holds the
build section (timeouts aside), the content of the files it names, the base's identity
(its upstream digest, or the base recipe's own cache inputs) and QEMU's version.

Strings in ``build:`` have recipe variables substituted (``{name}``, ``{version}``...), like
every build value: in inline shell, write ``$var`` rather than ``${var}`` or put the
script in a file (files are sent as they are).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from imagekit import paths
from imagekit import run as runner
from imagekit.builders.base import (
    BaseImage,
    BuildContext,
    BuildError,
    BuildSpec,
    ManifestInput,
    ToolVersions,
    file_digest,
    recipe_inputs,
)
from imagekit.specs import Source, SpecModel, StrictBool, StrictInt, parse_duration, parse_size
from imagekit.steps.fields import BASE_DIR, Duration, HostPath, PackageName, resolve_host_path

if TYPE_CHECKING:
    from imagekit.recipe import Recipe
    from imagekit.snapshot.local import Timeouts

log = logging.getLogger("imagekit.snapshot")


class SnapshotBase(SpecModel):
    """Where the guest starts from: exactly one of ``recipe`` (a name, or a file relative to the
    recipe's folder) and ``image`` (a cloud image to download and verify)."""

    recipe: str | None = None
    image: Source | None = None
    format: Literal["qcow2", "raw", "vmdk", "vhdx", "vpc"] | None = None  # declared format of ``image``

    @field_validator("recipe")
    @classmethod
    def _recipe_ref(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("expected a recipe name or the path of a recipe file")
        if "/" in v or v.endswith((".yaml", ".yml")):
            base = info.context.get(BASE_DIR) if isinstance(info.context, dict) else None
            return str(resolve_host_path(v, base))
        return v

    @model_validator(mode="after")
    def _one(self) -> SnapshotBase:
        if (self.recipe is None) == (self.image is None):
            raise ValueError("give exactly one of base.recipe (a recipe's output) and base.image (a cloud image)")
        if self.format is not None and self.image is None:
            raise ValueError("base.format declares the format of base.image; a recipe's output is checked anyway")
        return self


class ProvisionScript(SpecModel):
    """One script: inline text (``- "systemctl enable nginx"``, or ``{run: ...}``) or ``{file: PATH}``."""

    run: str | None = None
    file: HostPath | None = None

    @model_validator(mode="before")
    @classmethod
    def _inline(cls, data: Any) -> Any:
        return {"run": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one(self) -> ProvisionScript:
        if (self.run is None) == (self.file is None):
            raise ValueError("a script is inline text or {file: PATH}, exactly one of them")
        return self


class Provision(SpecModel):
    """What cloud-init does in the guest (see the module documentation)."""

    packages: list[PackageName] = Field(default_factory=list)
    user_data: str | None = None
    user_data_file: HostPath | None = None
    scripts: list[ProvisionScript] = Field(default_factory=list)

    @field_validator("user_data")
    @classmethod
    def _known_kind(cls, v: str | None) -> str | None:
        from imagekit.errors import UsageError
        from imagekit.snapshot.userdata import part_type

        if v is not None:
            try:
                part_type(v)
            except UsageError as exc:
                raise ValueError(f"{exc.message} ({exc.hint})") from None
        return v

    @model_validator(mode="after")
    def _one_user_data(self) -> Provision:
        if self.user_data is not None and self.user_data_file is not None:
            raise ValueError("give user_data or user_data_file, not both")
        return self

    def host_files(self) -> list[Path]:
        files = [Path(self.user_data_file)] if self.user_data_file else []
        return files + [Path(s.file) for s in self.scripts if s.file]


class SnapshotTimeouts(SpecModel):
    boot: Duration = "10m"  # QEMU start to cloud-init running imagekit's reporter
    provision: Duration = "30m"  # then until cloud-init has finished
    generalise: Duration = "5m"
    shutdown: Duration = "2m"  # each of: ACPI power button, guest agent

    def seconds(self) -> Timeouts:
        from imagekit.snapshot.local import Timeouts

        return Timeouts(parse_duration(self.boot), parse_duration(self.provision), parse_duration(self.generalise),
                        parse_duration(self.shutdown))


class SnapshotBuild(BuildSpec):
    method: Literal["snapshot"]
    base: SnapshotBase
    provision: Provision = Field(default_factory=Provision)
    timeouts: SnapshotTimeouts = Field(default_factory=SnapshotTimeouts)
    memory: str = "1G"
    cpus: StrictInt = Field(default=1, ge=1, le=64)
    network: StrictBool = True

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if parse_size(v) < 256 << 20:
            raise ValueError("memory must be at least 256M")
        return v


@dataclass(frozen=True)
class SnapshotFacts:
    base: str  # the base recipe's name or the base image's URL
    boot_seconds: float
    provision_seconds: float
    generalise_seconds: float
    shutdown_seconds: float
    shutdown: str  # how the guest was shut down: acpi or agent
    cloud_init_status: str
    datasource: str | None
    console_log: str  # the provisioning boot's serial console, next to the image


def _spec(recipe: Recipe) -> SnapshotBuild:
    if not isinstance(recipe.build, SnapshotBuild):
        raise BuildError(f"recipe {recipe.name} does not use the snapshot build method")
    return recipe.build


def _load_base_recipe(spec: SnapshotBuild, recipe: Recipe) -> Recipe:
    from imagekit import recipe as rec

    assert spec.base.recipe is not None
    base = rec.load(Path(spec.base.recipe) if spec.base.recipe.startswith("/") else spec.base.recipe)
    if base.name == recipe.name or isinstance(base.build, SnapshotBuild):
        raise BuildError(f"recipe {recipe.name}: base recipe {base.name} uses the snapshot method itself",
                         "start from a recipe built another way (dib, cloud-image), or extend the other "
                         "snapshot recipe and add to its provision section")
    return base


def _base_recipe_inputs(base: Recipe, tools: ToolVersions) -> dict[str, Any]:
    """What the base recipe's output depends on: the keys of its build, customise and convert stages."""
    from imagekit import builders, steps

    return {"recipe": base.name, "build": builders.get(base.build.method).cache_inputs(base, tools),
            "customise": [s.model_dump(mode="json") for s in base.customise],
            "files": steps.host_file_digests(base.customise), "output": base.output.model_dump(mode="json"),
            "guestfs": tools.libguestfs}


def _qemu_version() -> str | None:
    from imagekit.accel import qemu_system_binary

    qemu = qemu_system_binary()
    return runner.version_of([qemu, "--version"]) if qemu else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"cannot read {path}: {exc}", "the file was readable when the recipe was loaded") from exc


def _user_data(spec: SnapshotBuild) -> Any:
    from imagekit.snapshot import userdata

    p = spec.provision
    text = _read(p.user_data_file) if p.user_data_file else p.user_data
    scripts = [userdata.Script(Path(s.file).name, _read(s.file)) if s.file
               else userdata.Script(f"script-{i}", str(s.run)) for i, s in enumerate(p.scripts, 1)]
    return userdata.compose(text, p.packages, scripts, mode="provision")


class SnapshotBuilder:
    """Boot + provision + generalise under QEMU as a build method."""

    method = "snapshot"
    model = SnapshotBuild
    facts = SnapshotFacts

    def check_recipe(self, recipe: Recipe) -> None:
        spec = _spec(recipe)
        if recipe.os.type != "linux":
            raise ValueError("build method snapshot provisions through cloud-init: it needs os.type linux")
        if spec.base.recipe == recipe.name:
            raise ValueError(f"build.base.recipe: a recipe cannot start from itself ({recipe.name})")

    def cache_inputs(self, recipe: Recipe, tools: ToolVersions) -> dict[str, Any]:
        spec = _spec(recipe)
        inputs = recipe_inputs(recipe)
        inputs["build"] = spec.model_dump(mode="json", exclude={"timeouts"})  # a longer timeout is the same image
        inputs["files"] = {str(p): file_digest(p) for p in spec.provision.host_files()}
        if spec.base.image is not None:
            from imagekit.download import expected_digest

            exp = expected_digest(spec.base.image)
            inputs["base"] = f"{exp.algo}:{exp.digest}" if exp.digest else "first-use"
        else:
            inputs["base"] = _base_recipe_inputs(_load_base_recipe(spec, recipe), tools)
        inputs["tools"] = {"qemu-img": tools.qemu_img, "qemu-system": _qemu_version()}
        return inputs

    def build(self, recipe: Recipe, out: Path, ctx: BuildContext) -> BaseImage[SnapshotFacts]:
        from imagekit.snapshot import local
        from imagekit.snapshot.errors import SnapshotError
        from imagekit.workdir import WorkDir

        spec = _spec(recipe)
        ctx.add_rollback(lambda: out.unlink(missing_ok=True), f"remove the partial image {out}")
        console_log = out.with_name("snapshot-console.log")
        wd = WorkDir("snapshot-")
        try:
            base, fmt, inputs, described = _base(spec, recipe, ctx, wd.path)
            guest = local.Guest(base=base, base_format=fmt, user_data=_user_data(spec), accel=ctx.accel,
                                disk_bytes=recipe.disk_bytes, memory_mib=parse_size(spec.memory) >> 20,
                                cpus=spec.cpus, network=spec.network, hostname=recipe.name.replace(".", "-"))
            try:
                res = local.provision(guest, out, wd.path, console_log, timeouts=spec.timeouts.seconds(),
                                      env=wd.env(), say=ctx.phase)
            except SnapshotError as exc:
                exc.hint = f"{exc.hint}; the whole console log: {_keep_log(console_log, recipe.name)}"
                raise
        finally:
            report = wd.cleanup()
            if report.problems:
                log.warning("clean-up after the snapshot boot: %s", report.summary())
        facts = SnapshotFacts(described, res.boot_seconds, res.provision_seconds, res.generalise_seconds,
                              res.shutdown_seconds, res.shutdown, res.cloud_init.status, res.cloud_init.datasource,
                              console_log.name)
        return BaseImage(path=out, format="qcow2", virtual_size=_virtual_size(out), facts=facts,
                         inputs=inputs + _provision_inputs(spec))


def _keep_log(console_log: Path, name: str) -> Path:
    """A failed build's console log, moved out of the (discarded) cache entry into the state folder."""
    dest = paths.state_dir() / "logs" / f"snapshot-{name}.console.log"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(console_log), dest)
    except OSError:
        return console_log
    return dest


def _virtual_size(path: Path) -> int:
    info = runner.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)], timeout=60)
    return int(json.loads(info.stdout)["virtual-size"])


def _provision_inputs(spec: SnapshotBuild) -> tuple[ManifestInput, ...]:
    return tuple(ManifestInput(name="provision file", path=str(p), digest=file_digest(p))
                 for p in spec.provision.host_files())


def _base(spec: SnapshotBuild, recipe: Recipe, ctx: BuildContext,
          work: Path) -> tuple[Path, str, tuple[ManifestInput, ...], str]:
    """The base disk to boot (checked), its qemu format, its manifest inputs and a description."""
    if spec.base.image is not None:
        from imagekit import download
        from imagekit.check import check
        from imagekit.errors import UnsafeImageError

        src = spec.base.image
        ctx.phase(f"base image {src.url}")
        fetched = download.fetch(src, ctx.progress)
        verdict = check(fetched.path, declared=spec.base.format)
        if not verdict.ok:
            raise UnsafeImageError(f"the base image {src.url} failed the safety check ({', '.join(verdict.codes())})",
                                   "do not build on it", verdict)
        fmt = verdict.detection.qemu_format if verdict.detection else None
        inp = ManifestInput(name="base image", url=fetched.url, algo=fetched.algo, digest=fetched.digest,
                            size=fetched.size, format=str(fmt or verdict.format))
        return fetched.path, str(fmt or verdict.format), (inp,), src.url
    base_recipe = _load_base_recipe(spec, recipe)
    if ctx.build_recipe is None:
        raise BuildError("the snapshot method needs the pipeline to build its base recipe",
                         "this is a bug: BuildContext.build_recipe was not set")
    ctx.phase(f"base recipe {base_recipe.name}")
    art = ctx.build_recipe(base_recipe, work / "base")
    inputs: tuple[ManifestInput, ...] = (ManifestInput(name="base image", digest=art.sha256, size=art.size,
                                                       format=art.format),)
    if base_recipe.source and Path(base_recipe.source).is_file():
        inputs += (ManifestInput(name="base recipe", path=base_recipe.source,
                                 digest=file_digest(Path(base_recipe.source))),)
    from imagekit.formats import registry

    return Path(art.path), registry.qemu_name(art.format) or art.format, inputs, base_recipe.name
