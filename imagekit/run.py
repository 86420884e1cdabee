"""The one way imagekit runs external programs.

Argument lists only (never a shell), a timeout on every call, the command line
logged with secrets masked, optional resource limits, and typed errors:
``ToolNotFound``, ``ToolFailed`` (with the tail of the output), ``ToolTimeout``.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from imagekit.errors import ToolFailed, ToolNotFound, ToolTimeout
from imagekit.secrets import MASK as MASK  # re-exported: the mask run() writes
from imagekit.secrets import Secrets

log = logging.getLogger("imagekit.run")

OUTPUT_TAIL_LINES = 40


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to the child (setrlimit): seconds of CPU, bytes of address space."""

    cpu_seconds: int | None = None
    address_space: int | None = None


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def redact(argv: Sequence[str], secrets: Secrets | Iterable[str] = ()) -> str:
    """The command line as a shell would show it, with every secret replaced by ``****``."""
    s = secrets if isinstance(secrets, Secrets) else Secrets(secrets)
    return s.scrub_argv([str(a) for a in argv])


def which(program: str, hint: str | None = None) -> str:
    path = shutil.which(program)
    if path is None:
        raise ToolNotFound(
            f"required program '{program}' was not found on PATH",
            hint or "run 'make setup' (it installs the Debian packages imagekit needs)",
        )
    return path


def _preexec(limits: Limits | None) -> Callable[[], None] | None:
    if limits is None:
        return None

    def apply() -> None:
        if limits.cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        if limits.address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))

    return apply


def kill_group(proc: subprocess.Popen[str], grace: float = 5.0) -> None:
    """SIGTERM to the child's process group, wait ``grace`` seconds, then SIGKILL; reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # The leader may be gone while helpers it started in its group live on.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _full_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    if env is None:
        return None
    full = dict(os.environ)
    full.update(env)
    return full


def _spawn(argv: list[str], opts: _Options) -> subprocess.Popen[str]:
    program = argv[0]
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if opts.input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if opts.merge_stderr else subprocess.PIPE,
            text=True,
            errors="replace",
            env=_full_env(opts.env),
            cwd=opts.cwd,
            start_new_session=True,
            preexec_fn=_preexec(opts.limits),
        )
    except FileNotFoundError as exc:
        raise ToolNotFound(f"required program '{program}' was not found", "run 'make setup'") from exc
    except PermissionError as exc:
        raise ToolFailed(f"cannot execute '{program}': {exc.strerror}") from exc


@dataclass(frozen=True)
class _Options:
    env: Mapping[str, str] | None
    cwd: str | os.PathLike[str] | None
    limits: Limits | None
    on_output: Callable[[str], None] | None
    input_text: str | None
    merge_stderr: bool


def _split_lines(buf: str, emit: Callable[[str], None]) -> str:
    """Emit every complete line of ``buf`` (ended by a newline or a carriage return); return the rest."""
    while True:
        cut = min((i for i in (buf.find("\n"), buf.find("\r")) if i >= 0), default=-1)
        if cut < 0:
            return buf
        line, buf = buf[:cut], buf[cut + 1:]
        if line.strip():
            emit(line)


class _Collector:
    """Reads the child's stdout and stderr in two threads (so neither pipe can fill up and block it)."""

    def __init__(self, proc: subprocess.Popen[str], program: str, on_output: Callable[[str], None] | None) -> None:
        self.proc = proc
        self.program = os.path.basename(program)
        self.on_output = on_output
        self.out_chunks: list[str] = []
        self.err_tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES * 4)
        self.threads = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self.threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        buf = ""
        while True:
            ch = self.proc.stdout.read(1024)
            if not ch:
                break
            self.out_chunks.append(ch)
            if self.on_output is not None:
                buf = _split_lines(buf + ch, self.on_output)
        if self.on_output is not None and buf.strip():
            self.on_output(buf)

    def _read_stderr(self) -> None:
        if self.proc.stderr is None:
            return
        for line in self.proc.stderr:
            self.err_tail.append(line)
            log.debug("%s: %s", self.program, line.rstrip())

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=5)


def _wait(proc: subprocess.Popen[str], program: str, timeout: float, input_text: str | None) -> None:
    """Wait for the child; on timeout, Ctrl-C or a signal (signals.Interrupted) end its whole group."""
    try:
        if input_text is not None:
            assert proc.stdin is not None
            proc.stdin.write(input_text)
            proc.stdin.close()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        kill_group(proc)
        raise ToolTimeout(
            f"'{os.path.basename(program)}' did not finish within {timeout:g} s and was stopped",
            "the input may be unusually large or hostile; raise the timeout only if you trust it",
        ) from exc
    except BaseException:
        kill_group(proc)
        raise


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    secrets: Secrets | Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
    on_output: Callable[[str], None] | None = None,
    input_text: str | None = None,
    merge_stderr: bool = False,
) -> Completed:
    """Run ``argv`` and wait for it, at most ``timeout`` seconds.

    ``on_output`` receives stdout piece by piece (split on newlines and carriage
    returns, so progress lines such as qemu-img's ``-p`` arrive as they are
    printed). The child runs in its own process group; on timeout, Ctrl-C or a
    signal (SIGTERM/SIGHUP through ``imagekit.signals``) the whole group is
    terminated, so no helper process outlives the call. ``merge_stderr`` sends
    stderr through ``on_output`` too (build logs). ``secrets`` are masked in the
    logged command line, in the returned output and in error messages.
    """
    argv = [str(a) for a in argv]
    masks = secrets if isinstance(secrets, Secrets) else Secrets(secrets)
    program = argv[0]
    if os.sep not in program:
        which(program)
    shown = masks.scrub_argv(argv)
    log.info("run: %s", shown)
    opts = _Options(env, cwd, limits, on_output, input_text, merge_stderr)
    proc = _spawn(argv, opts)
    collector = _Collector(proc, program, on_output)
    _wait(proc, program, timeout, input_text)
    collector.join()
    stdout = "".join(collector.out_chunks)
    if merge_stderr:
        stdout = "".join(stdout.splitlines(keepends=True)[-OUTPUT_TAIL_LINES * 4:])
    result = Completed(tuple(argv), proc.returncode, masks.scrub(stdout), masks.scrub("".join(collector.err_tail)))
    if check and proc.returncode != 0:
        raise failed(result, shown)
    return result


def failed(result: Completed, shown: str | None = None) -> ToolFailed:
    """A ToolFailed for a completed run, with the last lines of its output."""
    program = os.path.basename(result.argv[0])
    tail_src = result.stderr.strip() or result.stdout.strip()
    tail = "\n".join(tail_src.splitlines()[-OUTPUT_TAIL_LINES:])
    if result.returncode < 0:
        what = f"was killed by signal {-result.returncode}"
    else:
        what = f"exited with status {result.returncode}"
    msg = f"'{program}' {what}"
    if tail:
        msg += f":\n{tail}"
    return ToolFailed(msg, f"command: {shown or redact(result.argv)}", result.returncode, tail)


def version_of(argv: Sequence[str], timeout: float = 20) -> str | None:
    """First line of a program's version output, or None when it is missing or fails."""
    try:
        res = run(argv, timeout=timeout, check=False)
    except (ToolNotFound, ToolTimeout, ToolFailed):
        return None
    text = (res.stdout or res.stderr).strip()
    return text.splitlines()[0].strip() if text else None
