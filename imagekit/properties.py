"""Glance image properties: profiles from a recipe, and a linter for inconsistent sets.

``build(recipe, overrides)`` layers, lowest first:

1. the OS profile (``os_type``, ``os_distro``, ``os_version``, ``architecture``
   and the hardware defaults that suit the OS and architecture: virtio disk and
   NIC for Linux, virtio-scsi + q35 for Windows, UEFI + ``virt`` for aarch64;
   for a Windows build: the disk bus it is built on, UEFI for ``firmware: uefi``,
   ``os_secure_boot=required`` and a TPM 2.0 (``tpm-crb``) when the build has them,
   the guest agent, and ``os_admin_user`` = the user cloudbase-init creates);
2. the recipe's ``glance.properties``;
3. ``--property k=v`` from the command line;

plus imagekit's provenance (``imagekit_version``, ``imagekit_recipe``,
``imagekit_recipe_digest``) which cannot be overridden.

``lint(props, recipe)`` returns findings (``code``, ``severity``, ``property``,
``message``); ``error`` findings make ``check_lint`` raise ``PropertyLintError``
(exit 2). Enumerations follow Nova's image-property fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from imagekit import __version__
from imagekit.errors import ImagekitError, UsageError

if TYPE_CHECKING:
    from imagekit.builders.windows import WindowsBuild
    from imagekit.recipe import Recipe

Severity = Literal["error", "warning"]

# Values Nova accepts (nova/objects/fields.py), as used in Glance image properties.
ENUMS: dict[str, frozenset[str]] = {
    "os_type": frozenset({"linux", "windows"}),
    "architecture": frozenset({"x86_64", "aarch64", "i686", "ppc64le", "ppc64", "s390x", "armv7l", "riscv64",
                               "mips64el", "alpha", "sparc64"}),
    "hw_disk_bus": frozenset({"virtio", "scsi", "ide", "sata", "usb", "fdc", "lxc", "uml", "xen"}),
    "hw_cdrom_bus": frozenset({"virtio", "scsi", "ide", "sata", "usb"}),
    "hw_scsi_model": frozenset({"virtio-scsi", "lsilogic", "lsisas1068", "lsisas1078", "buslogic", "vmpvscsi",
                                "ibmvscsi"}),
    "hw_vif_model": frozenset({"virtio", "e1000", "e1000e", "igb", "ne2k_pci", "pcnet", "rtl8139", "vmxnet3",
                               "netfront", "spapr-vlan", "lan9118", "smc91c111", "sriov"}),
    "hw_firmware_type": frozenset({"bios", "uefi"}),
    "os_secure_boot": frozenset({"required", "disabled", "optional"}),
    "hw_video_model": frozenset({"vga", "cirrus", "vmvga", "xen", "qxl", "virtio", "gop", "none", "bochs"}),
    "hw_rng_model": frozenset({"virtio"}),
    "hw_input_bus": frozenset({"usb", "virtio"}),
    "hw_pointer_model": frozenset({"usbtablet"}),
    "hw_qemu_guest_agent": frozenset({"yes", "no"}),
    "os_require_quiesce": frozenset({"yes", "no"}),
    "hw_boot_menu": frozenset({"true", "false"}),
    "hw_vif_multiqueue_enabled": frozenset({"true", "false"}),
    "hw_tpm_version": frozenset({"1.2", "2.0"}),
    "hw_tpm_model": frozenset({"tpm-tis", "tpm-crb"}),
}
# Glance sets these itself (or refuses them): never as --property.
RESERVED = frozenset({
    "id", "name", "status", "visibility", "protected", "os_hidden", "owner", "size", "virtual_size", "checksum",
    "os_hash_algo", "os_hash_value", "created_at", "updated_at", "deleted", "deleted_at", "file", "schema",
    "locations", "direct_url", "self", "tags", "disk_format", "container_format", "min_ram", "min_disk", "stores",
})
RESERVED_PREFIXES = ("os_glance_",)
IMAGEKIT_KEYS = ("imagekit_version", "imagekit_recipe", "imagekit_recipe_digest")
X86_MACHINE_RE = re.compile(r"^(pc|q35|pc-i440fx-[\w.]+|pc-q35-[\w.]+|microvm)$")
ARM_MACHINE_RE = re.compile(r"^(virt|virt-[\w.]+)$")
KEY_RE = re.compile(r"^[A-Za-z0-9_:.-]{1,255}$")

# os.distro in recipes -> the os_distro value Nova/Glance document (libosinfo short ids)
DISTRO_NAMES = {
    "ubuntu": "ubuntu", "debian": "debian", "centos": "centos", "rhel": "rhel", "redhat": "rhel",
    "fedora": "fedora", "rocky": "rocky", "almalinux": "almalinux", "alma": "almalinux", "opensuse": "opensuse",
    "sles": "sles", "suse": "sles", "arch": "arch", "freebsd": "freebsd", "windows": "windows", "gentoo": "gentoo",
    "cirros": "cirros", "alpine": "alpine",
}

# The rule catalogue: code -> one-line description (``imagekit properties rules``).
RULES: dict[str, str] = {
    "P001": "os_secure_boot needs hw_firmware_type=uefi",
    "P002": "os_secure_boot needs hw_machine_type=q35 on x86_64",
    "P003": "hw_disk_bus=scsi needs hw_scsi_model=virtio-scsi",
    "P004": "a Windows image needs os_type=windows",
    "P005": "an enumerated property has an unknown value",
    "P006": "os_require_quiesce=yes needs hw_qemu_guest_agent=yes",
    "P007": "hw_qemu_guest_agent and os_require_quiesce must be 'yes' or 'no'",
    "P008": "architecture differs from the recipe's os.arch",
    "P009": "aarch64 images need hw_firmware_type=uefi",
    "P010": "hw_machine_type does not exist for the architecture",
    "P011": "a property Glance reserves for itself cannot be set",
    "P012": "property names: letters, digits, '_', ':', '.', '-' (at most 255); values at most 255 characters",
    "P013": "hw_scsi_model is set but the disk bus is not scsi (no effect)",
    "P014": "os_type=windows but os_distro is not windows",
    "P015": "Windows with hw_firmware_type=uefi should use hw_machine_type=q35",
    "P016": "os_admin_user differs from the user cloudbase-init creates in the Windows image",
    "P017": "hw_disk_bus differs from the bus the Windows image was built on (its boot-start storage driver)",
    "P018": "hw_tpm_model=tpm-crb needs hw_tpm_version=2.0",
    "P019": "a Windows 11 image needs hw_tpm_version=2.0, os_secure_boot and UEFI",
    "P020": "hw_firmware_type differs from the firmware the Windows image was installed for",
    "P021": "hw_tpm_model without hw_tpm_version: Nova adds no TPM",
    "P022": "zstd-compressed qcow2 output: QEMU before 5.1 and non-QEMU hypervisors cannot read it",
}


class PropertyLintError(ImagekitError):
    """Properties that contradict each other or use unknown values. ``problems`` lists each finding."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None,
                 findings: list[Finding] | None = None) -> None:
        super().__init__(message, hint)
        self.problems = list(problems or [])
        self.findings = list(findings or [])

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d["problems"] = self.problems
        d["findings"] = [f.to_dict() for f in self.findings]
        return d


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    property: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.code} {self.property}: {self.message}"


