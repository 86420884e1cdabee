"""The build manifest: what an image was made from, by what, how, and what came out.

``IMAGE.manifest.json`` is written next to the image (complete or not at all: under a
temporary name, then renamed). Its JSON, key by key:

- ``imagekit``: the version; ``recipe``: name, digest (of the resolved recipe), source
  file, build method;
- ``inputs``: the files the image was made from (the base image of a cloud-image build,
  the recipe file), each with its digest; ``elements``: diskimage-builder's elements
  (None for other methods);
- ``tools``: versions of the programs; ``accelerator``: the one used and why (None when no
  VM ran here: a cloud snapshot);
- ``stages``: name, seconds, cached, cache key of each; ``seconds_total``;
- ``output``: the image (path, format, sizes, sha256; a cloud snapshot: the image's URL in
  Glance, no sha256); ``check``: verdict and findings (None when the image was not checked
  here: a cloud snapshot);
- ``glance``: the upload (None without one); ``guest``: the OS found in the image and
  its packages (None when it was not inspected here); ``created``.

``imagekit build`` (every build method, ``snapshot`` included) and ``imagekit snapshot
--cloud`` (``imagekit.snapshot.cloud_manifest``) write this same document.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagekit.accel import AccelChoice
from imagekit.artifact import Artifact
from imagekit.builders.base import ManifestInput, ToolVersions, file_digest

if TYPE_CHECKING:  # the stage results are the pipeline's; the manifest only shows them
    from imagekit.pipeline import Checked, Customised, Uploaded
    from imagekit.recipe import Recipe


@dataclass(frozen=True)
class RecipeRef:
    name: str
    digest: str | None
    source: str | None
    build_method: str

    @classmethod
    def of(cls, recipe: Recipe) -> RecipeRef:
        return cls(recipe.name, recipe.digest, recipe.source, recipe.build.method)


@dataclass(frozen=True)
class StageTiming:
    name: str
    seconds: float
    cached: bool
    key: str


@dataclass(frozen=True)
class Manifest:
    imagekit: str
    recipe: RecipeRef
    inputs: tuple[ManifestInput, ...]
    elements: tuple[str, ...] | None
    tools: ToolVersions
    accelerator: AccelChoice | None
    stages: tuple[StageTiming, ...]
    seconds_total: float
    output: Artifact
    check: Checked | None
    glance: Uploaded | None
    guest: Customised | None
    created: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "imagekit": self.imagekit,
            "recipe": {"name": self.recipe.name, "digest": self.recipe.digest, "source": self.recipe.source,
                       "build_method": self.recipe.build_method},
            "inputs": [i.to_dict() for i in self.inputs],
            "elements": list(self.elements) if self.elements is not None else None,
            "tools": self.tools.to_dict(),
            "accelerator": self.accelerator.to_dict() if self.accelerator is not None else None,
            "stages": [{"name": s.name, "seconds": s.seconds, "cached": s.cached, "key": s.key} for s in self.stages],
            "seconds_total": self.seconds_total,
            "output": self.output.to_dict(),
            "check": self.check.to_dict() if self.check is not None else None,
            "glance": self.glance.to_dict() if self.glance is not None else None,
            "guest": {"os": self.guest.os,
                      "packages": [{"name": p.name, "version": p.version, "arch": p.arch}
                                   for p in self.guest.packages]} if self.guest is not None else None,
            "created": self.created,
        }


def recipe_inputs(recipe: Recipe) -> tuple[ManifestInput, ...]:
    """The recipe file as an input (none for a recipe that was not read from a file)."""
    if recipe.source and Path(recipe.source).is_file():
        return (ManifestInput(name="recipe", path=recipe.source, digest=file_digest(Path(recipe.source))),)
    return ()


def write(path: Path, manifest: Manifest) -> Path:
    """Write ``manifest`` to ``path`` (under a temporary name, then renamed); return ``path``."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
