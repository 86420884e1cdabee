"""One Windows build, start to end: inputs, checks, answer ISO, install, offline checks.

Called by the ``windows`` builder (``imagekit.builders.windows``) once the accelerator is
known to be acceptable. The steps, each of which stops the build with its own error:

1. the three inputs are downloaded and verified (``imagekit.download``: pinned digests
   or trust on first use), or the virtio-win folder is taken as it is;
2. before anything boots: the edition is in ``install.wim`` and is the recipe's release
   (wimlib), every virtio-win driver for the OS id is complete (each ``.inf``'s catalogue
   and files), the cloudbase-init installer is an MSI;
3. the answer ISO is written in the build's work folder (a ``WorkDir``: removed when the
   build ends, and by the next build after a SIGKILL), with a random build password;
4. the image (qcow2, the recipe's disk size) is installed by Windows Setup in QEMU;
5. the image is checked offline (``offline.check_image``), the build password among others.

The record of the build (answer file masked, scripts, cloudbase-init files, serial log,
screenshots) is written to a folder under the state directory and moved next to the
image when the build succeeds; a failed build leaves it there and names it.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagekit import paths
from imagekit.builders.base import BuildContext, ManifestInput
from imagekit.builders.windows import WindowsBuild, WindowsFacts
from imagekit.specs import parse_duration, parse_size
from imagekit.windows import answer, cbinit, drivers, install, media, offline, provision, unattend
from imagekit.windows.catalog import WindowsRelease
from imagekit.windows.isofs import MediaError, Tree
from imagekit.windows.timezones import windows_name
from imagekit.workdir import WorkDir

if TYPE_CHECKING:
    from imagekit.download import Fetched

log = logging.getLogger("imagekit.windows")

MSI_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")  # an OLE compound file, which MSI databases are
RECORD = "windows-build"


@dataclass(frozen=True)
class BuildRequest:
    recipe: str
    spec: WindowsBuild
    release: WindowsRelease
    disk_bus: str
    disk_size: int


@dataclass(frozen=True)
class BuildOutcome:
    facts: WindowsFacts
    inputs: tuple[ManifestInput, ...]


@dataclass(frozen=True)
class _Inputs:
    iso: Path
    virtio: Path
    msi: Path
    manifest: tuple[ManifestInput, ...]


def build_password() -> str:
    """A random password for the build only (Windows' complexity rules: upper, lower, digit, symbol)."""
    return secrets.token_urlsafe(18) + "aA1!"


def _fetch(req: BuildRequest, ctx: BuildContext) -> _Inputs:
    from imagekit import download

    spec = req.spec
    got: list[tuple[str, Fetched]] = []
    for name, src in (("install media", spec.install_media), ("virtio-win", spec.virtio_drivers),
                      ("cloudbase-init", spec.cloudbase_init)):
        if src is None:
            continue
        ctx.phase(f"{name}: {src.url}")
        got.append((name, download.fetch(src, ctx.progress)))
    fetched = dict(got)
    manifest = [ManifestInput(name=n, url=f.url, algo=f.algo, digest=f.digest, size=f.size) for n, f in got]
    if spec.virtio_drivers_dir is not None:
        virtio = Path(spec.virtio_drivers_dir)
        manifest.append(ManifestInput(name="virtio-win", path=str(virtio)))
    else:
        virtio = fetched["virtio-win"].path
    return _Inputs(fetched["install media"].path, virtio, fetched["cloudbase-init"].path, tuple(manifest))


def _check_msi(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(8) != MSI_MAGIC:
            raise MediaError(f"the cloudbase-init installer {path} is not an MSI file",
                             "download CloudbaseInitSetup_Stable_x64.msi from https://cloudbase.it/cloudbase-init/")


def _answer_inputs(req: BuildRequest, msi: Path, password: str) -> answer.AnswerInputs:
    spec = req.spec
    cb = cbinit.CloudbaseInitOptions(
        username=spec.cloudbase_init.user, groups=tuple(spec.cloudbase_init.groups),
        plugins=tuple(spec.cloudbase_init.plugins) if spec.cloudbase_init.plugins else cbinit.SERVICE_PLUGINS,
        extra=dict(spec.cloudbase_init.config))
    ua = unattend.UnattendOptions(image_name=spec.image_name, firmware=spec.firmware, language=spec.language,
                                  timezone=windows_name(spec.timezone), admin_password=password,
                                  provision_command=provision.provision_command(), product_key=spec.product_key)
    prov = provision.ProvisionOptions(cb, rdp=spec.rdp, client=not req.release.server,
                                      user_script=spec.powershell is not None)
    return answer.AnswerInputs(ua, prov, msi, spec.powershell)


def _plan(req: BuildRequest, ctx: BuildContext, out: Path, iso: Path, answer_iso: Path, wd: WorkDir,
          record: Path) -> install.InstallPlan:
    spec = req.spec
    return install.InstallPlan(
        disk=out, disk_bus=req.disk_bus, install_media=iso, answer_media=answer_iso,
        firmware=install.firmware(spec.firmware, spec.secure_boot), accel=ctx.accel, work=wd.path / "vm",
        logs=record, timeout=parse_duration(spec.install_timeout), tpm=spec.tpm,
        memory_mib=parse_size(spec.memory) >> 20, cpus=spec.cpus, network=spec.network, env=wd.env())


def _prepare(req: BuildRequest, ctx: BuildContext, wd: WorkDir, record: Path,
             password: str) -> tuple[_Inputs, media.WimImage, answer.AnswerFiles]:
    inputs = _fetch(req, ctx)
    ctx.phase("checking the install media, the drivers and the MSI")
    with Tree(inputs.iso) as iso_tree, Tree(inputs.virtio) as virtio_tree:
        edition = media.check_edition(media.editions(iso_tree, wd.path / "wim"), req.spec.image_name, req.release,
                                      str(inputs.iso))
        selected = drivers.select(virtio_tree, req.release.os_id, req.disk_bus)
        _check_msi(inputs.msi)
        ctx.phase("writing the answer ISO")
        files = answer.build(virtio_tree, selected, _answer_inputs(req, inputs.msi, password), wd.path, record)
    return inputs, edition, files


def run(req: BuildRequest, out: Path, ctx: BuildContext) -> BuildOutcome:
    """Build the image at ``out``; see the module documentation."""
    record = paths.state_dir() / "windows-builds" / f"{req.recipe}-{time.strftime('%Y%m%dT%H%M%S')}"
    record.mkdir(parents=True, exist_ok=True)
    wd = WorkDir("windows-")
    password = build_password()
    try:
        inputs, edition, files = _prepare(req, ctx, wd, record, password)
        install.disk_create(out, req.disk_size)
        ctx.phase(f"installing {edition.name} ({req.release.name}) on a {req.disk_bus} disk")
        result = install.run(_plan(req, ctx, out, inputs.iso, files.iso, wd, record), ctx.phase)
        ctx.phase("checking the installed image offline")
        exp = offline.Expectation(req.release, req.disk_bus, unattend.password_forms(password))
        report = offline.check_image(str(out), "qcow2", exp, ctx.accel)
        offline.require(report, str(out))
    except BaseException:
        if not any(record.iterdir()):
            record.rmdir()
        else:
            log.warning("the record of the failed Windows build is kept in %s", record)
        raise
    finally:
        wd.cleanup()
    kept = out.parent / RECORD
    if kept.exists():
        shutil.rmtree(kept)
    shutil.move(str(record), kept)
    spec = req.spec
    facts = WindowsFacts(
        os_id=req.release.os_id, edition=edition.name, disk_bus=req.disk_bus, firmware=spec.firmware,
        secure_boot=spec.secure_boot, tpm=result.tpm_model, install_seconds=result.seconds, reboots=result.resets,
        stages=tuple(s.name for s in result.stages), drivers=files.driver_names, checks=report.passed, record=RECORD)
    return BuildOutcome(facts, inputs.manifest)
