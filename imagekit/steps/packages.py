"""Package and service steps: install, uninstall, services.

Packages are installed and removed with the guest's own package manager (apt-get,
dnf/yum/tdnf, zypper, apk, pacman), inside the guest; ``install`` needs the
appliance's network and is refused before launching when the run has none.
``services`` enables, disables and masks systemd units with the guest's
``systemctl``. Package and unit names are checked when the recipe is validated
(no shell metacharacters, no spaces).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from imagekit.steps.base import StepBase, StepContext, StepFailure, StepOutcome
from imagekit.steps.fields import PackageName, UnitName

PKG_TIMEOUT = 3600.0
_APT = ("apt-get -q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
        "-o APT::Get::Fix-Broken=true")
_NONINTERACTIVE = {"DEBIAN_FRONTEND": "noninteractive"}


def _pkg_command(ctx: StepContext, install: bool, pkgs: Sequence[str]) -> str:
    pm = ctx.session.package_management
    names = " ".join(shlex.quote(p) for p in pkgs)
    if pm == "apt":
        if install:
            update = "" if "apt-updated" in ctx.flags else f"{_APT} update && "
            return f"{update}{_APT} install {names} && apt-get clean"
        return f"{_APT} remove {names}"
    if pm in ("dnf", "yum", "tdnf"):
        return f"{pm} -y {'install' if install else 'remove'} {names}"
    if pm == "zypper":
        return f"zypper -n {'install -l' if install else 'remove'} {names}"
    if pm == "apk":
        return f"apk {'add' if install else 'del'} {names}"
    if pm == "pacman":
        return f"pacman --noconfirm {'-Sy' if install else '-R'} {names}"
    raise StepFailure(f"the guest's package manager ({pm}) is not supported",
                      "supported: apt, dnf, yum, zypper, apk, pacman; or use a 'run' step")


class InstallStep(StepBase):
    """install: install packages with the guest's own package manager (apt-get with
    DEBIAN_FRONTEND=noninteractive after an ``apt-get update``, dnf/yum, zypper, ...). Needs the
    appliance network; libguestfs puts a resolv.conf in the guest while the command runs."""

    NETWORK = "required"

    op: Literal["install"]
    packages: list[PackageName] = Field(min_length=1)

    def linux(self, ctx: StepContext) -> StepOutcome:
        if not ctx.network:
            raise StepFailure("installing packages needs the network", "do not use --no-network for this recipe")
        cmd = _pkg_command(ctx, True, self.packages)
        out = ctx.sh(cmd, PKG_TIMEOUT, "the package install", env=_NONINTERACTIVE)
        ctx.flags.add("apt-updated")
        return StepOutcome(f"installed {', '.join(self.packages)} with {ctx.session.package_management}", out)


class UninstallStep(StepBase):
    """uninstall: remove packages with the guest's package manager."""

    NETWORK = "optional"

    op: Literal["uninstall"]
    packages: list[PackageName] = Field(min_length=1)

    def linux(self, ctx: StepContext) -> StepOutcome:
        cmd = _pkg_command(ctx, False, self.packages)
        out = ctx.sh(cmd, PKG_TIMEOUT, "the package removal", env=_NONINTERACTIVE)
        return StepOutcome(f"removed {', '.join(self.packages)} with {ctx.session.package_management}", out)


class ServicesStep(StepBase):
    """services: enable, disable and mask systemd units with the guest's own ``systemctl``
    (which works offline in a chroot: it only creates and removes the symlinks)."""

    op: Literal["services"]
    enable: list[UnitName] = Field(default_factory=list)
    disable: list[UnitName] = Field(default_factory=list)
    mask: list[UnitName] = Field(default_factory=list)

    def linux(self, ctx: StepContext) -> StepOutcome:
        if not ctx.systemd():
            raise StepFailure("the guest has no systemctl (not a systemd guest)", "use a 'run' step for other init systems")
        verbs = (("enable", "enabled", self.enable), ("disable", "disabled", self.disable),
                 ("mask", "masked", self.mask))
        parts = [f"systemctl {verb} {' '.join(shlex.quote(u) for u in units)}" for verb, _, units in verbs if units]
        if not parts:
            return StepOutcome("no services to change")
        out = ctx.sh(" && ".join(parts), 300, "systemctl")
        said = [f"{done} {', '.join(units)}" for _, done, units in verbs if units]
        return StepOutcome("; ".join(said), out)


STEPS: tuple[type[StepBase], ...] = (InstallStep, UninstallStep, ServicesStep)
