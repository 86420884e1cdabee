"""Boot an image under QEMU and watch its serial console.

The image is attached read-only in effect (``snapshot=on``: writes go to a
throw-away overlay), with a cloud-init NoCloud seed (an ISO labelled ``cidata``
made with pycdlib) whose runcmd prints a marker, so a boot is proved both by
the login prompt and by cloud-init having run. QEMU uses the accelerator
chosen by ``imagekit.accel``; it runs as an ``imagekit.process.Process`` (its serial
console goes to a log file that is followed here), the whole run is bounded by a
timeout and QEMU is always stopped.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from imagekit import accel
from imagekit.errors import ImagekitError
from imagekit.process import Process

log = logging.getLogger("imagekit.boot")

MARKER = "IMAGEKIT-BOOT-OK"
LOGIN_RE = re.compile(r"login:\s*$", re.MULTILINE)
CLOUD_FINAL_RE = re.compile(r"Cloud-init v\. \S+ finished")


class BootError(ImagekitError):
    pass


@dataclass(frozen=True)
class BootResult:
    ok: bool
    seconds: float
    reached: tuple[str, ...]
    accel: str
    console_tail: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


MARKER_USER_DATA = (
    "#cloud-config\n"
    f"runcmd:\n  - [sh, -c, 'echo {MARKER} > /dev/ttyS0; echo {MARKER} > /dev/console']\n"
)


def nocloud_seed(path: Path, hostname: str = "imagekit-boot-test", *, user_data: str | None = None,
                 instance_id: str | None = None) -> Path:
    """A NoCloud seed ISO (volume ``cidata``) carrying ``user_data`` (default: a runcmd that echoes
    MARKER to the console) and meta-data naming the instance (default id: the host name)."""
    import pycdlib

    data_user = (user_data if user_data is not None else MARKER_USER_DATA).encode()
    meta_data = f"instance-id: {instance_id or hostname}\nlocal-hostname: {hostname}\n".encode()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, data in (("user-data", data_user), ("meta-data", meta_data)):
        iso_name = "/" + name.replace("-", "").upper()[:8] + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    iso.write(str(path))
    iso.close()
    return path


def qemu_argv(qemu: str, choice: accel.AccelChoice, drive: str, seed: Path, *, memory_mib: int = 1024,
              cpus: int = 1, network: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """QEMU's command line for a test or snapshot boot: serial console on stdout, ``drive`` (a
    ``-drive`` specification) as the virtio root disk, the NoCloud ``seed``, user-mode networking
    (``restrict=on``, no way out, unless ``network``)."""
    return [
        qemu, *accel.qemu_accel_args(choice), "-machine", "pc", "-m", str(memory_mib), "-smp", str(cpus),
        "-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio", "-monitor", "none",
        "-drive", drive,
        "-drive", f"file={seed},format=raw,if=virtio,readonly=on",
        "-netdev", "user,id=n0" + ("" if network else ",restrict=on"), "-device", "virtio-net-pci,netdev=n0",
        *extra,
    ]


def boot(image: str | os.PathLike[str], fmt: str, *, timeout: float = 600, memory_mib: int = 1024,
         wait_for: str = "cloud-init", accel_name: str | accel.AccelChoice | None = None,
         console_log: Path | None = None, user_data: str | None = None) -> BootResult:
    """Boot ``image`` (format ``fmt``) until it reaches ``wait_for``: ``login`` or ``cloud-init``.

    ``user_data`` replaces the seed's default (a runcmd echoing MARKER): it must then print
    MARKER itself for ``cloud-init`` to be reached."""
    choice = accel.resolve(accel_name)
    qemu = accel.qemu_system_binary()
    if qemu is None:
        raise BootError("qemu-system is not installed", "run 'make setup'")
    if fmt not in ("qcow2", "raw"):
        raise BootError(f"boot tests take qcow2 or raw images, not {fmt}")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imagekit-boot-") as tmp:
        seed = nocloud_seed(Path(tmp) / "seed.iso", user_data=user_data)
        argv = qemu_argv(qemu, choice, f"file={os.fspath(image)},format={fmt},if=virtio,snapshot=on", seed,
                         memory_mib=memory_mib)
        log_path = console_log or Path(tmp) / "console.log"
        if console_log is not None:
            console_log.unlink(missing_ok=True)
        with Process(argv, log_path=log_path) as proc:
            reached, text = _watch(proc, start, timeout, wait_for)
        tail = "\n".join(text.splitlines()[-30:])
    return BootResult(wait_for in reached, round(time.monotonic() - start, 1), tuple(reached), choice.accel, tail)


def _watch(proc: Process, start: float, timeout: float, wait_for: str) -> tuple[list[str], str]:
    """Follow the serial console (QEMU's log) until ``wait_for`` is reached, QEMU ends or time is up."""
    reached: list[str] = []
    buf = b""
    offset = 0
    while time.monotonic() - start < timeout:
        chunk = proc.read_log(offset)
        if not chunk:
            if not proc.running():
                break
            time.sleep(0.25)
            continue
        offset += len(chunk)
        buf = (buf + chunk)[-65536:]
        text = buf.decode(errors="replace")
        if "login" not in reached and LOGIN_RE.search(text):
            reached.append("login")
        if "cloud-init" not in reached and (MARKER in text or CLOUD_FINAL_RE.search(text)):
            reached.append("cloud-init")
        if wait_for in reached:
            break
    return reached, buf.decode(errors="replace")
