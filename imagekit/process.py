"""The one way imagekit runs a long-lived process: QEMU boots, the KVM probe guest, servers.

``imagekit.run.run`` runs a program to completion; a :class:`Process` is for what
runs beside imagekit (a VM, the glance-api server under gunicorn; later Nova, an
OCI registry, swtpm). Each one:

- runs in its own process session (a Ctrl-C in the terminal does not reach it;
  ``stop()`` ends its whole group, helpers included);
- writes its standard output and error to a log file (``log_tail()`` reads the
  end of it, for error messages; callers watching a console poll the file);
- has its command line logged with secrets masked (``imagekit.secrets``);
- can carry a work folder's environment tag (``env=workdir.env()``), so a run
  killed with SIGKILL can still find and end it (``imagekit.workdir``);
- is stopped by ``stop()``: SIGTERM to its group (or to its own PID only, for
  servers that manage their workers), a wait, then SIGKILL to the group. As a
  context manager it always stops, whatever happens (exception, Ctrl-C, SIGTERM).

A **detached** process (``detached=True``) outlives the command that started it
(``imagekit glance serve``): its PID is written to ``pid_file``, and a later command
finds it with :meth:`Process.attach`, which signals it only after checking that
``/proc/PID/cmdline`` still carries the process's ``identity`` (never a recycled
PID). Its context manager does not stop it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from imagekit.errors import ImagekitError, ToolNotFound
from imagekit.secrets import Secrets

log = logging.getLogger("imagekit.process")

STOP_TIMEOUT = 10.0


class ProcessError(ImagekitError):
    """A long-lived process cannot be started or signalled."""

    code = "process-failed"


def is_alive(pid: int) -> bool:
    """PID exists and is not a zombie (a zombie child of ours is reaped on the way)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    try:
        state = stat.rsplit(")", 1)[1].split()[0]
    except IndexError:
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def cmdline_has(pid: int, identity: str) -> bool:
    """PID is alive and its command line contains ``identity``."""
    if not is_alive(pid):
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return identity.encode() in raw


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


class Process:
    """A long-lived child process; see the module documentation."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], *, log_path: str | os.PathLike[str],
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 secrets: Secrets | Iterable[str] = (), detached: bool = False,
                 pid_file: str | os.PathLike[str] | None = None, identity: str | None = None,
                 term_group: bool = True, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.secrets = secrets if isinstance(secrets, Secrets) else Secrets(secrets)
        self.detached = detached
        self.pid_file = Path(pid_file) if pid_file is not None else None
        self.identity = identity
        self.term_group = term_group
        self.stop_timeout = stop_timeout
        self.pid: int | None = None
        self.returncode: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        if detached and (self.pid_file is None or not identity):
            raise ValueError("a detached process needs a pid_file and an identity")

    # ------------------------------------------------------------ start

    def start(self) -> Process:
        if self.pid is not None:
            return self
        full_env = None
        if self.env is not None:
            full_env = dict(os.environ)
            full_env.update(self.env)
        log.info("start: %s (log %s)", self.secrets.scrub_argv(self.argv), self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            try:
                self._popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                               stderr=subprocess.STDOUT, env=full_env, cwd=self.cwd,
                                               start_new_session=True)
            except FileNotFoundError as exc:
                raise ToolNotFound(f"required program '{self.argv[0]}' was not found", "run 'make setup'") from exc
            except PermissionError as exc:
                raise ProcessError(f"cannot execute '{self.argv[0]}': {exc.strerror}") from exc
        self.pid = self._popen.pid
        if self.pid_file is not None:
            tmp = self.pid_file.with_name(self.pid_file.name + ".tmp")
            tmp.write_text(f"{self.pid}\n", encoding="utf-8")
            os.replace(tmp, self.pid_file)
        return self

    @classmethod
    def attach(cls, pid_file: str | os.PathLike[str], identity: str, *, log_path: str | os.PathLike[str] = "/dev/null",
               term_group: bool = True, stop_timeout: float = STOP_TIMEOUT) -> Process | None:
        """The detached process recorded in ``pid_file``, if it still runs with ``identity``; else None."""
        try:
            pid = int(Path(pid_file).read_text(encoding="utf-8").split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 0 or not cmdline_has(pid, identity):
            return None
        p = cls([], log_path=log_path, detached=True, pid_file=pid_file, identity=identity,
                term_group=term_group, stop_timeout=stop_timeout)
        p.pid = pid
        return p

    # ------------------------------------------------------------ state

    def poll(self) -> int | None:
        """The exit status when the process has ended (negative: killed by that signal), else None."""
        if self._popen is not None:
            self.returncode = self._popen.poll()
            return self.returncode
        return None

    def running(self) -> bool:
        if self.pid is None:
            return False
        if self._popen is not None:
            return self.poll() is None
        return cmdline_has(self.pid, self.identity or "")

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to end; its status (None for an attached process, or on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return self.returncode

    def read_log(self, offset: int, limit: int = 1 << 20) -> bytes:
        """The log's bytes from ``offset`` on (at most ``limit``): callers watching a console poll this."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except OSError:
            return b""

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the log, secrets masked."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256 * lines))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return self.secrets.scrub("\n".join(text.strip().splitlines()[-lines:]))

    # ------------------------------------------------------------ stop

    def _still_ours(self) -> bool:
        if self.pid is None:
            return False
        if self._popen is not None:
            return self.poll() is None
        return cmdline_has(self.pid, self.identity or "")

    def stop(self, timeout: float | None = None) -> bool:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL to the group. True if it was running.

        A detached or attached process is signalled only while its command line carries its identity.
        """
        if self.pid is None:
            return False
        pid = self.pid
        if not self._still_ours():
            self._kill_leftovers(pid)
            return False
        timeout = self.stop_timeout if timeout is None else timeout
        log.info("stop: SIGTERM to %s %d", "group" if self.term_group else "pid", pid)
        _signal(pid, signal.SIGTERM, self.term_group)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._still_ours():
            time.sleep(0.05)
        if self._still_ours():
            log.warning("process %d did not stop within %g s: SIGKILL to its group", pid, timeout)
        self._kill_leftovers(pid)
        for _ in range(100):
            if not self._still_ours():
                break
            time.sleep(0.05)
        if self.pid_file is not None:
            with contextlib.suppress(OSError):
                self.pid_file.unlink()
        return True

    def _kill_leftovers(self, pid: int) -> None:
        """SIGKILL to what is left of the process group (helpers of a leader that already exited)."""
        if self._popen is not None or cmdline_has(pid, self.identity or "\0"):
            _signal(pid, signal.SIGKILL, True)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=10)
            self.returncode = self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once (tests: a server that dies)."""
        if self.pid is not None and self._still_ours():
            _signal(self.pid, signal.SIGKILL, True)
            for _ in range(100):
                if not self._still_ours():
                    break
                time.sleep(0.05)

    # ------------------------------------------------------------ context manager

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.detached:
            self.stop()
