"""Builder ``windows``: Windows installed unattended under QEMU, with virtio drivers and cloudbase-init.

The recipe's ``build:`` section (:class:`WindowsBuild`) names the three inputs (install ISO,
virtio-win ISO or folder, cloudbase-init MSI), the edition (``/IMAGE/NAME``), the OS id that
picks the virtio-win folders (default: from ``os.version``), firmware, Secure Boot, TPM,
disk bus, locale, time zone, product key, extra PowerShell and the timeout. Everything
that can be known before a build is checked when the recipe is validated (time zone,
language, product key, cloudbase-init options and plugin paths against cloudbase-init's
own definitions, Windows 11's TPM and Secure Boot).

A build (``imagekit.windows``): refuse TCG unless it was asked for explicitly; download and
verify the inputs; check the edition in ``install.wim`` with wimlib and every file the
virtio-win drivers reference; write the answer ISO; run Setup in QEMU until the guest
powers off after sysprep; check the result offline. The build's work folder (answer
ISO, firmware variables, TPM state, sockets) is removed when it ends, however it ends;
the record (answer file with the password masked, provisioning script, cloudbase-init
files, serial log, screenshots) is kept: next to the image on success
(``windows-build/``), in ``<state>/windows-builds/`` on failure (the error says where).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from imagekit.builders.base import BaseImage, BuildContext, BuildError, BuildSpec, ToolVersions
from imagekit.builders.base import recipe_inputs as _recipe_inputs
from imagekit.specs import Source, StrictBool, StrictInt, parse_duration, parse_size
from imagekit.windows import catalog, cbinit
from imagekit.windows.timezones import UnknownTimezone, windows_name

if TYPE_CHECKING:
    from imagekit.accel import AccelChoice
    from imagekit.recipe import Recipe

_LANG_RE = re.compile(r"^[a-z]{2,3}-[A-Z]{2}$")
_KEY_RE = re.compile(r"^([A-Z0-9]{5}-){4}[A-Z0-9]{5}$")
DISK_BUSES = ("virtio", "scsi", "sata", "ide")


class WindowsNeedsKvm(BuildError):
    code = "windows-needs-kvm"


class CloudbaseInitSource(Source):
    """The cloudbase-init MSI, and what imagekit configures it with."""

    user: str = Field("Admin", pattern=r"^[A-Za-z0-9._-]{1,20}$")
    groups: list[str] = Field(default_factory=lambda: ["Administrators"], min_length=1)
    config: dict[str, str] = Field(default_factory=dict)
    plugins: list[str] | None = None

    @field_validator("config")
    @classmethod
    def _options(cls, v: dict[str, str]) -> dict[str, str]:
        bad = cbinit.problems(v)
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @field_validator("plugins")
    @classmethod
    def _plugins(cls, v: list[str] | None) -> list[str] | None:
        bad = cbinit.class_problems("plugins", v or [])
        if bad:
            raise ValueError("; ".join(bad))
        return v


class WindowsBuild(BuildSpec):
    method: Literal["windows"]
    install_media: Source
    image_name: str = Field(min_length=1)
    virtio_drivers: Source | None = None
    virtio_drivers_dir: str | None = None
    cloudbase_init: CloudbaseInitSource
    os_id: Literal["2k22", "2k19", "w11", "w10"] | None = None
    product_key: str | None = None
    language: str = "en-US"
    timezone: str = "UTC"
    firmware: Literal["bios", "uefi"] = "uefi"
    secure_boot: StrictBool = False
    tpm: StrictBool = False
    disk_bus: Literal["virtio", "scsi", "sata", "ide"] | None = None
    memory: str = "4G"
    cpus: StrictInt = Field(2, ge=1, le=64)
    install_timeout: str = "4h"
    rdp: StrictBool = False
    powershell: str | None = None
    network: StrictBool = False

    @field_validator("language")
    @classmethod
    def _language(cls, v: str) -> str:
        if not _LANG_RE.match(v):
            raise ValueError(f"'{v}' is not a Windows language tag such as en-US or de-DE")
        return v

    @field_validator("product_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not _KEY_RE.match(v):
            raise ValueError("a product key is five groups of five letters or digits: XXXXX-XXXXX-XXXXX-XXXXX-XXXXX")
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        try:
            windows_name(v)
        except UnknownTimezone as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if parse_size(v) < 1 << 30:
            raise ValueError("Windows needs at least 1G of memory to install (2G or more is usual)")
        return v

    @field_validator("install_timeout")
    @classmethod
    def _timeout(cls, v: str) -> str:
        if parse_duration(v) <= 0:
            raise ValueError(f"'{v}' is not a positive duration (examples: 90m, 4h)")
        return v

    @field_validator("virtio_drivers_dir")
    @classmethod
    def _virtio_dir(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        base = info.context.get("base_dir") if isinstance(info.context, dict) else None
        path = Path(v) if Path(v).is_absolute() or base is None else Path(base) / v
        if base is not None and not path.is_dir():
            raise ValueError(f"{path} is not a folder (the unpacked virtio-win media)")
        return str(path.absolute())

    @model_validator(mode="after")
    def _consistent(self) -> WindowsBuild:
        if (self.virtio_drivers is None) == (self.virtio_drivers_dir is None):
            raise ValueError("give either virtio_drivers (the virtio-win ISO) or virtio_drivers_dir (its files)")
        if self.secure_boot and self.firmware != "uefi":
            raise ValueError("secure_boot needs firmware: uefi")
        return self

    # ------------------------------------------------------------ what follows from the recipe

    def release(self, os_version: str) -> catalog.WindowsRelease:
        if self.os_id is not None:
            return catalog.release(self.os_id)
        found = catalog.for_version(os_version)
        if found is None:
            raise ValueError(f"os.version '{os_version}' names no Windows release imagekit knows "
                             f"(2022, 2019, 11, 10): set build.os_id ({', '.join(catalog.OS_IDS)})")
        return found


def disk_bus(recipe: Recipe) -> str:
    """The bus the image is built on: the one its Glance properties declare."""
    spec = recipe.build
    declared = recipe.glance.properties.get("hw_disk_bus")
    own = spec.disk_bus if isinstance(spec, WindowsBuild) else None
    return declared or own or "scsi"


@dataclass(frozen=True)
class WindowsFacts:
    os_id: str
    edition: str
    disk_bus: str
    firmware: str
    secure_boot: bool
    tpm: str | None  # the TPM model QEMU reported
    install_seconds: float
    reboots: int
    stages: tuple[str, ...]
    drivers: tuple[str, ...]
    checks: tuple[str, ...]  # offline checks passed
    record: str  # the kept files' folder, next to the image


def _spec(recipe: Recipe) -> WindowsBuild:
    if not isinstance(recipe.build, WindowsBuild):
        raise BuildError(f"recipe {recipe.name} does not use the windows build method")
    return recipe.build


def require_kvm(choice: AccelChoice) -> None:
    """Windows Setup under TCG takes many hours: refuse it unless TCG was asked for by name."""
    if choice.accel == "tcg" and choice.requested != "tcg":
        raise WindowsNeedsKvm(f"Windows installs need KVM, and KVM is not usable here ({choice.reason})",
                              "an install under TCG (software emulation) takes many hours; give --accel tcg "
                              "(or IMAGEKIT_ACCEL=tcg) to build under TCG anyway, with a larger install_timeout")


class WindowsBuilder:
    method = "windows"
    model = WindowsBuild
    facts = WindowsFacts

    def check_recipe(self, recipe: Recipe) -> None:
        if recipe.os.type != "windows":
            raise ValueError("build method windows needs os.type windows")
        spec = _spec(recipe)
        release = spec.release(recipe.os.version)
        if spec.os_id is not None and catalog.for_version(recipe.os.version) not in (None, release):
            raise ValueError(f"build.os_id {spec.os_id} is not os.version {recipe.os.version}")
        if release.needs_tpm and not (spec.tpm and spec.secure_boot):
            raise ValueError(f"{release.name} needs a TPM 2.0 and Secure Boot: set build.tpm and build.secure_boot")
        declared = recipe.glance.properties.get("hw_disk_bus")
        if declared is not None and declared not in DISK_BUSES:
            raise ValueError(f"glance.properties.hw_disk_bus '{declared}' is not a bus Windows can be built on "
                             f"({', '.join(DISK_BUSES)})")
        if declared is not None and spec.disk_bus is not None and declared != spec.disk_bus:
            raise ValueError(f"build.disk_bus {spec.disk_bus} differs from glance.properties.hw_disk_bus {declared}: "
                             "the image boots only on the bus its storage driver was installed for")

    def cache_inputs(self, recipe: Recipe, tools: ToolVersions) -> dict[str, Any]:
        from imagekit.builders.base import tree_digest
        from imagekit.download import expected_digest

        spec = _spec(recipe)
        digests = {}
        for name, src in (("install_media", spec.install_media), ("virtio_drivers", spec.virtio_drivers),
                          ("cloudbase_init", spec.cloudbase_init)):
            if src is not None:
                exp = expected_digest(src)
                digests[name] = f"{exp.algo}:{exp.digest}" if exp.digest else "first-use"
        if spec.virtio_drivers_dir is not None:
            digests["virtio_drivers_dir"] = tree_digest(Path(spec.virtio_drivers_dir))
        return {**_recipe_inputs(recipe), "inputs": digests, "disk_bus": disk_bus(recipe),
                "provisioning": _provisioning_digest(), "tools": {"qemu-img": tools.qemu_img}}

    def build(self, recipe: Recipe, out: Path, ctx: BuildContext) -> BaseImage[WindowsFacts]:
        from imagekit.windows import build as flow

        spec = _spec(recipe)
        require_kvm(ctx.accel)
        ctx.add_rollback(partial(out.unlink, missing_ok=True), f"remove the partial image {out}")
        res = flow.run(flow.BuildRequest(recipe.name, spec, spec.release(recipe.os.version), disk_bus(recipe),
                                         recipe.disk_bytes), out, ctx)
        return BaseImage(path=out, format="qcow2", virtual_size=recipe.disk_bytes, facts=res.facts,
                         inputs=res.inputs)


def _provisioning_digest() -> str:
    """What imagekit puts in the guest, as code: a new provisioning script is a new base image."""
    import hashlib

    from imagekit import windows

    h = hashlib.sha256()
    for name in ("provision.py", "unattend.py", "cbinit.py", "answer.py", "drivers.py"):
        h.update((Path(windows.__file__).parent / name).read_bytes())
    return h.hexdigest()
