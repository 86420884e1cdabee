"""``imagekit build RECIPE``: build -> customise -> convert -> check -> (upload), with a step cache.

Each stage has a cache key: the digest of its recipe section, the key of the
stage before it (which stands for its input artifact) and the versions of the
tools it runs. A stage whose key is in the cache is not run again: an
unchanged recipe rebuilds from the cache in seconds, and a change to the
customisation reuses the built base. Stage outputs enter the cache only when
complete (``imagekit.cache``). A manifest (JSON, ``imagekit.manifest``) is
written next to the image.

The base image comes from the recipe's build method, looked up in the registry
(``imagekit.builders``): this module has no builder-specific code. Each stage's
result is a dataclass (:class:`BaseImage`, :class:`Customised`, :class:`Converted`,
:class:`Checked`, :class:`Uploaded`), kept in its cache entry's metadata and
restored as the same type on a cache hit. The caller's choices come bundled in
:class:`BuildOptions`, the accelerator already resolved (once, by the caller) and
handed down to every VM this build starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from imagekit import __version__, accel, builders, cache, manifest, steps
from imagekit.artifact import Artifact
from imagekit.builders.base import BaseImage, BuildContext, Builder, BuildError, ToolVersions, run_builder
from imagekit.check import check
from imagekit.convert import BUILD_ZLIB_LEVEL, SUFFIX, ConvertOptions, convert, uses_writer
from imagekit.errors import ImagekitError, UnsafeImageError
from imagekit.formats.registry import output_format
from imagekit.run import run as run_program
from imagekit.run import version_of
from imagekit.specs import parse_size
from imagekit.verdict import Finding

if TYPE_CHECKING:
    from imagekit.cache_remote import SharedCache
    from imagekit.recipe import Recipe

__all__ = ["BaseImage", "BuildError", "BuildOptions", "BuildResult", "Checked", "Converted", "Customised",
           "StageKeys", "StageResult", "Uploaded", "build", "stage_keys", "tool_versions"]

log = logging.getLogger("imagekit.pipeline")

Phase = Callable[[str, str], None]  # (stage, message)
R = TypeVar("R")


@dataclass(frozen=True)
class BuildOptions:
    """What the caller decided: the accelerator (resolved once: ``accel.resolve``), the cache,
    the network for commands run in the guest, the cloud to upload to (None: no upload), and the
    step cache shared with other machines (``imagekit.cache_remote``; None: this machine's only)."""

    accel: accel.AccelChoice
    use_cache: bool = True
    network: bool = True
    upload_cloud: str | None = None
    shared: SharedCache | None = None


# ---------------------------------------------------------------- stage results


@dataclass(frozen=True)
class StepDone:
    index: int
    op: str
    summary: str
    seconds: float


@dataclass(frozen=True)
class Package:
    name: str | None
    version: str | None
    arch: str | None


@dataclass(frozen=True)
class Customised:
    """The customised image: its format, the steps applied, and the guest's inventory (the
    manifest's ``guest``; ``os`` holds ``error`` when the guest could not be inspected)."""

    format: str
    steps: tuple[StepDone, ...]
    os: dict[str, Any]
    packages: tuple[Package, ...]
    accel: str


@dataclass(frozen=True)
class Converted:
    sha256: str | None
    format: str
    virtual_size: int
    compat: str | None
    qemu_img_check: str
    compare: str


@dataclass(frozen=True)
class Checked:
    verdict: str
    findings: tuple[Finding, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "findings": [f.to_dict() for f in self.findings]}


@dataclass(frozen=True)
class Uploaded:
    cloud: str
    id: str | None
    name: str | None
    status: str | None
    disk_format: str
    size: int | None
    os_hash_value: str | None
    verified: bool
    reused: bool
    properties: dict[str, Any] = field(default_factory=dict)
    tags: list[str] | None = None
    visibility: str | None = None
    min_disk: int | None = None
    pruned: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


StageOutput = BaseImage[Any] | Customised | Converted | Checked | Uploaded


@dataclass(frozen=True)
class StageResult:
    name: str  # build, customise, convert, check, upload
    key: str  # the cache key ("" for upload)
    cached: bool
    seconds: float
    output: str | None  # the file the stage produced
    result: StageOutput

    def to_dict(self) -> dict[str, Any]:
        details = cache.encode(self.result)
        if isinstance(self.result, Customised):
            details.pop("packages")  # in the manifest; too long for a summary
        return {"name": self.name, "key": self.key, "cached": self.cached, "seconds": self.seconds,
                "output": self.output, "details": details}


@dataclass(frozen=True)
class BuildResult:
    recipe: str
    output: Artifact
    manifest: Path
    stages: tuple[StageResult, ...]
    verdict: str
    upload: Uploaded | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "output": self.output.to_dict(), "manifest": str(self.manifest),
                "verdict": self.verdict, "stages": [s.to_dict() for s in self.stages],
                "glance": self.upload.to_dict() if self.upload else None}