# ---------------------------------------------------------------- profiles


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``k=v`` strings (from --property) to a mapping; an empty value is kept (explicitly empty)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"bad property {item!r}: expected KEY=VALUE", "example: --property hw_disk_bus=virtio")
        out[key] = value.strip()
    return out


def profile(recipe: Recipe) -> dict[str, str]:
    """Properties that follow from the recipe's ``os`` (and Windows firmware) alone."""
    from imagekit.builders.windows import WindowsBuild

    os_ = recipe.os
    distro = DISTRO_NAMES.get(os_.distro.lower(), os_.distro.lower())
    props: dict[str, str] = {
        "os_type": os_.type,
        "os_distro": distro,
        "os_version": str(os_.version),
        "architecture": os_.arch,
    }
    if os_.type == "windows":
        props.update(hw_disk_bus="scsi", hw_scsi_model="virtio-scsi", hw_vif_model="virtio", hw_machine_type="q35")
        if isinstance(recipe.build, WindowsBuild):
            props.update(_windows_build_profile(recipe.build))
            if props["hw_disk_bus"] != "scsi":
                del props["hw_scsi_model"]
    else:
        props.update(hw_disk_bus="virtio", hw_vif_model="virtio")
    if os_.arch == "aarch64":
        props.update(hw_firmware_type="uefi", hw_machine_type="virt")
    return props


