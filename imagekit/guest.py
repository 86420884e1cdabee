"""Offline access to a guest's disk: one libguestfs appliance per session.

``open_image(path, readonly=..., fmt=...)`` launches the libguestfs appliance on
one disk image and returns a :class:`GuestSession` (a context manager). The
session:

* always gives libguestfs the image format explicitly (``format=``): libguestfs
  never probes it (a raw image whose content looks like qcow2 must not be opened
  as qcow2, or a guest could point us at host files as its backing file);
* uses the ``direct`` backend and the accelerator from :func:`imagekit.accel.resolve`
  (TCG adds ``force_tcg``), so a broken nested KVM cannot hang it;
* bounds the launch (``launch_timeout``, default 300 s) and every guest command
  with a watchdog that kills the appliance when it overruns;
* inspects the guest and mounts its filesystems the way virt-customize does
  (shortest mountpoint first), read-only when the session is;
* ALWAYS shuts the appliance down and closes the handle when it ends, on
  success, on error and on Ctrl-C.

Launching the appliance costs ~15-20 s under TCG: share a session for all the
work done on one image.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagekit import accel as accel_mod
from imagekit.errors import ImagekitError
from imagekit.specs import parse_duration  # noqa: F401 - re-exported

log = logging.getLogger("imagekit.guest")

LAUNCH_TIMEOUT = 300.0
# Time the appliance gets beyond a command's own timeout (the guest-side ``timeout``
# fires first; this watchdog only catches an appliance that stopped answering).
WATCHDOG_GRACE = 60.0
FORMATS = ("qcow2", "raw")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class GuestError(ImagekitError):
    """The guest image cannot be opened, inspected or changed as asked."""


@dataclass(frozen=True)
class CommandResult:
    """What a command run inside the guest did: exit status and combined stdout+stderr."""

    status: int
    output: str
    duration: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.timed_out


@dataclass(frozen=True)
class Account:
    """A user account read from the guest's /etc/passwd."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


def _import_guestfs() -> types.ModuleType:
    try:
        import guestfs  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError as exc:
        raise GuestError(
            "the libguestfs Python binding (module 'guestfs') cannot be imported",
            "install Debian's python3-guestfs and run imagekit with /usr/bin/python3 "
            "or a venv made from it with --system-site-packages ('make setup' does this)",
        ) from exc
    return guestfs  # type: ignore[no-any-return,unused-ignore]


