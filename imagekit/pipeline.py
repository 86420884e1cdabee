"""``imagekit build RECIPE``: build -> customise -> convert -> check -> (upload), with a step cache.

Each stage has a cache key: the digest of its recipe section, the key of the
stage before it (which stands for its input artifact) and the versions of the
tools it runs. A stage whose key is in the cache is not run again: an
unchanged recipe rebuilds from the cache in seconds, and a change to the
customisation reuses the built base. Stage outputs enter the cache only when
complete (written under a temporary name, then renamed). A manifest (JSON) is
written next to the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagekit import __version__, accel, paths
from imagekit.artifact import Artifact
from imagekit.check import check
from imagekit.convert import SUFFIX, ConvertOptions, convert
from imagekit.errors import ImagekitError, UnsafeImageError
from imagekit.recipe import (
    CloudImageBuild,
    DibBuild,
    Recipe,
    ScriptStep,
    SshKeyStep,
    UploadStep,
    WindowsBuild,
    parse_size,
)
from imagekit.run import version_of

log = logging.getLogger("imagekit.pipeline")

Phase = Callable[[str, str], None]  # (stage, message)


class BuildError(ImagekitError):
    pass


@dataclass(frozen=True)
class StageResult:
    name: str
    key: str
    cached: bool
    seconds: float
    output: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BuildResult:
    recipe: str
    output: Artifact
    manifest: Path
    stages: tuple[StageResult, ...]
    verdict: str
    glance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "output": self.output.to_dict(), "manifest": str(self.manifest),
                "verdict": self.verdict, "stages": [s.to_dict() for s in self.stages], "glance": self.glance}


# ---------------------------------------------------------------- cache


def cache_root() -> Path:
    return paths.cache_dir() / "steps"


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode())
                h.update(_file_digest(p).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    stage: str
    key: str
    dir: Path

    @property
    def artifact(self) -> Path:
        return self.dir / "artifact"

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def meta(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.meta_path.read_text())
        return data


def _entry(stage: str, key: str) -> CacheEntry:
    return CacheEntry(stage, key, cache_root() / f"{stage}-{key[:32]}")


def _lookup(stage: str, key: str) -> CacheEntry | None:
    e = _entry(stage, key)
    if e.meta_path.exists() and e.artifact.exists():
        with contextlib.suppress(OSError):
            os.utime(e.meta_path)  # last used, for pruning
        return e
    return None


@contextlib.contextmanager
def _new_entry(stage: str, key: str) -> Iterator[CacheEntry]:
    """A cache entry filled in a temporary directory and renamed into place only when complete."""
    final = _entry(stage, key)
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-", dir=cache_root()))
    try:
        yield CacheEntry(stage, key, tmp)
        if final.dir.exists():
            shutil.rmtree(final.dir)
        os.replace(tmp, final.dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_meta(entry: CacheEntry, meta: dict[str, Any]) -> None:
    entry.meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def cache_list() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    root = cache_root()
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not (d / "meta.json").exists():
            continue
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        size = sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file())
        out.append({"entry": d.name, "stage": meta.get("stage"), "recipe": meta.get("recipe"),
                    "created": meta.get("created"), "last_used": time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime((d / "meta.json").stat().st_mtime)),
                    "disk_bytes": size, "path": str(d)})
    return out


def cache_prune(*, older_than: float | None = None, recipe: str | None = None, everything: bool = False,
                dry_run: bool = False) -> list[dict[str, Any]]:
    """Remove cache entries (all, those of a recipe, or unused for ``older_than`` seconds)."""
    now = time.time()
    removed = []
    for e in cache_list():
        p = Path(e["path"])
        unused = now - (p / "meta.json").stat().st_mtime
        if everything or (recipe and e["recipe"] == recipe) or (older_than is not None and unused > older_than):
            removed.append(e)
            if not dry_run:
                shutil.rmtree(p, ignore_errors=True)
    root = cache_root()
    if not dry_run and root.is_dir():
        for d in root.iterdir():  # leftovers of interrupted runs
            if d.name.startswith(".") and now - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)
    return removed


# ---------------------------------------------------------------- tool versions


def tool_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    def pkg(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "imagekit": __version__,
        "qemu-img": version_of(["qemu-img", "--version"]),
        "diskimage-builder": pkg("diskimage-builder"),
        "python": platform.python_version(),
        "libguestfs": version_of(["guestfish", "--version"]),
    }


# ---------------------------------------------------------------- stages


def _copy_sparse(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(tmp)], check=True, timeout=3600,
                       capture_output=True)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _base_key(recipe: Recipe, versions: dict[str, str | None]) -> tuple[str, dict[str, Any]]:
    spec = recipe.build
    section = spec.model_dump(mode="json")
    inputs: dict[str, Any] = {"build": section, "os": recipe.os.model_dump(mode="json"),
                              "disk_size": recipe.disk_size}
    if isinstance(spec, DibBuild):
        from imagekit.builders.dib import element_paths

        inputs["elements"] = [_tree_digest(p) for p in element_paths()]  # content, not checkout path
        inputs["tools"] = {k: versions.get(k) for k in ("diskimage-builder", "qemu-img")}
    elif isinstance(spec, CloudImageBuild):
        from imagekit.download import expected_digest

        exp = expected_digest(spec.base)
        inputs["base_digest"] = f"{exp.algo}:{exp.digest}" if exp.digest else "first-use"
        inputs["tools"] = {"qemu-img": versions.get("qemu-img")}
    return _digest(inputs), inputs


def _customise_inputs(recipe: Recipe) -> dict[str, Any]:
    """Digests of local files the customisation reads (uploads, scripts, keys)."""
    base = Path(recipe.source).parent if recipe.source else Path.cwd()
    files: dict[str, str] = {}
    for step in recipe.customise:
        for ref in (getattr(step, "src", None) if isinstance(step, UploadStep) else None,
                    step.file if isinstance(step, ScriptStep) else None,
                    step.key_file if isinstance(step, SshKeyStep) else None):
            if ref:
                p = (base / ref) if not os.path.isabs(ref) else Path(ref)
                files[ref] = _file_digest(p) if p.is_file() else "missing"
    return files


def _stage(name: str, cache_name: str, key: str, inputs: dict[str, Any], recipe: Recipe, use_cache: bool,
           say: Phase, hit_message: str, produce: Callable[[CacheEntry], dict[str, Any]],
           shown: Callable[[dict[str, Any]], dict[str, Any]] = lambda d: d) -> tuple[CacheEntry, StageResult]:
    """Take a stage's output from the cache, or produce it into a new cache entry (complete or not at all)."""
    t = time.monotonic()
    hit = _lookup(cache_name, key) if use_cache else None
    if hit:
        say(name, hit_message)
        details = hit.meta().get("details", {})
        return hit, StageResult(name, key, True, round(time.monotonic() - t, 2), str(hit.artifact), shown(details))
    with _new_entry(cache_name, key) as entry:
        details = produce(entry)
        _write_meta(entry, {"stage": cache_name, "recipe": recipe.name, "key": key, "inputs": inputs,
                            "details": details, "created": _now()})
    done = _entry(cache_name, key)
    return done, StageResult(name, key, False, round(time.monotonic() - t, 2), str(done.artifact), shown(details))


