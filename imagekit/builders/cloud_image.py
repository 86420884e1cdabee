"""Builder ``cloud-image``: a vendor's published cloud image as the base.

Download (verified, cached, resumable: ``imagekit.download``), check it (an
unsafe base is refused), copy it to a fresh qcow2 through ``imagekit.convert``
(so the copy is verified too), then grow its virtual disk to the recipe's
``disk_size`` (never shrink). Customisation and the final conversion are the
pipeline's next steps.

The cache key holds the base's expected digest (pinned, or read from the upstream
checksum file), so a new upstream release is a new base. The download and convert
modules are imported when a build runs: the builder registry is imported by every
recipe load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imagekit import run as runner
from imagekit.builders.base import BaseImage, BuildContext, BuildError, BuildSpec, ManifestInput, ToolVersions
from imagekit.builders.base import recipe_inputs as _recipe_inputs
from imagekit.errors import UnsafeImageError
from imagekit.specs import Source

if TYPE_CHECKING:
    from imagekit import download
    from imagekit.recipe import Recipe

log = logging.getLogger("imagekit.cloud_image")


class CloudImageError(BuildError):
    code = "cloud-image-failed"


class CloudImageBuild(BuildSpec):
    method: Literal["cloud-image"]
    base: Source
    format: Literal["qcow2", "raw", "vmdk", "vhdx", "vpc"] | None = None


@dataclass(frozen=True)
class CloudImageResult:
    path: Path
    base: download.Fetched
    base_format: str
    virtual_size: int
    resized: bool


@dataclass(frozen=True)
class CloudImageFacts:
    base_format: str  # as detected (the recipe's ``format`` is only a declaration, checked)
    base_cached: bool  # the download came from imagekit's download cache
    resized: bool  # the virtual disk was grown to the recipe's disk_size


def _spec(recipe: Recipe) -> CloudImageBuild:
    if not isinstance(recipe.build, CloudImageBuild):
        raise CloudImageError(f"recipe {recipe.name} does not use the cloud-image build method")
    return recipe.build


def build(recipe: Recipe, out: Path, *, progress: Callable[[int, int | None], None] | None = None) -> CloudImageResult:
    from imagekit import download
    from imagekit.convert import ConvertOptions, convert
    from imagekit.verdict import Verdict

    spec = _spec(recipe)
    fetched = download.fetch(spec.base, progress)
    try:
        result = convert(fetched.path, out, ConvertOptions(out_format="qcow2", force=True, declared=spec.format))
    except UnsafeImageError as exc:
        codes = exc.verdict.codes() if isinstance(exc.verdict, Verdict) else []
        raise UnsafeImageError(
            f"the base image {spec.base.url} failed the safety check ({', '.join(codes)})",
            "the checksum matched, so this is what upstream publishes: do not build on it", exc.verdict) from exc
    verdict = result.input_verdict
    size = result.output.virtual_size
    resized = False
    if recipe.disk_bytes > size:
        runner.run(["qemu-img", "resize", "-f", "qcow2", str(out), str(recipe.disk_bytes)], timeout=300)
        size, resized = recipe.disk_bytes, True
    elif recipe.disk_bytes < size:
        log.warning("disk_size %s is smaller than the base image's %d bytes: keeping the base size",
                    recipe.disk_size, size)
    return CloudImageResult(out, fetched, verdict.format or "unknown", size, resized)


class CloudImageBuilder:
    method = "cloud-image"
    model = CloudImageBuild
    facts = CloudImageFacts

    def check_recipe(self, recipe: Recipe) -> None:
        return None

    def cache_inputs(self, recipe: Recipe, tools: ToolVersions) -> dict[str, Any]:
        from imagekit.download import expected_digest

        exp = expected_digest(_spec(recipe).base)
        return {**_recipe_inputs(recipe), "base_digest": f"{exp.algo}:{exp.digest}" if exp.digest else "first-use",
                "tools": {"qemu-img": tools.qemu_img}}

    def build(self, recipe: Recipe, out: Path, ctx: BuildContext) -> BaseImage[CloudImageFacts]:
        spec = _spec(recipe)
        ctx.phase(f"base image {spec.base.url}")
        ctx.add_rollback(partial(out.unlink, missing_ok=True), f"remove the partial base image {out}")
        res = build(recipe, out, progress=ctx.progress)
        base = ManifestInput(name="base image", url=res.base.url, algo=res.base.algo, digest=res.base.digest,
                             size=res.base.size, format=res.base_format)
        return BaseImage(path=out, format="qcow2", virtual_size=res.virtual_size, inputs=(base,),
                         facts=CloudImageFacts(res.base_format, res.base.cached, res.resized))
