"""``imagekit doctor``: what this host has, what works, and what imagekit will use."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field

from imagekit import accel, host
from imagekit.errors import ImagekitError
from imagekit.run import run, version_of

GUESTFS_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Tool:
    name: str
    purpose: str
    required: bool
    path: str | None
    version: str | None

    @property
    def ok(self) -> bool:
        return self.path is not None


@dataclass
class Report:
    tools: list[Tool] = field(default_factory=list)
    python: dict[str, str | None] = field(default_factory=dict)
    accelerator: dict[str, object] = field(default_factory=dict)
    device_mapper: bool = False
    appliance: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "tools": [asdict(t) | {"ok": t.ok} for t in self.tools],
            "python": self.python,
            "accelerator": self.accelerator,
            "device_mapper": self.device_mapper,
            "appliance": self.appliance,
            "problems": self.problems,
        }


# (program, version argv, purpose, required)
TOOLS: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    ("qemu-img", ("--version",), "inspect and convert images", True),
    ("qemu-system-x86_64", ("--version",), "boot images, KVM probe", True),
    ("disk-image-create", ("--version",), "diskimage-builder builds", False),
    ("guestfish", ("--version",), "libguestfs (offline customisation)", False),
    ("sfdisk", ("--version",), "partition tables", False),
    ("losetup", ("--version",), "loop devices for DIB without device-mapper", False),
    ("sudo", ("--version",), "diskimage-builder calls sudo", False),
    ("debootstrap", ("--version",), "Debian/Ubuntu DIB builds", False),
    ("xorriso", ("-version",), "ISO images", False),
)

PY_PACKAGES = ("click", "pydantic", "rich", "oslo.utils", "python-glanceclient", "keystoneauth1",
               "openstacksdk", "diskimage-builder", "pycdlib")


def _bin_dirs() -> list[str]:
    """PATH plus the directory of the running interpreter (the venv's bin/)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    venv_bin = os.path.dirname(sys.executable)
    return [venv_bin] + [d for d in dirs if d != venv_bin]


def find_program(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join(_bin_dirs()))


def check_appliance(choice: accel.AccelChoice, timeout: float = 300) -> dict[str, object]:
    """Launch the libguestfs appliance once (scratch disk) under the chosen accelerator."""
    code = (
        "import guestfs, time; t=time.monotonic(); g=guestfs.GuestFS(python_return_dict=True); "
        "g.add_drive_scratch(16*1024*1024); g.launch(); v=g.version(); g.shutdown(); g.close(); "
        "print('%d.%d.%d %.1f' % (v['major'], v['minor'], v['release'], time.monotonic()-t))"
    )
    env = {"LIBGUESTFS_BACKEND": "direct", **accel.guestfs_env(choice)}
    try:
        res = run([GUESTFS_PYTHON, "-c", code], timeout=timeout, env=env, check=False)
    except ImagekitError as exc:
        return {"ok": False, "error": exc.message}
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        return {"ok": False, "error": lines[-1] if lines else f"exit status {res.returncode}"}
    version, secs = res.stdout.split()[-2:]
    return {"ok": True, "libguestfs": version, "launch_seconds": float(secs), "accel": choice.accel}


def diagnose(appliance: bool = True, probe_cache: bool = True, requested: str | None = None) -> Report:
    rep = Report()
    for name, vargs, purpose, required in TOOLS:
        path = find_program(name)
        version = version_of([path, *vargs]) if path else None
        rep.tools.append(Tool(name, purpose, required, path, version))
        if required and path is None:
            rep.problems.append(f"{name} is missing ({purpose}): run 'make setup'")
    for pkg in PY_PACKAGES:
        try:
            rep.python[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            rep.python[pkg] = None
    try:
        import guestfs  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401

        rep.python["guestfs (binding)"] = "importable"
    except ImportError:
        rep.python["guestfs (binding)"] = None
    rep.device_mapper = host.has_device_mapper()
    choice = accel.resolve(requested, use_cache=probe_cache)
    rep.accelerator = choice.to_dict()
    env_req = os.environ.get("IMAGEKIT_ACCEL")
    if env_req:
        rep.accelerator["configured"] = env_req
    if appliance:
        rep.appliance = check_appliance(choice)
        if not rep.appliance.get("ok"):
            rep.problems.append(f"the libguestfs appliance does not start: {rep.appliance.get('error')}")
    else:
        rep.appliance = {"ok": None, "skipped": True}
    return rep
