"""The build manifest of a cloud snapshot: the same document ``imagekit build`` writes.

``NAME.manifest.json`` in the output folder (``imagekit.manifest``): the recipe (when one
was given; its build method is recorded as ``cloud-snapshot``), the inputs (the base image
in Glance with its digest, the user-data file, the recipe file), imagekit's version, one
timing per step, the output (the snapshot's URL in Glance, its format and sizes; no local
file, so no sha256 and no local check), the Glance record (properties after cleaning) and
no accelerator or guest inventory (no VM ran here and the image was not inspected here).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagekit import __version__, manifest
from imagekit.artifact import Artifact
from imagekit.builders.base import ManifestInput, ToolVersions, file_digest

if TYPE_CHECKING:
    from imagekit.cloud import Cloud
    from imagekit.snapshot.cloud import CloudSnapshotOptions, CloudSnapshotResult

METHOD = "cloud-snapshot"


def _inputs(opts: CloudSnapshotOptions, glance: Cloud, base: dict[str, Any] | None) -> tuple[ManifestInput, ...]:
    out: list[ManifestInput] = []
    if base is not None:
        out.append(ManifestInput(name="base image", url=f"{glance.endpoint}/v2/images/{base['id']}",
                                 algo=str(base.get("os_hash_algo") or "sha512"), digest=base.get("os_hash_value"),
                                 size=base.get("size"), format=base.get("disk_format")))
    if opts.user_data_file and Path(opts.user_data_file).is_file():
        out.append(ManifestInput(name="user-data", path=str(Path(opts.user_data_file).resolve()),
                                 digest=file_digest(Path(opts.user_data_file))))
    return tuple(out) + (manifest.recipe_inputs(opts.recipe) if opts.recipe is not None else ())


def write_manifest(opts: CloudSnapshotOptions, glance: Cloud, result: CloudSnapshotResult,
                   base: dict[str, Any] | None, seconds: float) -> Path:
    from imagekit.pipeline import Uploaded

    img = result.image
    recipe = opts.recipe
    ref = (manifest.RecipeRef(recipe.name, recipe.digest, recipe.source, METHOD) if recipe is not None
           else manifest.RecipeRef(img.name, None, None, METHOD))
    output = Artifact(path=f"{glance.endpoint}/v2/images/{img.id}", format=str(img.disk_format),
                      virtual_size=int(img.virtual_size or 0), size=int(img.size or 0))
    uploaded = Uploaded(cloud=result.cloud, id=img.id, name=img.name, status=img.status,
                        disk_format=str(img.disk_format), size=img.size, os_hash_value=img.os_hash_value,
                        verified=False, reused=False, properties=dict(img.properties), visibility=img.visibility,
                        min_disk=img.min_disk)
    doc = manifest.Manifest(
        imagekit=__version__, recipe=ref, inputs=_inputs(opts, glance, base), elements=None,
        tools=ToolVersions(imagekit=__version__), accelerator=None,
        stages=tuple(manifest.StageTiming(t.name, t.seconds, False, "") for t in result.timings),
        seconds_total=round(seconds, 2), output=output, check=None, glance=uploaded, guest=None,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    assert opts.output_dir is not None
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in img.name) or img.id
    return manifest.write(opts.output_dir / f"{safe}.manifest.json", doc)