# ---------------------------------------------------------------- the run


def tool_versions() -> ToolVersions:
    import importlib.metadata as md

    try:
        dib: str | None = md.version("diskimage-builder")
    except md.PackageNotFoundError:
        dib = None
    return ToolVersions(imagekit=__version__, qemu_img=version_of(["qemu-img", "--version"]), diskimage_builder=dib,
                        libguestfs=version_of(["guestfish", "--version"]))


def _quiet(stage: str, message: str) -> None:
    return None


@dataclass(frozen=True)
class StageKeys:
    """The cache keys a build of a recipe would use, stage by stage (``convert`` is the output's)."""

    base: str
    customise: str
    convert: str


def stage_keys(recipe: Recipe, network: bool = True, tools: ToolVersions | None = None) -> StageKeys:
    """The keys of the cached stages, computed as :func:`build` does, without building anything
    (a cloud-image recipe with a ``checksum_url`` reads that file: a new upstream is a new key)."""
    tools = tools or tool_versions()
    base = cache.digest(builders.get(recipe.build.method).cache_inputs(recipe, tools))
    cust = cache.digest(_customise_inputs(recipe, base, tools, network))
    return StageKeys(base, cust, cache.digest(_convert_inputs(recipe, cust, tools)))


@dataclass
class _Run:
    recipe: Recipe
    options: BuildOptions
    builder: Builder
    tools: ToolVersions
    say: Phase
    stages: list[StageResult] = field(default_factory=list)
    streamed: Uploaded | None = None  # build --upload: sent to Glance while the convert stage wrote it
    streamed_seconds: float = 0.0


def build(recipe: Recipe, output_dir: Path, options: BuildOptions, *, phase: Phase | None = None) -> BuildResult:
    """Run the recipe's pipeline; return the final artifact and the manifest's path.

    ``phase(stage, message)`` hears what is being done.
    """
    started = time.monotonic()
    run = _Run(recipe, options, builders.get(recipe.build.method), tool_versions(), phase or _quiet)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        base_entry, base = _build_stage(run)
        cust_entry, cust = _customise_stage(run, base_entry, base)
        conv_entry, conv = _convert_stage(run, cust_entry)
        artifact, checked = _check_stage(run, conv_entry, conv, output_dir)
        uploaded = _upload_stage(run, Path(artifact.path)) if options.upload_cloud else None
    except ImagekitError as exc:  # the stages that ran go into the failure's --json document
        exc.partial = {"recipe": recipe.name, "stages": [s.to_dict() for s in run.stages]}
        raise
    doc = manifest.Manifest(
        imagekit=__version__, recipe=manifest.RecipeRef.of(recipe),
        inputs=base.inputs + manifest.recipe_inputs(recipe), elements=base.elements, tools=run.tools,
        accelerator=options.accel, stages=tuple(manifest.StageTiming(s.name, s.seconds, s.cached, s.key)
                                                for s in run.stages),
        seconds_total=round(time.monotonic() - started, 2), output=artifact, check=checked, glance=uploaded,
        guest=cust, created=_now())
    path = manifest.write(output_dir / f"{recipe.output.name}.manifest.json", doc)
    return BuildResult(recipe.name, artifact, path, tuple(run.stages), checked.verdict, uploaded)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _cached_stage(run: _Run, name: str, cache_name: str, inputs: dict[str, Any], result_type: Any,
                  produce: Callable[[cache.Entry], R], hit_message: str,
                  place: Callable[[R, cache.Entry], R] = lambda r, _e: r) -> tuple[cache.Entry, R]:
    """Take a stage's result from the cache, or produce it into a new entry (complete or absent).

    On a local miss the shared cache (``options.shared``) is asked, and an entry produced here
    is published to it. ``place`` turns a result as stored (paths relative to its entry) into one
    to use.
    """
    run.say(name, "looking in the step cache" if run.options.use_cache else "starting")
    key = cache.digest(inputs)
    t = time.monotonic()
    found = cache.lookup(cache_name, key, result_type) if run.options.use_cache else None
    shared = run.options.shared if found is None else None
    with shared.slot(cache_name, key, result_type, lookup=run.options.use_cache) if shared is not None \
            else contextlib.nullcontext() as slot:
        found = found or (slot.found if slot is not None else None)
        if found is not None:
            entry, result = found[0], cast(R, found[1])
            run.say(name, hit_message if slot is None else f"{hit_message} (shared)")
        else:
            with cache.new_entry(cache_name, key) as tmp:
                result = produce(tmp)
                tmp.write_meta(cache.EntryMeta(stage=cache_name, key=key, recipe=run.recipe.name, inputs=inputs,
                                               result=cache.encode(result), created=_now()))
            entry = cache.entry(cache_name, key)
            if slot is not None:
                slot.publish(entry)
    result = place(result, entry)
    run.stages.append(StageResult(name, key, found is not None, round(time.monotonic() - t, 2),
                                  str(entry.artifact), cast(StageOutput, result)))
    return entry, result


