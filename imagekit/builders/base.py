"""The contract of a build method: what the pipeline asks of a builder and what it gets back.

A build method is one module in ``imagekit/builders/`` holding the recipe model of its
``build:`` section (a :class:`BuildSpec` whose ``method`` is a ``Literal``) and an object
following :class:`Builder`:

- ``check_recipe(recipe)``: what the method needs of the rest of the recipe (raise
  ``ValueError``; it runs while the recipe is validated, so ``recipes validate`` says it);
- ``cache_inputs(recipe, tools)``: everything the base image depends on (the step cache key);
- ``build(recipe, out, ctx)``: write the base image at ``out`` and describe it
  (:class:`BaseImage`: path, format, virtual size, inputs for the manifest, typed facts).

Clean-up is registered as the build goes, ``ctx.add_rollback(fn, what)``; when the build
fails or is interrupted (Ctrl-C, or a signal turned into ``KeyboardInterrupt``) the
clean-ups run in reverse order and the error goes on (diskimage-builder's block-device
``add_rollback``). On success nothing is undone.

This module imports no builder and, at run time, not ``imagekit.recipe`` (the recipe model
imports the builders' models), so every builder module can import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from imagekit.accel import AccelChoice
from imagekit.errors import ImagekitError
from imagekit.specs import SpecModel

if TYPE_CHECKING:
    from imagekit.artifact import Artifact
    from imagekit.recipe import Recipe

log = logging.getLogger("imagekit.builders")

F = TypeVar("F")
Say = Callable[[str], None]
Progress = Callable[[int, int | None], None]


class BuildError(ImagekitError):
    """The base image could not be built."""

    code = "build-failed"


class BuildNotImplemented(BuildError):
    """A build method the recipe format knows but imagekit cannot run yet."""

    code = "build-method-not-implemented"


class UnknownBuildMethod(BuildError):
    code = "build-method-unknown"


class BuildSpec(SpecModel):
    """The base of every ``build:`` model; each method narrows ``method`` to its ``Literal``."""

    method: str


@dataclass(frozen=True)
class ToolVersions:
    """Versions of the programs a build runs (the manifest's ``tools``; parts of cache keys)."""

    imagekit: str
    qemu_img: str | None = None
    diskimage_builder: str | None = None
    python: str = field(default_factory=platform.python_version)
    libguestfs: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"imagekit": self.imagekit, "qemu-img": self.qemu_img, "diskimage-builder": self.diskimage_builder,
                "python": self.python, "libguestfs": self.libguestfs}


@dataclass(frozen=True)
class ManifestInput:
    """A file the image was made from, as the manifest lists it (``{name, url|path, <algo>: hex, ...}``)."""

    name: str
    url: str | None = None
    path: str | None = None
    algo: str = "sha256"
    digest: str | None = None
    size: int | None = None
    format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for key, value in (("url", self.url), ("path", self.path), (self.algo, self.digest), ("size", self.size),
                           ("format", self.format)):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class NoFacts:
    """The facts of a method that has nothing to add."""


@dataclass(frozen=True)
class BaseImage(Generic[F]):
    """A built base image. ``facts`` is the method's own dataclass (``Builder.facts``).

    ``elements``: what the image was composed from, when the method has such a list
    (diskimage-builder's elements), for the manifest. Paths in ``facts`` name files next
    to the image, relative to its folder.
    """

    path: Path
    format: str  # qemu-img's name for the file's format
    virtual_size: int
    facts: F
    inputs: tuple[ManifestInput, ...] = ()
    elements: tuple[str, ...] | None = None


@runtime_checkable
class Builder(Protocol):
    """One build method. Stateless: one instance serves every build."""

    @property
    def method(self) -> str:
        """The recipe's ``build.method``."""
        ...

    @property
    def model(self) -> type[BuildSpec]:
        """The pydantic model of the recipe's ``build:`` section."""
        ...

    @property
    def facts(self) -> type[Any]:
        """The dataclass of ``BaseImage.facts`` (restored from the step cache as this type)."""
        ...

    def check_recipe(self, recipe: Recipe) -> None:
        """Raise ValueError when the rest of the recipe does not suit this method."""
        ...

    def cache_inputs(self, recipe: Recipe, tools: ToolVersions) -> dict[str, Any]:
        """Everything the base image depends on, as JSON-able data (hashed into the cache key)."""
        ...

    def build(self, recipe: Recipe, out: Path, ctx: BuildContext) -> BaseImage[Any]:
        """Write the base image at ``out``; register clean-ups with ``ctx.add_rollback``."""
        ...


@dataclass(frozen=True)
class Rollback:
    fn: Callable[[], object]
    what: str


def _quiet(_message: str) -> None:
    return None


@dataclass
class BuildContext:
    """What a builder gets besides the recipe: progress callbacks, the accelerator chosen once
    for the whole build, the tools' versions, and the rollback stack."""

    accel: AccelChoice
    tools: ToolVersions
    phase: Say = _quiet  # a one-line message about what the build is doing now
    progress: Progress | None = None  # (bytes done, bytes in all) of a download
    rollbacks: list[Rollback] = field(default_factory=list)
    # Build another recipe through the same pipeline (same options and cache) into a folder and
    # return its output: for methods that start from a recipe's output (snapshot).
    build_recipe: Callable[[Recipe, Path], Artifact] | None = None

    def add_rollback(self, fn: Callable[[], object], what: str) -> None:
        """Register a clean-up, run (last registered first) if the build fails or is interrupted."""
        self.rollbacks.append(Rollback(fn, what))

    def rollback(self) -> list[str]:
        """Run the registered clean-ups in reverse order, each once, all of them even when one fails.

        Returns what could not be undone (also logged).
        """
        failed: list[str] = []
        while self.rollbacks:
            rb = self.rollbacks.pop()
            log.info("rollback: %s", rb.what)
            try:
                rb.fn()
            except BaseException as exc:  # noqa: BLE001 - a clean-up must not stop the others
                log.warning("rollback failed: %s: %s", rb.what, exc)
                failed.append(rb.what)
        return failed

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run the block; on any exception (KeyboardInterrupt included) roll back, then re-raise."""
        try:
            yield
        except BaseException:
            self.rollback()
            raise
        self.rollbacks.clear()  # success: nothing to undo


def run_builder(builder: Builder, recipe: Recipe, out: Path, ctx: BuildContext) -> BaseImage[Any]:
    """``builder.build`` with its rollbacks replayed on failure; checks the result names ``out``."""
    with ctx.guard():
        image = builder.build(recipe, out, ctx)
        if image.path != out:
            raise BuildError(f"build method {builder.method} wrote {image.path}, not {out}",
                             "this is a bug in the builder: it must write the path it is given")
    return image


def recipe_inputs(recipe: Recipe) -> dict[str, Any]:
    """The parts of a recipe every base image depends on: the build section, the OS, the disk size."""
    return {"build": recipe.build.model_dump(mode="json"), "os": recipe.os.model_dump(mode="json"),
            "disk_size": recipe.disk_size}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """The content of a folder (relative names and file digests), not where it is."""
    h = hashlib.sha256()
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode())
                h.update(file_digest(p).encode())
    return h.hexdigest()
