"""The answer ISO: everything the unattended install reads, on one CD-ROM.

Layout (Joliet names; the ISO's volume label is ``IMAGEKIT``)::

    autounattend.xml                       Setup finds it at the root of any drive
    $WinPEDriver$\\viostor, vioscsi, NetKVM  storage and network drivers for Setup itself
    drivers\\vioserial, Balloon, viorng, pvpanic
    imagekit\\provision.ps1                 run at the first log-on
    imagekit\\user.ps1                      the recipe's extra PowerShell (when there is some)
    imagekit\\CloudbaseInitSetup.msi
    imagekit\\qemu-ga-x86_64.msi
    imagekit\\cloudbase-init\\cloudbase-init.conf, cloudbase-init-unattend.conf

The ISO holds the build password (in the answer file) and lives in the build's work
folder, which is removed when the build ends. What is kept for the record (``keep``) is
the same files without the drivers and MSIs, the answer file with the password masked.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from imagekit.windows import cbinit, drivers, provision, unattend
from imagekit.windows.isofs import Tree, write_answer_iso

KEPT = ("autounattend.xml", "provision.ps1", "user.ps1", "cloudbase-init.conf", "cloudbase-init-unattend.conf")


@dataclass(frozen=True)
class AnswerInputs:
    unattend: unattend.UnattendOptions
    provision: provision.ProvisionOptions
    msi: Path
    user_script: str | None = None


@dataclass(frozen=True)
class AnswerFiles:
    iso: Path
    kept: tuple[str, ...]  # file names in the keep folder
    driver_names: tuple[str, ...]


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def build(virtio: Tree, selected: drivers.DriverSet, inputs: AnswerInputs, work: Path, keep: Path) -> AnswerFiles:
    """Stage the files under ``work/answer``, write ``work/answer.iso``, keep the readable ones in ``keep``."""
    root = work / "answer"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    pe_folders = drivers.stage(virtio, selected, root)
    opts = replace(inputs.unattend, driver_folders=tuple(pe_folders))
    xml = unattend.render(opts)
    cb = inputs.provision.cloudbase
    files: dict[str, str | bytes] = {
        "autounattend.xml": xml,
        "imagekit/provision.ps1": provision.script(inputs.provision),
        "imagekit/cloudbase-init/cloudbase-init.conf": cbinit.service_conf(cb),
        "imagekit/cloudbase-init/cloudbase-init-unattend.conf": cbinit.unattend_conf(cb),
    }
    if inputs.user_script is not None:
        files[f"imagekit/{provision.USER_SCRIPT}"] = inputs.user_script.replace("\r\n", "\n").replace("\n", "\r\n")
    for rel, data in files.items():
        _write(root / rel, data)
    shutil.copyfile(inputs.msi, root / "imagekit" / provision.MSI_NAME)
    iso = work / "answer.iso"
    write_answer_iso(root, iso)
    keep.mkdir(parents=True, exist_ok=True)
    kept = []
    for rel, data in files.items():
        name = rel.rsplit("/", 1)[-1]
        if name == "autounattend.xml":
            data = unattend.masked(xml, opts.admin_password)
        _write(keep / name, data)
        kept.append(name)
    shutil.rmtree(root)
    return AnswerFiles(iso, tuple(kept), selected.names())