def _copy_sparse(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        run_program(["cp", "--sparse=always", "--reflink=auto", str(src), str(tmp)], timeout=3600)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- 1. build


def _build_stage(run: _Run) -> tuple[cache.Entry, BaseImage[Any]]:
    """The base image, from the recipe's build method (its clean-ups replayed if it fails)."""
    builder = run.builder

    def base_of(recipe: Recipe, folder: Path) -> Artifact:  # a base recipe (snapshot method), never uploaded
        return build(recipe, folder, replace(run.options, upload_cloud=None),
                     phase=lambda stage, msg: run.say("build", f"base {recipe.name}: {stage}: {msg}")).output

    def produce(entry: cache.Entry) -> BaseImage[Any]:
        ctx = BuildContext(accel=run.options.accel, tools=run.tools, phase=lambda msg: run.say("build", msg),
                           build_recipe=base_of)
        image = run_builder(builder, run.recipe, entry.artifact, ctx)
        return replace(image, path=image.path.relative_to(entry.dir))  # stored relative to its entry

    return _cached_stage(run, "build", "base", builder.cache_inputs(run.recipe, run.tools),
                         cast(Any, BaseImage)[builder.facts], produce, "base image from cache", place=lambda img, e: replace(img, path=e.dir / img.path))


# ---------------------------------------------------------------- 2. customise


def _customise_inputs(recipe: Recipe, base_key: str, tools: ToolVersions, network: bool) -> dict[str, Any]:
    return {"steps": [s.model_dump(mode="json") for s in recipe.customise],
            "files": steps.host_file_digests(recipe.customise),  # absolute paths, resolved at load
            "base": base_key, "guestfs": tools.libguestfs, "network": network}


def _customise_stage(run: _Run, base_entry: cache.Entry, base: BaseImage[Any]) -> tuple[cache.Entry, Customised]:
    inputs = _customise_inputs(run.recipe, base_entry.key, run.tools, run.options.network)
    return _cached_stage(run, "customise", "customise", inputs, Customised,
                         lambda entry: _run_customise(run, base, entry), "customised image from cache")


def _run_customise(run: _Run, base: BaseImage[Any], entry: cache.Entry) -> Customised:
    from imagekit import customise as cust
    from imagekit import sbom
    from imagekit.guest import GuestError

    accel_name = run.options.accel.accel
    steps: list[StepDone] = []
    info: dict[str, Any] = {}
    if run.recipe.customise:
        def on_step(r: Any) -> None:
            run.say("customise", f"step {r.index} {r.op}: {r.summary}")
            steps.append(StepDone(r.index, r.op, r.summary, r.duration))

        # the guest inventory is taken in the same appliance session, after the last step
        cust.customise(base.path, run.recipe.customise, output=entry.artifact,
                       fmt=base.format, network=run.options.network, accel=run.options.accel, log=on_step,
                       after=lambda session: info.update(sbom.guest_info(session)))
        fmt = "qcow2"
    else:
        _copy_sparse(base.path, entry.artifact)
        fmt = base.format
        run.say("customise", "inventory of the guest (packages)")
        try:
            info = sbom.inspect_guest(entry.artifact, fmt, accel=run.options.accel)
        except GuestError as exc:
            log.warning("no guest inventory: %s", exc.message)
            return Customised(fmt, tuple(steps), {"error": exc.message}, (), accel_name)
    packages = tuple(Package(a.get("name"), a.get("version"), a.get("arch")) for a in info.get("applications", []))
    os_info = dict(info.get("os") or {})
    os_info.update({k: info.get(k) for k in ("kernels", "bootloader", "cloud_init", "qemu_guest_agent",
                                             "package_format") if k in info})
    return Customised(fmt, tuple(steps), os_info, packages, accel_name)


# ---------------------------------------------------------------- 3. convert, 4. check


def _convert_inputs(recipe: Recipe, cust_key: str, tools: ToolVersions) -> dict[str, Any]:
    return {"output": recipe.output.model_dump(mode="json"), "customised": cust_key, "qemu-img": tools.qemu_img}


def _convert_stage(run: _Run, cust_entry: cache.Entry) -> tuple[cache.Entry, Converted]:
    out = run.recipe.output
    inputs = _convert_inputs(run.recipe, cust_entry.key, run.tools)

    def produce(entry: cache.Entry) -> Converted:
        run.say("convert", f"converting to {out.format}")
        opts = ConvertOptions(out_format=out.format, compat=out.compat,
                              cluster_size=parse_size(out.cluster_size) if out.format == "qcow2" else None,
                              compress=None if out.compression == "none" else out.compression, force=True,
                              verify="map", compress_level=BUILD_ZLIB_LEVEL if out.compression == "zlib" else None)
        if run.options.upload_cloud and uses_writer(opts, output_format(out.format)):
            return _convert_and_upload(run, cust_entry.artifact, entry.artifact, opts)
        res = convert(cust_entry.artifact, entry.artifact, opts)
        o = res.output
        return Converted(o.sha256, o.format, o.virtual_size, o.compat, res.qemu_check, res.compare)

    return _cached_stage(run, "convert", "convert", inputs, Converted, produce, "converted image from cache")


def _check_stage(run: _Run, conv_entry: cache.Entry, conv: Converted, output_dir: Path) -> tuple[Artifact, Checked]:
    """Place the output and check it (always: the copy is what the user gets)."""
    out = run.recipe.output
    final = output_dir / f"{out.name}{SUFFIX[out.format]}"
    t = time.monotonic()
    _copy_sparse(conv_entry.artifact, final)
    verdict = check(final, declared=out.format)
    checked = Checked(verdict.verdict, tuple(verdict.findings))
    run.stages.append(StageResult("check", conv_entry.key, False, round(time.monotonic() - t, 2), str(final), checked))
    if not verdict.ok:
        final.unlink(missing_ok=True)
        raise UnsafeImageError(f"the built image failed the check ({', '.join(verdict.codes())})",
                               "this is a bug in the pipeline or a tool; the cache entry is suspect: "
                               "'imagekit cache prune --all'", verdict)
    artifact = Artifact(str(final), out.format, conv.virtual_size, final.stat().st_size, conv.sha256, conv.compat)
    return artifact, checked


# ---------------------------------------------------------------- 5. upload


def _upload_options(recipe: Recipe) -> Any:
    from imagekit import glance

    # the Recipe itself, not its file: glance re-reading it would substitute {date} again
    return glance.UploadOptions(recipe=recipe, prune_keep=recipe.glance.keep if recipe.glance.keep > 0 else None)


def _convert_and_upload(run: _Run, src: Path, out: Path, opts: ConvertOptions) -> Converted:
    """The convert stage of ``build --upload``: written to ``out`` and sent to Glance in the same pass."""
    from imagekit.cloud import connect
    from imagekit.glance_stream import upload_converted

    cloud = cast(str, run.options.upload_cloud)
    t = time.monotonic()
    run.say("convert", f"converting to qcow2 and uploading to {cloud} in one pass")
    res = upload_converted(connect(cloud), src, _upload_options(run.recipe), opts, tee=out)
    run.streamed = _uploaded(cloud, res.upload)
    run.streamed_seconds = round(time.monotonic() - t, 2)
    return Converted(res.sha256, "qcow2", res.virtual_size, opts.compat, res.qemu_check, "map-as-planned")


def _upload_stage(run: _Run, image: Path) -> Uploaded:
    """Upload through imagekit.glance (check, stream + hash, verify); rotate to the recipe's ``keep``.
    Nothing to do when the convert stage already streamed the image (``build --upload``, not cached)."""
    from imagekit import glance
    from imagekit.cloud import connect

    if run.streamed is not None:
        run.stages.append(StageResult("upload", "", False, run.streamed_seconds, None, run.streamed))
        return run.streamed
    cloud = cast(str, run.options.upload_cloud)
    t = time.monotonic()
    run.say("upload", f"uploading to {cloud}")
    res = glance.upload(connect(cloud), image, _upload_options(run.recipe))
    up = _uploaded(cloud, res)
    run.stages.append(StageResult("upload", "", False, round(time.monotonic() - t, 2), None, up))
    return up


def _uploaded(cloud: str, res: Any) -> Uploaded:
    img = res.image
    up = Uploaded(cloud=cloud, id=img.get("id"), name=img.get("name"), status=img.get("status"),
                  disk_format=res.disk_format, size=res.size, os_hash_value=img.get("os_hash_value"),
                  verified=res.verified, reused=res.reused, properties=img.get("properties", {}),
                  tags=img.get("tags"), visibility=img.get("visibility"), min_disk=img.get("min_disk"),
                  pruned=res.pruned)
    return up
