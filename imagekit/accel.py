"""Choosing the accelerator for every VM imagekit starts (guestfs appliance, QEMU boots).

``kvm`` and ``tcg`` are taken as asked. ``auto`` (the default, or ``IMAGEKIT_ACCEL``)
uses KVM only when a short, bounded probe shows a KVM guest really runs code: on
nested virtualisation ``/dev/kvm`` can exist while every guest hangs right after
the BIOS. The probe boots the host's Linux kernel (no root disk) and waits for its
first console line; without a readable kernel it boots a 512-byte boot sector
that prints a marker. If nothing arrives within the probe timeout, imagekit
falls back to TCG and says why, once. The result is cached per boot, kernel,
QEMU binary and ``/dev/kvm`` identity.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from imagekit import paths
from imagekit.errors import UsageError
from imagekit.process import Process

log = logging.getLogger("imagekit.accel")

Accel = Literal["kvm", "tcg"]
CHOICES = ("auto", "kvm", "tcg")
PROBE_TIMEOUT = 10.0
PROBE_MARKER = b"IMAGEKIT-PROBE-OK"
KERNEL_MARKERS = (b"Linux version", b"KASLR", b"Decompressing", PROBE_MARKER)

# x86 real-mode boot sector: cli; xor ax,ax; mov ds,ax; cld; mov dx,0x3f8;
# mov si,msg; print loop (lodsb/out); mov dx,0xf4; mov al,0; out dx,al; hlt; jmp $-1
_CODE = bytes.fromhex("fa31c08ed8fcbaf803be1d7cac84c07403eeebf8baf400b000eef4ebfd")
BOOT_SECTOR = (_CODE + PROBE_MARKER + b"\r\n\x00").ljust(510, b"\x00") + b"\x55\xaa"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    requested: str
    reason: str
    probed: bool = False
    cached: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def qemu_system_binary() -> str | None:
    machine = platform.machine()
    name = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}.get(machine, f"qemu-system-{machine}")
    return shutil.which(name)


def probe_kernel() -> str | None:
    """A Linux kernel to boot as the probe guest: the running one, else the newest in /boot."""
    release = platform.release()
    for cand in (f"/boot/vmlinuz-{release}", "/vmlinuz"):
        if os.access(cand, os.R_OK):
            return cand
    found = sorted(Path("/boot").glob("vmlinuz-*")) if Path("/boot").is_dir() else []
    readable = [str(p) for p in found if os.access(p, os.R_OK)]
    return readable[-1] if readable else None


def probe_guest(accel: Accel, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot a probe guest under ``accel``; return (worked, explanation).

    The probe boots a real Linux kernel (no root disk) when one is readable and
    waits for its first console line, because on broken nested KVM a real-mode
    boot sector runs while a kernel hangs in its decompressor. Without a kernel,
    a 512-byte boot sector that prints a marker is used instead.
    """
    qemu = qemu_system_binary()
    if qemu is None:
        return False, "qemu-system is not installed"
    kernel = probe_kernel()
    with tempfile.TemporaryDirectory(prefix="imagekit-probe-") as tmp:
        argv = [
            qemu, "-accel", accel, "-machine", "pc", "-m", "256", "-display", "none", "-nodefaults",
            "-no-reboot", "-serial", "stdio", "-monitor", "none",
        ]
        if kernel:
            argv += ["-kernel", kernel, "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]
            markers: tuple[bytes, ...] = KERNEL_MARKERS
            what = f"kernel {os.path.basename(os.path.realpath(kernel))}"
        else:
            disk = Path(tmp) / "probe.img"
            disk.write_bytes(BOOT_SECTOR)
            argv += [
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-drive", f"file={disk},format=raw,if=ide,index=0,media=disk", "-boot", "c",
            ]
            markers = (PROBE_MARKER,)
            what = "boot sector"
        start = time.monotonic()
        with Process(argv, log_path=Path(tmp) / "console.log", stop_timeout=1.0) as proc:
            seen = _wait_for_markers(proc, markers, start, timeout)
            if seen:
                elapsed = time.monotonic() - start
                return True, f"a {accel.upper()} probe guest ({what}) ran in {elapsed:.1f} s"
            ended = proc.poll()
            if ended is not None and time.monotonic() - start < timeout:
                lines = proc.log_tail(5).strip().splitlines()
                detail = lines[-1] if lines else f"exit status {ended}"
                return False, f"{accel.upper()} probe failed: {detail}"
        return False, f"a {accel.upper()} guest ({what}) printed nothing within {timeout:g} s (it hangs after the BIOS)"


def _wait_for_markers(proc: Process, markers: tuple[bytes, ...], start: float, timeout: float) -> bool:
    """Poll the probe's console until a marker shows, the guest ends or ``timeout`` passes."""
    seen = b""
    offset = 0
    while time.monotonic() - start < timeout:
        chunk = proc.read_log(offset, 65536)
        if chunk:
            offset += len(chunk)
            seen = (seen + chunk)[-8192:]
            if any(m in seen for m in markers):
                return True
            continue
        if not proc.running():
            return False
        time.sleep(0.1)
    return False


def _kvm_identity() -> str | None:
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return None
    return f"{st.st_rdev}:{st.st_ino}"


def _cache_key() -> str:
    qemu = qemu_system_binary() or "-"
    try:
        qst = os.stat(qemu)
        qid = f"{qemu}:{qst.st_size}:{int(qst.st_mtime)}"
    except OSError:
        qid = qemu
    boot_id = ""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    return f"{platform.release()}|{boot_id}|{qid}|{_kvm_identity()}"


def _kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


_said: set[str] = set()
_memo: dict[str, AccelChoice] = {}


def _say_once(choice: AccelChoice) -> None:
    if choice.requested == "auto" and choice.accel == "tcg" and choice.reason not in _said:
        _said.add(choice.reason)
        level = logging.INFO if choice.cached else logging.WARNING
        log.log(level, "using TCG (software emulation): %s", choice.reason)


def resolve(requested: str | AccelChoice | None = None, *, use_cache: bool = True) -> AccelChoice:
    """The accelerator to use for ``requested`` (default: ``IMAGEKIT_ACCEL`` or ``auto``).

    An ``AccelChoice`` (resolved once by the caller, e.g. the CLI) is returned as it is, so
    library functions take either and never resolve twice.
    """
    if isinstance(requested, AccelChoice):
        return requested
    req = (requested or os.environ.get("IMAGEKIT_ACCEL") or "auto").strip().lower()
    if req not in CHOICES:
        raise UsageError(f"unknown accelerator '{req}'", "use one of: auto, kvm, tcg (option --accel or IMAGEKIT_ACCEL)")
    if req == "tcg":
        return AccelChoice("tcg", req, "asked for TCG")
    if req == "kvm":
        bad = _kvm_unusable_reason()
        if bad:
            raise UsageError(f"KVM was asked for but {bad}", "use --accel tcg or --accel auto")
        return AccelChoice("kvm", req, "asked for KVM")
    if req in _memo and use_cache:
        return _memo[req]
    bad = _kvm_unusable_reason()
    if bad:
        choice = AccelChoice("tcg", req, bad)
    else:
        choice = _probe_cached(use_cache)
    _memo[req] = choice
    _say_once(choice)
    return choice


def _probe_cached(use_cache: bool) -> AccelChoice:
    cache = paths.cache_dir() / "accel.json"
    key = _cache_key()
    if use_cache:
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key and data.get("accel") in ("kvm", "tcg"):
                return AccelChoice(data["accel"], "auto", data["reason"], probed=True, cached=True)
        except (OSError, ValueError, AttributeError):
            pass
    ok, why = probe_guest("kvm")
    choice = AccelChoice("kvm" if ok else "tcg", "auto", f"KVM probe: {why}", probed=True)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "accel": choice.accel, "reason": choice.reason}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return choice


def qemu_accel_args(choice: AccelChoice) -> list[str]:
    """QEMU options for the chosen accelerator (TCG gets a larger translation cache)."""
    if choice.accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,tb-size=256", "-cpu", "max"]


def guestfs_env(choice: AccelChoice) -> dict[str, str]:
    """Environment for libguestfs so its appliance uses the same accelerator."""
    if choice.accel == "tcg":
        return {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
    return {}