def _child_qemu_pids() -> list[int]:
    """QEMU processes that are children of this process (the appliance, direct backend)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me and comm.startswith("qemu"):
            found.append(int(entry))
    return found


class GuestSession:
    """An open, launched, inspected and mounted guest image. Use :func:`open_image`."""

    def __init__(self, path: str, fmt: str, readonly: bool, network: bool, choice: accel_mod.AccelChoice) -> None:
        self.path = path
        self.fmt = fmt
        self.readonly = readonly
        self.network = network
        self.accel = choice
        self.g: Any = None
        self.root: str = ""
        self.mounts: list[tuple[str, str]] = []  # (mountpoint, device), in mount order
        self.launch_seconds = 0.0
        self._pid: int | None = None
        self._dead = False

    # ------------------------------------------------------------ lifecycle

    def _launch(self, launch_timeout: float, discard: bool) -> None:
        guestfs = _import_guestfs()
        g = guestfs.GuestFS(python_return_dict=True)
        self.g = g
        # The handle's own settings, not the environment: the direct backend (no libvirt) and
        # the accelerator imagekit chose (force_tcg under TCG).
        g.set_backend("direct")
        settings = accel_mod.guestfs_env(self.accel).get("LIBGUESTFS_BACKEND_SETTINGS", "")
        g.set_backend_settings([x for x in settings.split(":") if x])
        g.set_network(self.network)
        g.set_autosync(True)
        opts: dict[str, Any] = {"readonly": self.readonly, "format": self.fmt}
        if discard and not self.readonly:
            opts["discard"] = "besteffort"
        try:
            g.add_drive_opts(self.path, **opts)
        except RuntimeError as exc:
            raise GuestError(f"cannot add {self.path} to the appliance: {exc}",
                             "check that the file exists and is readable") from exc
        log.info("launching the libguestfs appliance (%s) on %s", self.accel.accel.upper(), self.path)
        start = time.monotonic()
        with self._watchdog(launch_timeout, use_children=True) as fired:
            try:
                g.launch()
            except RuntimeError as exc:
                if fired.is_set():
                    raise GuestError(
                        f"the libguestfs appliance did not start within {launch_timeout:g} s and was stopped",
                        "run 'imagekit doctor'; with a hanging KVM use --accel tcg "
                        "(libguestfs-test-tool shows the appliance's boot log)",
                    ) from exc
                raise GuestError(
                    f"the libguestfs appliance failed to start: {_first_line(exc)}",
                    "run 'imagekit doctor' or libguestfs-test-tool to see why",
                ) from exc
        self.launch_seconds = time.monotonic() - start
        try:
            self._pid = g.get_pid()
        except RuntimeError:
            self._pid = None
        log.info("appliance up in %.1f s", self.launch_seconds)

    def _inspect_and_mount(self) -> None:
        g = self.g
        try:
            roots = g.inspect_os()
        except RuntimeError as exc:
            raise GuestError(f"inspecting {self.path} failed: {_first_line(exc)}") from exc
        if not roots:
            raise GuestError(
                f"no operating system was found in {self.path}",
                "the image must hold an installed OS (a root filesystem libguestfs recognises); "
                "an empty, encrypted or data-only disk cannot be customised",
            )
        if len(roots) > 1:
            raise GuestError(
                f"{self.path} holds {len(roots)} operating systems ({', '.join(roots)})",
                "multi-boot images are not supported: customise a disk with a single OS",
            )
        self.root = roots[0]
        self._mount_all()

    def _mount_all(self) -> None:
        """Mount the root's filesystems, shortest mountpoint first (so / comes before /boot)."""
        mps = self.g.inspect_get_mountpoints(self.root)
        for mp, dev in sorted(mps.items(), key=lambda kv: len(kv[0])):
            try:
                if self.readonly:
                    self.g.mount_ro(dev, mp)
                else:
                    self.g.mount(dev, mp)
                self.mounts.append((mp, dev))
            except RuntimeError as exc:
                if mp == "/":
                    raise GuestError(f"cannot mount the root filesystem {dev}: {_first_line(exc)}") from exc
                log.warning("%s (%s) could not be mounted: %s", mp, dev, _first_line(exc))

    def close(self) -> None:
        """Unmount, shut the appliance down and close the handle (never raises)."""
        g, self.g = self.g, None
        if g is None:
            return
        try:
            if not self._dead:
                if not self.readonly:
                    g.umount_all()
                g.shutdown()
        except RuntimeError as exc:
            log.warning("appliance shutdown: %s", _first_line(exc))
        except BaseException:
            g.close()
            raise
        g.close()

    def __enter__(self) -> GuestSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unmount_all(self) -> None:
        self.g.umount_all()

    def remount(self) -> None:
        """Mount the guest's filesystems again (after :meth:`unmount_all`)."""
        self.mounts = []
        self._mount_all()

    # ------------------------------------------------------------ watchdog

    @contextmanager
    def _watchdog(self, seconds: float, use_children: bool = False) -> Iterator[threading.Event]:
        """Kill the appliance if the block runs longer than ``seconds``; the event says it fired."""
        fired = threading.Event()
        finished = threading.Event()

        def watch() -> None:
            if finished.wait(seconds):
                return
            fired.set()
            self._dead = True
            killed: set[int] = set()
            # Keep at it until the call returns: the appliance may not have been started yet.
            while not finished.is_set():
                pids = _child_qemu_pids() if use_children or self._pid is None else [self._pid]
                for pid in pids:
                    if pid not in killed:
                        log.warning("appliance (pid %d) overran %g s: killing it", pid, seconds)
                    killed.add(pid)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                finished.wait(0.2)

        thread = threading.Thread(target=watch, name="imagekit-guest-watchdog", daemon=True)
        thread.start()
        try:
            yield fired
        finally:
            finished.set()
            thread.join(timeout=5)

    # ------------------------------------------------------------ facts

    def info(self, key: str) -> Any:
        """``inspect_get_KEY(root)``, None when libguestfs does not know it."""
        try:
            return getattr(self.g, f"inspect_get_{key}")(self.root)
        except RuntimeError:
            return None

    @property
    def os_type(self) -> str:
        return str(self.info("type") or "unknown")

    @property
    def distro(self) -> str:
        return str(self.info("distro") or "unknown")

    @property
    def package_management(self) -> str:
        return str(self.info("package_management") or "unknown")

    @property
    def package_format(self) -> str:
        return str(self.info("package_format") or "unknown")

    # ------------------------------------------------------------ files

    def exists(self, path: str) -> bool:
        return bool(self.g.exists(path))

    def is_file(self, path: str) -> bool:
        return bool(self.g.is_file(path, followsymlinks=True))

    def is_dir(self, path: str) -> bool:
        return bool(self.g.is_dir(path, followsymlinks=True))

    def read_text(self, path: str) -> str:
        data = self.g.read_file(path)
        return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)

    def read_text_or(self, path: str, default: str = "") -> str:
        return self.read_text(path) if self.is_file(path) else default

    def write_text(self, path: str, text: str | bytes) -> None:
        self.g.write(path, text.encode() if isinstance(text, str) else text)

    def stat_mode(self, path: str) -> int:
        return int(self.g.lstatns(path)["st_mode"])

    # ------------------------------------------------------------ accounts

    def accounts(self) -> dict[str, Account]:
        """Users from the guest's /etc/passwd, by name."""
        out: dict[str, Account] = {}
        for line in self.read_text_or("/etc/passwd").splitlines():
            f = line.split(":")
            if len(f) >= 7 and f[2].isdigit() and f[3].isdigit():
                out[f[0]] = Account(f[0], int(f[2]), int(f[3]), f[5], f[6])
        return out

    def groups(self) -> dict[str, int]:
        """Groups from the guest's /etc/group: name -> gid."""
        out: dict[str, int] = {}
        for line in self.read_text_or("/etc/group").splitlines():
            f = line.split(":")
            if len(f) >= 3 and f[2].isdigit():
                out[f[0]] = int(f[2])
        return out

    def resolve_owner(self, owner: str) -> tuple[int, int]:
        """``user``, ``user:group``, ``:group`` or numeric ids -> (uid, gid), names from the guest."""
        user, _, group = owner.partition(":")
        accounts = self.accounts()
        uid = gid = -1
        if user:
            if user.isdigit():
                uid = int(user)
            elif user in accounts:
                uid = accounts[user].uid
                gid = accounts[user].gid
            else:
                raise GuestError(f"user '{user}' does not exist in the guest's /etc/passwd",
                                 "create it first with a 'user' step, or use a numeric uid")
        if group:
            if group.isdigit():
                gid = int(group)
            else:
                groups = self.groups()
                if group not in groups:
                    raise GuestError(f"group '{group}' does not exist in the guest's /etc/group")
                gid = groups[group]
        if uid < 0 and gid < 0:
            raise GuestError(f"'{owner}' is not an owner (examples: root, alice:staff, 1000:1000)")
        return uid, gid

    # ------------------------------------------------------------ commands

    def run(self, script: str, timeout: float, env: dict[str, str] | None = None) -> CommandResult:
        """Run a shell script inside the guest (chroot into its root), at most ``timeout`` seconds.

        The script is uploaded to the guest's /tmp and run by its /bin/sh with
        stdout and stderr captured together; the guest's ``timeout`` program
        stops it when it overruns, and a host-side watchdog kills the whole
        appliance if even that does not answer.
        """
        if self.readonly:
            raise GuestError("cannot run commands in a read-only session")
        g = self.g
        tag = f"imagekit-{os.getpid()}-{int(time.monotonic() * 1000)}"
        script_path, log_path = f"/tmp/{tag}.sh", f"/tmp/{tag}.log"
        if not self.is_dir("/tmp"):
            g.mkdir_mode("/tmp", 0o1777)
        exports = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C", "TERM": "dumb"}
        exports.update(env or {})
        head = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
        g.write(script_path, (head + script + "\n").encode())
        secs = max(1, int(timeout))
        has_timeout = any(g.exists(p) for p in ("/usr/bin/timeout", "/bin/timeout"))
        runner = f"timeout -k 10 {secs} /bin/sh {script_path}" if has_timeout else f"/bin/sh {script_path}"
        wrapper = f"{runner} </dev/null >{log_path} 2>&1; echo \"imagekit-status=$?\""
        start = time.monotonic()
        with self._watchdog(timeout + WATCHDOG_GRACE) as fired:
            try:
                out = g.sh(wrapper)
            except RuntimeError as exc:
                if fired.is_set():
                    raise GuestError(
                        f"a command in the guest did not finish within {timeout:g} s and the appliance was stopped",
                        "the command hangs or waits for input; give it a larger timeout or fix it",
                    ) from exc
                raise GuestError(f"running a command in the guest failed: {_first_line(exc)}",
                                 "the guest needs a working /bin/sh for run, script and package steps") from exc
        duration = time.monotonic() - start
        status = -1
        for line in reversed(out.splitlines()):
            if line.startswith("imagekit-status="):
                status = int(line.split("=", 1)[1])
                break
        output = self.read_text_or(log_path)
        for p in (script_path, log_path):
            if g.exists(p):
                g.rm_f(p)
        timed_out = has_timeout and status in (124, 137)
        return CommandResult(status, output, duration, timed_out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_image(
    path: str | os.PathLike[str],
    *,
    readonly: bool,
    fmt: str,
    network: bool = False,
    accel: str | accel_mod.AccelChoice | None = None,
    launch_timeout: float = LAUNCH_TIMEOUT,
    mount: bool = True,
    discard: bool = True,
) -> GuestSession:
    """Launch the appliance on ``path`` (format ``fmt``), inspect the guest and mount it.

    Use as a context manager: the appliance is shut down and the handle closed
    when the block ends, however it ends. Raises :class:`GuestError` when the
    appliance does not start (within ``launch_timeout``), when no or several
    operating systems are found, or the root filesystem cannot be mounted.
    ``network`` gives the appliance (and so commands run in the guest) a user-mode
    network; ``mount=False`` only launches and inspects.
    """
    if fmt not in FORMATS:
        raise GuestError(f"image format '{fmt}' cannot be opened here", f"use one of: {', '.join(FORMATS)}")
    p = Path(path)
    if not p.is_file():
        raise GuestError(f"{p} does not exist or is not a file")
    choice = accel_mod.resolve(accel)
    session = GuestSession(str(p.resolve()), fmt, readonly, network, choice)
    try:
        session._launch(launch_timeout, discard)
        if mount:
            session._inspect_and_mount()
        else:
            roots = session.g.inspect_os()
            session.root = roots[0] if len(roots) == 1 else ""
    except BaseException:
        session.close()
        raise
    return session
