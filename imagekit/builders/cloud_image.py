"""Builder ``cloud-image``: a vendor's published cloud image as the base.

Download (verified, cached, resumable: ``imagekit.download``), check it (an
unsafe base is refused), copy it to a fresh qcow2 through ``imagekit.convert``
(so the copy is verified too), then grow its virtual disk to the recipe's
``disk_size`` (never shrink). Customisation and the final conversion are the
pipeline's next steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagekit import download
from imagekit import run as runner
from imagekit.convert import ConvertOptions, convert
from imagekit.errors import ImagekitError, UnsafeImageError
from imagekit.recipe import CloudImageBuild, Recipe
from imagekit.verdict import Verdict

log = logging.getLogger("imagekit.cloud_image")


class CloudImageError(ImagekitError):
    pass


@dataclass(frozen=True)
class CloudImageResult:
    path: Path
    base: download.Fetched
    base_format: str
    virtual_size: int
    resized: bool


def build(recipe: Recipe, out: Path, *, progress: Callable[[int, int | None], None] | None = None) -> CloudImageResult:
    spec = recipe.build
    if not isinstance(spec, CloudImageBuild):
        raise CloudImageError(f"recipe {recipe.name} does not use the cloud-image build method")
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