def build(recipe: Recipe, output_dir: Path, *, use_cache: bool = True, upload_cloud: str | None = None,
          phase: Phase | None = None, network: bool = True) -> BuildResult:
    """Run the recipe's pipeline; return the final artifact and the manifest's path."""
    if isinstance(recipe.build, WindowsBuild):
        raise BuildError(
            "the windows build method (unattended install under QEMU) is not implemented yet",
            "build Windows images with cloudbase's windows-openstack-imaging-tools for now",
        )
    say = phase or (lambda stage, msg: None)
    output_dir.mkdir(parents=True, exist_ok=True)
    versions = tool_versions()
    choice = accel.resolve(None)
    stages: list[StageResult] = []
    started = time.monotonic()

    # 1. base image
    base_key, base_inputs = _base_key(recipe, versions)
    base, st = _stage("build", "base", base_key, base_inputs, recipe, use_cache, say, "base image from cache",
                      lambda entry: _run_builder(recipe, entry, say))
    stages.append(st)
    base_format = base.meta()["details"].get("format", "raw")

    # 2. customise (+ guest inventory for the manifest)
    cust_inputs = {"steps": [s.model_dump(mode="json") for s in recipe.customise], "files": _customise_inputs(recipe),
                   "base": base_key, "guestfs": versions["libguestfs"], "network": network}
    cust, st = _stage("customise", "customise", _digest(cust_inputs), cust_inputs, recipe, use_cache, say,
                      "customised image from cache",
                      lambda entry: _run_customise(recipe, base.artifact, base_format, entry, say, network,
                                                   choice.accel),
                      shown=lambda d: {k: v for k, v in d.items() if k != "packages"})
    stages.append(st)
    cust_meta = cust.meta()["details"]

    # 3. convert to the recipe's output
    out = recipe.output
    conv_inputs = {"output": out.model_dump(mode="json"), "customised": st.key, "qemu-img": versions["qemu-img"]}

    def do_convert(entry: CacheEntry) -> dict[str, Any]:
        say("convert", f"converting to {out.format}")
        opts = ConvertOptions(out_format=out.format, compat=out.compat,
                              cluster_size=parse_size(out.cluster_size) if out.format == "qcow2" else None,
                              compress=None if out.compression == "none" else out.compression, force=True)
        res = convert(cust.artifact, entry.artifact, opts)
        return {"sha256": res.output.sha256, "format": res.output.format, "virtual_size": res.output.virtual_size,
                "compat": res.output.compat, "qemu_img_check": res.qemu_check, "compare": res.compare}

    conv, st = _stage("convert", "convert", _digest(conv_inputs), conv_inputs, recipe, use_cache, say,
                      "converted image from cache", do_convert)
    stages.append(st)
    conv_key = st.key
    conv_meta = conv.meta()["details"]

    # 4. place the output and check it (always: the copy is what the user gets)
    final = output_dir / f"{out.name}{SUFFIX[out.format]}"
    t = time.monotonic()
    _copy_sparse(conv.artifact, final)
    verdict = check(final, declared=out.format)
    stages.append(StageResult("check", conv_key, False, round(time.monotonic() - t, 2), str(final),
                              {"verdict": verdict.verdict, "findings": [f.to_dict() for f in verdict.findings]}))
    if not verdict.ok:
        final.unlink(missing_ok=True)
        raise UnsafeImageError(f"the built image failed the check ({', '.join(verdict.codes())})",
                               "this is a bug in the pipeline or a tool; the cache entry is suspect: "
                               "'imagekit cache prune --all'", verdict)
    artifact = Artifact(str(final), out.format, int(conv_meta["virtual_size"]), final.stat().st_size,
                        conv_meta["sha256"], conv_meta.get("compat"))

    # 5. upload
    glance_info: dict[str, Any] | None = None
    if upload_cloud:
        t = time.monotonic()
        say("upload", f"uploading to {upload_cloud}")
        glance_info = _upload(recipe, final, upload_cloud)
        stages.append(StageResult("upload", "", False, round(time.monotonic() - t, 2), None, glance_info))

    manifest = output_dir / f"{out.name}.manifest.json"
    doc = {
        "imagekit": __version__,
        "recipe": {"name": recipe.name, "digest": recipe.digest, "source": recipe.source,
                   "build_method": recipe.build.method},
        "inputs": _manifest_inputs(recipe, stages[0].details),
        "elements": list(recipe.build.elements) if isinstance(recipe.build, DibBuild) else None,
        "tools": versions,
        "accelerator": choice.to_dict(),
        "stages": [{"name": s.name, "seconds": s.seconds, "cached": s.cached, "key": s.key} for s in stages],
        "seconds_total": round(time.monotonic() - started, 2),
        "output": artifact.to_dict(),
        "check": {"verdict": verdict.verdict, "findings": [f.to_dict() for f in verdict.findings]},
        "glance": glance_info,
        "guest": {k: v for k, v in cust_meta.items() if k in ("os", "packages")},
        "created": _now(),
    }
    tmp = manifest.with_name(f".{manifest.name}.part")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, manifest)
    return BuildResult(recipe.name, artifact, manifest, tuple(stages), verdict.verdict, glance_info)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _manifest_inputs(recipe: Recipe, build_details: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    base = build_details.get("base")
    if isinstance(base, dict):
        out.append(base)
    for name, path in (("recipe", recipe.source),):
        if path and Path(path).is_file():
            out.append({"name": name, "path": path, "sha256": _file_digest(Path(path))})
    return out


def _run_builder(recipe: Recipe, entry: CacheEntry, say: Phase) -> dict[str, Any]:
    spec = recipe.build
    if isinstance(spec, DibBuild):
        from imagekit.builders import dib

        say("build", f"diskimage-builder: {' '.join(spec.elements)}")
        res = dib.build(recipe, entry.artifact, log_path=entry.dir / "dib.log",
                        phase=lambda p: say("build", f"diskimage-builder {p}"))
        return {"method": "dib", "format": "raw", "elements": list(res.elements), "seconds": res.seconds,
                "partition_mapping": res.partition_mapping, "versions": res.versions,
                "log": str(entry.dir / "dib.log")}
    if isinstance(spec, CloudImageBuild):
        from imagekit.builders import cloud_image

        say("build", f"base image {spec.base.url}")
        res2 = cloud_image.build(recipe, entry.artifact)
        return {"method": "cloud-image", "format": "qcow2", "virtual_size": res2.virtual_size,
                "resized": res2.resized,
                "base": {"name": "base image", "url": res2.base.url, res2.base.algo: res2.base.digest,
                         "size": res2.base.size, "format": res2.base_format}}
    raise BuildError(f"build method {spec.method} is not supported")


def _run_customise(recipe: Recipe, base: Path, base_format: str, entry: CacheEntry, say: Phase, network: bool,
                   accel_name: str) -> dict[str, Any]:
    from imagekit import customise as cust
    from imagekit import sbom

    steps_done: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    if recipe.customise:
        def on_step(r: Any) -> None:
            say("customise", f"step {r.index} {r.op}: {r.summary}")
            steps_done.append({"index": r.index, "op": r.op, "summary": r.summary, "seconds": r.duration})

        # the guest inventory is taken in the same appliance session, after the last step
        cust.customise(base, recipe.customise, output=entry.artifact, output_format="qcow2", fmt=base_format,
                       network=network, log=on_step, after=lambda session: info.update(sbom.guest_info(session)))
        fmt = "qcow2"
    else:
        _copy_sparse(base, entry.artifact)
        fmt = base_format
        say("customise", "inventory of the guest (packages)")
        from imagekit.guest import GuestError

        try:
            info = sbom.inspect_guest(entry.artifact, fmt)
        except GuestError as exc:
            log.warning("no guest inventory: %s", exc.message)
            return {"format": fmt, "steps": steps_done, "os": {"error": exc.message}, "packages": [],
                    "accel": accel_name}
    packages = [{"name": a.get("name"), "version": a.get("version"), "arch": a.get("arch")}
                for a in info.get("applications", [])]
    os_info = dict(info.get("os") or {})
    os_info.update({k: info.get(k) for k in ("kernels", "bootloader", "cloud_init", "qemu_guest_agent",
                                             "package_format") if k in info})
    return {"format": fmt, "steps": steps_done, "os": os_info, "packages": packages, "accel": accel_name}


def _upload(recipe: Recipe, image: Path, cloud: str) -> dict[str, Any]:
    """Upload through imagekit.glance (check, stream + hash, verify); rotate to the recipe's ``keep``."""
    from imagekit import glance
    from imagekit.cloud import connect

    c = connect(cloud)
    opts = glance.UploadOptions(recipe=recipe.source or recipe.name,
                                prune_keep=recipe.glance.keep if recipe.glance.keep > 0 else None)
    res = glance.upload(c, image, opts)
    img = res.image
    return {"cloud": cloud, "id": img.get("id"), "name": img.get("name"), "status": img.get("status"),
            "disk_format": res.disk_format, "size": res.size, "os_hash_value": img.get("os_hash_value"),
            "verified": res.verified, "reused": res.reused, "properties": img.get("properties", {}),
            "tags": img.get("tags"), "visibility": img.get("visibility"), "min_disk": img.get("min_disk"),
            "pruned": res.pruned}
