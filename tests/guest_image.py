"""A small, real Debian 12 disk image for the guestfs tests, built once and cached.

``debian_image()`` returns the path of a qcow2 image (MBR, one ext4 root
partition) holding a ``debootstrap --variant=minbase`` bookworm system with
systemd, apt, openssh-server, sudo, cloud-init and qemu-guest-agent. It does not
boot (no kernel, no boot loader) but libguestfs' inspection recognises it as
Debian 12, and its dpkg database is real, so package installs and SBOMs work.

The image is cached in ``~/.cache/imagekit-tests/`` under a name keyed by
``IMAGE_VERSION`` and reused between test runs. The build runs under
``flock /tmp/imagekit-build.lock`` (the machine has two cores; image builds are
serialised across everyone using it) and takes about two minutes cold.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

IMAGE_VERSION = "debian12-minbase-v1"
MIRROR = os.environ.get("IMAGEKIT_TEST_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
INCLUDE = ("systemd", "systemd-sysv", "apt", "openssh-server", "sudo", "cloud-init", "qemu-guest-agent",
           "ifupdown", "isc-dhcp-client",
           # debootstrap does not resolve virtual packages (python3-cryptography needs this one):
           "python3-cffi-backend")
DISK_SIZE = 1536 * 1024 * 1024
BUILD_LOCK = "/tmp/imagekit-build.lock"
DEBOOTSTRAP_TIMEOUT = 900


def cache_dir() -> Path:
    base = os.environ.get("IMAGEKIT_TEST_CACHE") or str(Path.home() / ".cache" / "imagekit-tests")
    return Path(base)


def image_path() -> Path:
    return cache_dir() / f"{IMAGE_VERSION}.qcow2"


@contextmanager
def build_lock() -> Iterator[None]:
    """The machine-wide image build lock (the same lock ``flock /tmp/imagekit-build.lock`` takes)."""
    with open(BUILD_LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: list[str], timeout: float) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-30:])
        raise RuntimeError(f"{argv[0]} failed with status {proc.returncode}:\n{tail}")


FSTAB = "# <file system> <mount point> <type> <options> <dump> <pass>\nLABEL=root / ext4 errors=remount-ro 0 1\n"
INTERFACES = "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n"


def _debootstrap(root: Path) -> None:
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(root), MIRROR],
         DEBOOTSTRAP_TIMEOUT)
    # Small and free of host state: no cached .debs or apt lists, no host name.
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / sub).glob("*"):
            if p.is_file():
                p.unlink()
    for p in (root / "var/cache/apt").glob("*.bin"):
        p.unlink()
    (root / "etc/hostname").write_text("debian-test\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)  # the host's; a cloud image has none
    (root / "etc/fstab").write_text(FSTAB)
    (root / "etc/network/interfaces").write_text(INTERFACES)
    (root / "etc/apt/sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
    # Give the image the kind of state sysprep removes, so the tests can see it go.
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "root/.bash_history").write_text("ls\n")
    (root / "var/log/imagekit-test.log").write_text("old log line\n")
    (root / "var/lib/dhcp").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dhcp/dhclient.eth0.leases").write_text("lease {}\n")


def _make_disk(tarball: Path, out: Path) -> None:
    import guestfs  # type: ignore[import-not-found,unused-ignore]

    from imagekit import accel

    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(out), str(DISK_SIZE)], 60)
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        g.set_backend("direct")
        settings = accel.guestfs_env(accel.resolve()).get("LIBGUESTFS_BACKEND_SETTINGS", "")
        g.set_backend_settings([x for x in settings.split(":") if x])
        g.add_drive_opts(str(out), format="qcow2", readonly=False)
        g.launch()
        g.part_disk("/dev/sda", "mbr")
        g.part_set_bootable("/dev/sda", 1, True)
        g.mkfs("ext4", "/dev/sda1", label="root")
        g.mount("/dev/sda1", "/")
        g.tar_in(str(tarball), "/", compress="gzip", xattrs=True, acls=True)
        g.fstrim("/")
        g.umount_all()
        g.shutdown()
    finally:
        g.close()


def build(out: Path) -> dict[str, float]:
    """Build the image into ``out`` (atomically); returns the timings of the phases."""
    out.parent.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="imagekit-test-image-", dir=out.parent) as tmp:
        root = Path(tmp) / "root"
        t = time.monotonic()
        _debootstrap(root)
        timings["debootstrap"] = time.monotonic() - t
        t = time.monotonic()
        tarball = Path(tmp) / "root.tar.gz"
        _run(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--acls", "-czf", str(tarball), "."], 600)
        shutil.rmtree(root)
        partial = out.with_name(out.name + ".partial")
        _make_disk(tarball, partial)
        timings["disk"] = time.monotonic() - t
        os.replace(partial, out)
    return timings


def debian_image() -> Path:
    """The cached test image, built first if needed (under the machine-wide build lock)."""
    path = image_path()
    if path.is_file():
        return path
    with build_lock():
        if not path.is_file():
            build(path)
    return path


if __name__ == "__main__":
    t0 = time.monotonic()
    target = image_path()
    with build_lock():
        phases = build(target)
    print(f"built {target} in {time.monotonic() - t0:.0f} s {phases}; "
          f"size {target.stat().st_size / 2**20:.0f} MiB")


try:
    import guestfs  # type: ignore[import-not-found,unused-ignore]  # noqa: F401

    HAVE_GUESTFS = True
except ImportError:
    HAVE_GUESTFS = False

#: Marks for tests that need the libguestfs appliance and the test image.
NEEDS_GUEST = [
    pytest.mark.guestfs,
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_GUESTFS, reason="the guestfs Python binding is not importable"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
    pytest.mark.skipif(shutil.which("debootstrap") is None and not image_path().is_file(),
                       reason="debootstrap is not installed and no cached test image"),
]


def dpkg_status(text: str, installed_only: bool = False) -> dict[str, dict[str, str]]:
    """An image's /var/lib/dpkg/status as {package: fields} (the tests' independent ground truth).

    ``installed_only``: only "install ok installed" entries, keyed ``name:arch``."""
    out: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        if "Package" not in fields:
            continue
        if installed_only:
            if fields.get("Status") == "install ok installed":
                out[fields["Package"] + ":" + fields.get("Architecture", "")] = fields
        else:
            out[fields["Package"]] = fields
    return out
