"""Work folders that clean up after themselves, even after SIGKILL.

Work that leaves state on the host (mounts, loop devices, helper processes: a
diskimage-builder build) happens in a :class:`WorkDir`, a folder under
``paths.cache_dir()/"work"`` (or another base):

- its owner holds an exclusive ``flock`` on ``.lock`` inside it for its whole
  lifetime. The lock file is opened close-on-exec, so child processes do not
  inherit it: when the owner dies, even by SIGKILL, the kernel releases the lock,
  and a free lock means "the owner is gone";
- ``owner.json`` records who made it (pid, process start time, command line);
- ``env()`` is the variable that tags child processes (``IMAGEKIT_WORKDIR=<path>``):
  whatever they start inherits it, so they can be found in ``/proc/*/environ``
  after their parent is gone;
- ``cleanup()`` ends the tagged processes (and any process whose root or current
  directory is inside the folder: a chroot), unmounts everything under the folder
  that unmounts cleanly (deepest first), removes partloop mappings recorded in it
  and detaches loop devices backed by files under it, then unmounts the rest
  (lazily as a last resort: only once the loop devices are detached, because a
  lazy unmount hides the path by which a loop device's backing file is found),
  then removes the folder — never while anything is still mounted under it — and
  returns a :class:`CleanupReport` of what it did.

A folder is created as ``.new-<name>``, locked, then renamed, so a folder with a
visible name always had a held lock. ``reap_stale()`` (run at the start of
``imagekit build``) finds folders whose lock is free, cleans them as above and
returns what it removed. A folder without a lock file (made by an older imagekit)
counts as stale when it is older than ``LEGACY_AGE`` and no process mentions it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import secrets as _random
import shlex
import shutil
import signal
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagekit import partloop, paths
from imagekit import run as runner
from imagekit.errors import ImagekitError

log = logging.getLogger("imagekit.workdir")

WORK_ENV = "IMAGEKIT_WORKDIR"
LOCK_NAME = ".lock"
OWNER_NAME = "owner.json"
NEW_PREFIX = ".new-"
LEGACY_AGE = 600.0
TERM_GRACE = 5.0


class WorkDirError(ImagekitError):
    """A work folder cannot be created."""

    code = "workdir-failed"


def work_root() -> Path:
    """Where work folders live by default: ``paths.cache_dir()/"work"``."""
    return paths.cache_dir() / "work"


def short_root() -> Path:
    """Work folders for unix sockets, whose paths must stay under 108 bytes: the system's temporary
    folder (``TMPDIR``, usually /tmp), per user. ``reap_stale()`` cleans it with the work root."""
    import tempfile  # noqa: PLC0415 - rarely needed

    root = Path(tempfile.gettempdir()) / f"imagekit-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(root)
    except OSError as exc:
        raise WorkDirError(f"cannot create {root}: {exc.strerror}", "set TMPDIR to a folder you own") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkDirError(f"{root} is not a private folder of this user (another user made it?)",
                           "remove it, or set TMPDIR to a folder you own")
    return root


# ---------------------------------------------------------------- reports


@dataclass(frozen=True)
class Owner:
    pid: int
    start_time: float  # the process's start, seconds since the epoch
    command: str
    created: str

    def describe(self) -> str:
        started = _dt.datetime.fromtimestamp(self.start_time).isoformat(sep=" ", timespec="seconds")
        return f"pid {self.pid}, '{self.command}', started {started}"


@dataclass(frozen=True)
class CleanupReport:
    """What cleaning one work folder did."""

    path: str
    owner: Owner | None = None
    processes: tuple[str, ...] = ()  # "PID (name)"
    unmounted: tuple[str, ...] = ()
    loops: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()
    removed: bool = False
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def left_state(self) -> bool:
        """Processes, mounts, loop devices or mappings were found (not just an empty folder)."""
        return bool(self.processes or self.unmounted or self.loops or self.maps)

    def summary(self) -> str:
        parts = []
        if self.processes:
            shown = ", ".join(self.processes[:6]) + (", ..." if len(self.processes) > 6 else "")
            parts.append(f"ended {len(self.processes)} process(es) ({shown})")
        if self.unmounted:
            parts.append(f"unmounted {len(self.unmounted)} mount(s)")
        if self.loops or self.maps:
            parts.append(f"detached {len(self.loops) + len(self.maps)} loop device(s) "
                         f"({', '.join(self.loops + self.maps)})")
        parts.append("removed the folder" if self.removed else "could NOT remove the folder")
        who = f" (owner {self.owner.describe()})" if self.owner else ""
        text = f"{self.path}{who}: " + ", ".join(parts)
        if self.problems:
            text += "; problems: " + "; ".join(self.problems)
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the folder


def _proc_start_time(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class WorkDir:
    """A locked, tagged work folder; ``cleanup()`` (or leaving the ``with`` block) undoes everything in it."""

    def __init__(self, prefix: str = "work-", base: str | os.PathLike[str] | None = None,
                 command: str | None = None) -> None:
        root = Path(base) if base is not None else work_root()
        root.mkdir(parents=True, exist_ok=True)
        name = f"{prefix}{_random.token_hex(4)}"
        staging = root / f"{NEW_PREFIX}{name}"
        try:
            staging.mkdir(mode=0o700)
            self._lock_fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise WorkDirError(f"cannot create a work folder in {root}: {exc.strerror}",
                               "check the permissions and free space of the cache directory") from exc
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.owner = Owner(pid=os.getpid(), start_time=_proc_start_time(os.getpid()),
                           command=command or shlex.join(["imagekit", *sys.argv[1:]]),
                           created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        (staging / OWNER_NAME).write_text(json.dumps(asdict(self.owner)), encoding="utf-8")
        self.path = (root / name).resolve()
        os.rename(staging, self.path)
        self.report: CleanupReport | None = None
        log.debug("work folder %s", self.path)

    def env(self) -> dict[str, str]:
        """The variable that tags child processes as belonging to this folder."""
        return {WORK_ENV: str(self.path)}

    def cleanup(self) -> CleanupReport:
        """End tagged processes, unmount, detach loop devices, remove the folder; then release the lock."""
        if self.report is not None:
            return self.report
        try:
            self.report = clean_folder(self.path, self.owner)
        finally:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
        if self.report.left_state:
            log.info("cleaned up %s", self.report.summary())
        return self.report

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# ---------------------------------------------------------------- what is under a folder


def _unescape(field_: str) -> str:
    """A path from /proc/*/mountinfo (spaces, tabs, newlines, backslashes are octal escapes)."""
    return field_.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def _under(p: str, prefix: str) -> bool:
    return p == prefix or p.startswith(prefix + "/")


def mounts_under(prefix: str | os.PathLike[str]) -> list[str]:
    """Mount points under ``prefix`` (itself included), deepest first."""
    pre = os.fspath(prefix).rstrip("/")
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _under(mnt := _unescape(fields[4]), pre):
                found.append(mnt)
    return sorted(set(found), key=lambda m: (m.count("/"), len(m)), reverse=True)


def loops_under(prefix: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file is under ``prefix`` (from /sys/block/loop*/loop/backing_file)."""
    pre = os.fspath(prefix).rstrip("/")
    found = []
    for bf in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            back = bf.read_text().rstrip("\n")
        except OSError:
            continue
        back = back.removesuffix(" (deleted)")
        if _under(back, pre):
            found.append(f"/dev/{bf.parent.parent.name}")
    return found


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _refers_to(pid: int, prefix: str, tag: bytes, anywhere: bool) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        env = b""
    if tag in env or (anywhere and prefix.encode() in env):
        return True
    for link in ("root", "cwd"):
        with contextlib.suppress(OSError):
            if _under(os.readlink(f"/proc/{pid}/{link}"), prefix):
                return True
    return False


def processes_in(prefix: str | os.PathLike[str], anywhere: bool = False) -> dict[int, str]:
    """Processes tagged with the folder (``IMAGEKIT_WORKDIR``), or whose root or cwd is in it: {pid: name}.

    ``anywhere``: also processes whose environment merely mentions the path (folders of older versions)."""
    pre = os.fspath(prefix).rstrip("/")
    tag = f"\0{WORK_ENV}={pre}\0".encode()
    skip = _ancestors()
    found: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in skip:
            continue
        pid = int(d.name)
        if _refers_to(pid, pre, tag, anywhere):
            try:
                found[pid] = (d / "comm").read_text().strip()
            except OSError:
                continue
    return found


# ---------------------------------------------------------------- cleaning


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _end_processes(prefix: str) -> list[str]:
    """SIGTERM, a grace period, SIGKILL; repeated while new ones appear (they may fork meanwhile)."""
    ended: dict[int, str] = {}
    for _ in range(5):
        procs = {p: n for p, n in processes_in(prefix).items() if _alive(p)}
        if not procs:
            break
        ended.update(procs)
        for pid in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.1)
        for pid in procs:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not any(_alive(p) for p in procs):
                break
            time.sleep(0.1)
    return [f"{pid} ({name})" for pid, name in sorted(ended.items())]


def _unmount_all(prefix: str, lazy: bool) -> list[str]:
    """Unmount what is under ``prefix``, deepest first, in passes while they make progress (a mount can be
    busy until the ones on it are gone). ``lazy``: what is still busy after a short wait (a loop device
    just detached may hold its file a moment longer) is unmounted lazily, as a last resort."""
    done: list[str] = []
    deadline = time.monotonic() + (2.0 if lazy else 0.0)
    for _ in range(50):  # bounded: a path can hold stacked mounts
        mounts = mounts_under(prefix)
        gone = [m for m in mounts if runner.run(["umount", m], timeout=60, check=False).returncode == 0]
        done += [m for m in gone if m not in done]
        if not mounts or (not gone and time.monotonic() >= deadline):
            break
        if not gone:
            time.sleep(0.2)
    if lazy:
        for mnt in mounts_under(prefix):
            if runner.run(["umount", "-l", mnt], timeout=60, check=False).returncode == 0 and mnt not in done:
                done.append(mnt)
    return done


def _detach_loops(prefix: str, problems: list[str]) -> list[str]:
    done = []
    for dev in loops_under(prefix):
        res = runner.run(["losetup", "-d", dev], timeout=60, check=False)
        if res.returncode == 0:
            done.append(dev)
        else:
            problems.append(f"losetup -d {dev}: {(res.stderr or res.stdout).strip()[:200]}")
    return done


def clean_folder(path: str | os.PathLike[str], owner: Owner | None = None) -> CleanupReport:
    """Undo everything a work folder holds on the host and remove it (see the module documentation)."""
    prefix = os.path.realpath(path)
    problems: list[str] = []
    processes = _end_processes(prefix)
    # Loop devices are found by the path of their backing file: detach them before anything is unmounted
    # lazily. diskimage-builder's image file is on a tmpfs in the folder, which stays busy while the loop
    # devices hold it; unmounted lazily first, it would turn "<folder>/dib_image.X/image0.raw" into
    # "/image0.raw" and its loop devices would be left behind, unseen.
    unmounted = _unmount_all(prefix, lazy=False)  # the image's partitions, /proc, /dev... in the chroot
    maps = []
    state = Path(prefix) / "partloop"
    if state.is_dir():
        maps = partloop.remove_all(image_prefix=prefix + "/", state_dir=state)
    loops = _detach_loops(prefix, problems)
    unmounted += [m for m in _unmount_all(prefix, lazy=True) if m not in unmounted]  # now free: the tmpfs
    left = mounts_under(prefix)
    if left:
        problems.append(f"still mounted: {', '.join(left)}")
    removed = False
    if not mounts_under(prefix):  # never delete through a mount (a bind mount of /dev, say)
        shutil.rmtree(prefix, ignore_errors=True)
        removed = not os.path.exists(prefix)
        if not removed:
            problems.append("some files could not be removed")
    return CleanupReport(path=prefix, owner=owner, processes=tuple(processes), unmounted=tuple(unmounted),
                         loops=tuple(loops), maps=tuple(maps), removed=removed, problems=tuple(problems))


# ---------------------------------------------------------------- stale folders


def read_owner(path: Path) -> Owner | None:
    try:
        data = json.loads((path / OWNER_NAME).read_text(encoding="utf-8"))
        return Owner(int(data["pid"]), float(data["start_time"]), str(data["command"]), str(data["created"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _try_lock(path: Path) -> int | None:
    """An fd holding the folder's lock, or None when its owner still holds it (or it has no lock file)."""
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _is_legacy_stale(path: Path) -> bool:
    """A folder without a lock file: stale when old and no process mentions it."""
    return _older_than(path, LEGACY_AGE) and not processes_in(path, anywhere=True)


def reap_stale(base: str | os.PathLike[str] | None = None) -> list[CleanupReport]:
    """Clean and remove the work folders under ``base`` (by default the work root and the short root
    for sockets) whose owner is gone; return what was done."""
    if base is None:
        return _reap(work_root()) + _reap(short_root())
    return _reap(Path(base))


def _reap(root: Path) -> list[CleanupReport]:
    if not root.is_dir():
        return []
    reports = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.is_symlink():
            continue
        if d.name.startswith(NEW_PREFIX) and not _older_than(d, LEGACY_AGE):
            continue  # being created right now (its lock may not be taken yet)
        fd = _try_lock(d)
        if fd is None and ((d / LOCK_NAME).exists() or not _is_legacy_stale(d)):
            continue  # its owner holds the lock, or an old-style folder still in use
        try:
            report = clean_folder(d, read_owner(d))
        finally:
            if fd is not None:
                os.close(fd)
        log.info("removed a stale work folder: %s", report.summary())
        reports.append(report)
    return reports