def _windows_build_profile(spec: WindowsBuild) -> dict[str, str]:
    """What a Windows build makes true of its image."""
    out = {"hw_qemu_guest_agent": "yes", "os_admin_user": spec.cloudbase_init.user}
    if spec.disk_bus is not None:
        out["hw_disk_bus"] = spec.disk_bus
    if spec.firmware == "uefi":
        out["hw_firmware_type"] = "uefi"
    if spec.secure_boot:
        out["os_secure_boot"] = "required"
    if spec.tpm:
        out.update(hw_tpm_version="2.0", hw_tpm_model="tpm-crb")
    return out


def provenance(recipe: Recipe | None) -> dict[str, str]:
    out = {"imagekit_version": __version__}
    if recipe is not None:
        out["imagekit_recipe"] = recipe.name
        if recipe.digest:
            out["imagekit_recipe_digest"] = recipe.digest
    return out


def build(recipe: Recipe | None = None, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full property set: OS profile < recipe glance.properties < overrides, plus provenance.

    An override with an empty value removes the property.
    """
    props: dict[str, str] = {}
    if recipe is not None:
        props.update(profile(recipe))
        props.update({k: str(v) for k, v in recipe.glance.properties.items()})
    for k, v in (overrides or {}).items():
        if v == "":
            props.pop(k, None)
        else:
            props[k] = str(v)
    props.update(provenance(recipe))
    return props


# ---------------------------------------------------------------- linter


class _Props:
    """The property set as the rules read it: values stripped, None when absent."""

    def __init__(self, props: Mapping[str, str], recipe: Recipe | None) -> None:
        self.items = props
        self.recipe = recipe

    def __getitem__(self, key: str) -> str | None:
        v = self.items.get(key)
        return None if v is None else str(v).strip()

    def machine_is_q35(self) -> bool:
        machine = self["hw_machine_type"]
        return machine is not None and (machine == "q35" or machine.startswith("pc-q35"))


Rule = Callable[[_Props], Iterator[Finding]]


def _names(p: _Props) -> Iterator[Finding]:
    """P011 / P012: reserved and malformed names, values too long."""
    for key, value in p.items.items():
        if key in IMAGEKIT_KEYS:
            continue
        if key in RESERVED or key.startswith(RESERVED_PREFIXES):
            yield Finding("P011", "error", key, "Glance sets this itself; it cannot be given as a property"
                          + (" (use the upload options instead)" if key in _UPLOAD_OPTIONS else ""))
        elif not KEY_RE.match(key):
            yield Finding("P012", "error", key,
                          "invalid property name (letters, digits, '_', ':', '.', '-'; at most 255)")
        if len(str(value)) > 255:
            yield Finding("P012", "error", key, f"value is {len(str(value))} characters long (at most 255)")


_UPLOAD_OPTIONS = ("visibility", "protected", "min_ram", "min_disk", "tags", "name", "disk_format")


def _enums(p: _Props) -> Iterator[Finding]:
    """P005 / P007: enumerations."""
    for key, allowed in ENUMS.items():
        v = p[key]
        if v is None or v in allowed:
            continue
        if key in ("hw_qemu_guest_agent", "os_require_quiesce"):
            yield Finding("P007", "error", key, f"'{v}' is not 'yes' or 'no'")
        else:
            yield Finding("P005", "error", key, f"unknown value '{v}' (expected one of: {', '.join(sorted(allowed))})")


def _machine(p: _Props) -> Iterator[Finding]:
    """P010: the machine type exists for the architecture."""
    arch, machine = p["architecture"], p["hw_machine_type"]
    if machine is None:
        return
    if arch in (None, "x86_64", "i686") and not X86_MACHINE_RE.match(machine):
        yield Finding("P010", "error", "hw_machine_type",
                      f"'{machine}' is not an x86 machine type (pc, q35, pc-q35-*, pc-i440fx-*)")
    elif arch == "aarch64" and not ARM_MACHINE_RE.match(machine):
        yield Finding("P010", "error", "hw_machine_type", f"'{machine}' is not an aarch64 machine type (virt, virt-*)")


def _secure_boot(p: _Props) -> Iterator[Finding]:
    """P001 / P002: secure boot needs UEFI, and q35 on x86_64."""
    secure, firmware = p["os_secure_boot"], p["hw_firmware_type"]
    if secure not in ("required", "optional"):
        return
    if firmware != "uefi":
        yield Finding("P001", "error", "os_secure_boot",
                      f"os_secure_boot={secure} needs hw_firmware_type=uefi (it is {firmware or 'unset'})")
    if p["architecture"] in (None, "x86_64") and not p.machine_is_q35():
        yield Finding("P002", "error", "os_secure_boot",
                      f"os_secure_boot={secure} needs hw_machine_type=q35 (it is {p['hw_machine_type'] or 'unset'})")


def _scsi(p: _Props) -> Iterator[Finding]:
    """P003 / P013: the SCSI bus and its model."""
    bus, scsi_model = p["hw_disk_bus"], p["hw_scsi_model"]
    if bus == "scsi" and scsi_model != "virtio-scsi":
        yield Finding("P003", "error", "hw_scsi_model",
                      f"hw_disk_bus=scsi needs hw_scsi_model=virtio-scsi (it is {scsi_model or 'unset'}): "
                      "without it the guest gets an emulated LSI controller")
    if scsi_model is not None and bus not in ("scsi", None):
        yield Finding("P013", "warning", "hw_scsi_model",
                      f"hw_scsi_model is set but hw_disk_bus is {bus}: it has no effect")


def _windows(p: _Props) -> Iterator[Finding]:
    """P004 / P014 / P015: Windows."""
    distro, os_type = p["os_distro"], p["os_type"]
    windows = distro == "windows" or (p.recipe is not None and p.recipe.os.type == "windows")
    if windows and os_type != "windows":
        yield Finding("P004", "error", "os_type",
                      f"a Windows image needs os_type=windows (it is {os_type or 'unset'}): Nova then sets the "
                      "clock to localtime and Hyper-V enlightenments")
    if os_type == "windows" and distro not in (None, "windows"):
        yield Finding("P014", "warning", "os_distro", f"os_type=windows but os_distro is '{distro}'")
    machine = p["hw_machine_type"]
    if windows and p["hw_firmware_type"] == "uefi" and machine is not None and not p.machine_is_q35():
        yield Finding("P015", "warning", "hw_machine_type", f"Windows with UEFI boots best with q35, not {machine}")


def _tpm(p: _Props) -> Iterator[Finding]:
    """P018 / P021: TPM model and version as Nova accepts them."""
    version, model = p["hw_tpm_version"], p["hw_tpm_model"]
    if model == "tpm-crb" and version not in (None, "2.0"):
        yield Finding("P018", "error", "hw_tpm_model", f"tpm-crb is a TPM 2.0 interface: hw_tpm_version is {version}")
    if model is not None and version is None:
        yield Finding("P021", "warning", "hw_tpm_model",
                      "hw_tpm_model is set but hw_tpm_version is not: Nova adds no TPM without a version")


def _windows_build(p: _Props) -> Iterator[Finding]:
    """P016 / P017 / P019 / P020: what a Windows image built by imagekit needs of its properties."""
    from imagekit.builders.windows import WindowsBuild, disk_bus

    recipe = p.recipe
    if recipe is None or not isinstance(recipe.build, WindowsBuild):
        return
    spec = recipe.build
    admin = p["os_admin_user"]
    if (admin or "Administrator") != spec.cloudbase_init.user:
        yield Finding("P016", "error", "os_admin_user",
                      f"os_admin_user is {admin or 'unset (Nova uses Administrator)'} but cloudbase-init creates "
                      f"'{spec.cloudbase_init.user}': Nova would set the password of the wrong account")
    built = disk_bus(recipe)
    if (p["hw_disk_bus"] or "virtio") != built:
        yield Finding("P017", "error", "hw_disk_bus",
                      f"hw_disk_bus is {p['hw_disk_bus'] or 'unset (Nova picks virtio)'} but the image was built on "
                      f"{built}: Windows would not find its boot disk (INACCESSIBLE_BOOT_DEVICE)")
    firmware = p["hw_firmware_type"] or "bios"
    if firmware != spec.firmware:
        yield Finding("P020", "error", "hw_firmware_type",
                      f"hw_firmware_type is {firmware} but Windows was installed for {spec.firmware} "
                      f"({'GPT and an EFI system partition' if spec.firmware == 'uefi' else 'MBR'}): it would not boot")
    if spec.release(recipe.os.version).needs_tpm and not (
            p["hw_tpm_version"] == "2.0" and p["os_secure_boot"] in ("required", "optional") and firmware == "uefi"):
        yield Finding("P019", "warning", "hw_tpm_version",
                      "Windows 11 expects a TPM 2.0 and Secure Boot: set hw_tpm_version=2.0 and os_secure_boot")


def _quiesce(p: _Props) -> Iterator[Finding]:
    """P006: quiesce needs the agent."""
    if p["os_require_quiesce"] == "yes" and p["hw_qemu_guest_agent"] != "yes":
        yield Finding("P006", "error", "os_require_quiesce",
                      "os_require_quiesce=yes needs hw_qemu_guest_agent=yes: snapshots would fail without the agent")


def _architecture(p: _Props) -> Iterator[Finding]:
    """P008 / P009: the recipe's architecture, UEFI on aarch64."""
    arch, firmware = p["architecture"], p["hw_firmware_type"]
    if p.recipe is not None and arch is not None and arch != p.recipe.os.arch:
        yield Finding("P008", "error", "architecture", f"architecture={arch} but the recipe builds {p.recipe.os.arch}")
    if arch == "aarch64" and firmware != "uefi":
        yield Finding("P009", "error", "hw_firmware_type",
                      f"aarch64 guests boot with UEFI only (hw_firmware_type is {firmware or 'unset'})")


def _compression(p: _Props) -> Iterator[Finding]:
    """P022: zstd clusters need QEMU >= 5.1 on every hypervisor that boots the image."""
    if p.recipe is not None and p.recipe.output.format == "qcow2" and p.recipe.output.compression == "zstd":
        yield Finding("P022", "warning", "disk_format",
                      "the recipe's qcow2 output is zstd-compressed: hypervisors with QEMU older than 5.1 (and "
                      "Glance's image inspector in some releases) cannot read it; zlib works everywhere")


RULE_CHECKS: tuple[Rule, ...] = (_names, _enums, _machine, _secure_boot, _scsi, _windows, _windows_build, _tpm,
                                 _quiesce, _architecture, _compression)


def lint(props: Mapping[str, str], recipe: Recipe | None = None) -> list[Finding]:
    """Every inconsistency in ``props`` (and against ``recipe``), errors first."""
    p = _Props(props, recipe)
    out = [f for rule in RULE_CHECKS for f in rule(p)]
    out.sort(key=lambda f: (f.severity != "error", f.code, f.property))
    return out


def check_lint(props: Mapping[str, str], recipe: Recipe | None = None) -> list[Finding]:
    """Lint and raise PropertyLintError when there is an error; returns the warnings."""
    findings = lint(props, recipe)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        n = len(errors)
        raise PropertyLintError(
            f"{n} inconsistent image propert{'ies' if n != 1 else 'y'}",
            "fix the recipe's glance.properties or the --property options; "
            "'imagekit properties lint' shows every rule",
            [str(f) for f in errors], findings,
        )
    return findings
