"""Build methods: the registry (``build.method`` -> builder) and the recipe's ``Build`` union.

Each method is one module of this package holding the model of its ``build:`` section and
its builder (see ``imagekit.builders.base``). **To add a method:** write its module and add
its builder to ``_BUILDERS`` below; the recipe model (``Build``), recipe validation and the
pipeline follow from the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Union

from pydantic import Field

from imagekit.builders.base import (
    BaseImage,
    BuildContext,
    Builder,
    BuildError,
    BuildSpec,
    ManifestInput,
    ToolVersions,
    UnknownBuildMethod,
)
from imagekit.builders.cloud_image import CloudImageBuilder
from imagekit.builders.dib import DibBuilder
from imagekit.builders.snapshot import SnapshotBuilder
from imagekit.builders.windows import WindowsBuilder

__all__ = ["BaseImage", "Build", "BuildContext", "BuildError", "BuildSpec", "Builder", "ManifestInput",
           "ToolVersions", "UnknownBuildMethod", "get", "methods", "register", "unregister"]

# The registry: one line per build method.
_BUILDERS: tuple[Builder, ...] = (
    DibBuilder(),
    CloudImageBuilder(),
    WindowsBuilder(),
    SnapshotBuilder(),
)

_registry: dict[str, Builder] = {}


def register(builder: Builder) -> Builder:
    """Add a builder (tests add fakes; the shipped ones are registered on import)."""
    if not isinstance(builder, Builder):
        raise TypeError(f"{builder!r} does not follow imagekit.builders.base.Builder")
    if builder.method in _registry:
        raise ValueError(f"build method {builder.method!r} is already registered")
    _registry[builder.method] = builder
    return builder


def unregister(method: str) -> None:
    _registry.pop(method, None)


def get(method: str) -> Builder:
    """The builder of ``method``; UnknownBuildMethod when there is none."""
    try:
        return _registry[method]
    except KeyError:
        raise UnknownBuildMethod(f"build method {method!r} is not known",
                                 f"known methods: {', '.join(sorted(_registry))}") from None


def methods() -> list[str]:
    return sorted(_registry)


for _builder in _BUILDERS:
    register(_builder)

# The ``build:`` section of a recipe: one model per shipped method, told apart by ``method``.
if TYPE_CHECKING:
    Build = BuildSpec
else:
    Build = Annotated[Union[tuple(b.model for b in _BUILDERS)], Field(discriminator="method")]  # noqa: UP007
