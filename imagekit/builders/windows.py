"""Builder ``windows``: Windows installed unattended under QEMU (not implemented yet).

The recipe model is complete, so Windows recipes validate (and their Glance properties
are derived, see ``imagekit.properties``); building raises :class:`BuildNotImplemented`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imagekit.builders.base import BaseImage, BuildContext, BuildNotImplemented, BuildSpec, NoFacts, ToolVersions
from imagekit.builders.base import recipe_inputs as _recipe_inputs
from imagekit.specs import Source, StrictBool

if TYPE_CHECKING:
    from imagekit.recipe import Recipe


class WindowsBuild(BuildSpec):
    method: Literal["windows"]
    install_media: Source
    virtio_drivers: Source
    cloudbase_init: Source
    image_name: str
    product_key: str | None = None
    language: str = "en-US"
    firmware: Literal["bios", "uefi"] = "uefi"
    memory: str = "4G"
    install_timeout: str = "4h"
    updates: StrictBool = False


class WindowsBuilder:
    method = "windows"
    model = WindowsBuild
    facts = NoFacts

    def check_recipe(self, recipe: Recipe) -> None:
        if recipe.os.type != "windows":
            raise ValueError("build method windows needs os.type windows")

    def cache_inputs(self, recipe: Recipe, tools: ToolVersions) -> dict[str, Any]:
        return {**_recipe_inputs(recipe), "tools": {"qemu-img": tools.qemu_img}}

    def build(self, recipe: Recipe, out: Path, ctx: BuildContext) -> BaseImage[NoFacts]:
        raise BuildNotImplemented(
            "the windows build method (unattended install under QEMU) is not implemented yet",
            "build Windows images with cloudbase's windows-openstack-imaging-tools for now",
        )

