"""The one way imagekit runs external programs.

Argument lists only (never a shell), a timeout on every call, the command line
logged with secrets masked, optional resource limits, and typed errors:
``ToolNotFound``, ``ToolFailed`` (with the tail of the output), ``ToolTimeout``.
"""

from __future__ import annotations

import logging
import os
import resource
import shlex
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from imagekit.errors import ToolFailed, ToolNotFound, ToolTimeout

log = logging.getLogger("imagekit.run")

MASK = "****"
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


def redact(argv: Sequence[str], secrets: Iterable[str] = ()) -> str:
    """The command line as a shell would show it, with every secret replaced by ``****``."""
    secrets = [s for s in secrets if s]
    shown = []
    for arg in argv:
        for s in secrets:
            arg = arg.replace(s, MASK)
        shown.append(arg)
    return shlex.join(shown)


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


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    secrets: Iterable[str] = (),
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
    on_output: Callable[[str], None] | None = None,
    input_text: str | None = None,
    merge_stderr: bool = False,
) -> Completed:
    """Run ``argv`` and wait for it, at most ``timeout`` seconds.

    ``on_output`` receives stdout piece by piece (split on newlines and carriage
    returns, so progress lines such as qemu-img's ``-p`` arrive as they are
    printed). The child runs in its own process group; on timeout or Ctrl-C the
    whole group is terminated, so no helper process outlives the call.
    ``merge_stderr`` sends stderr through ``on_output`` too (build logs).
    """
    argv = [str(a) for a in argv]
    secrets = list(secrets)
    program = argv[0]
    if os.sep not in program:
        which(program)
    shown = redact(argv, secrets)
    log.info("run: %s", shown)
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
            errors="replace",
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_preexec(limits),
        )
    except FileNotFoundError as exc:
        raise ToolNotFound(f"required program '{program}' was not found", "run 'make setup'") from exc
    except PermissionError as exc:
        raise ToolFailed(f"cannot execute '{program}': {exc.strerror}") from exc

    out_chunks: list[str] = []
    err_tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES * 4)

    def read_stdout() -> None:
        assert proc.stdout is not None
        buf = ""
        while True:
            ch = proc.stdout.read(1024)
            if not ch:
                break
            out_chunks.append(ch)
            if on_output is not None:
                buf += ch
                while True:
                    cut = min((i for i in (buf.find("\n"), buf.find("\r")) if i >= 0), default=-1)
                    if cut < 0:
                        break
                    line, buf = buf[:cut], buf[cut + 1 :]
                    if line.strip():
                        on_output(line)
        if on_output is not None and buf.strip():
            on_output(buf)

    def read_stderr() -> None:
        if proc.stderr is None:
            return
        for line in proc.stderr:
            err_tail.append(line)
            log.debug("%s: %s", os.path.basename(program), line.rstrip())

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for t in readers:
        t.start()
    try:
        if input_text is not None:
            assert proc.stdin is not None
            proc.stdin.write(input_text)
            proc.stdin.close()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        raise ToolTimeout(
            f"'{os.path.basename(program)}' did not finish within {timeout:g} s and was stopped",
            "the input may be unusually large or hostile; raise the timeout only if you trust it",
        ) from exc
    except BaseException:
        _kill_group(proc)
        raise
    for t in readers:
        t.join(timeout=5)
    stdout = "".join(out_chunks)
    stderr = "".join(err_tail)
    if merge_stderr:
        stdout = "".join(stdout.splitlines(keepends=True)[-OUTPUT_TAIL_LINES * 4:])
    for s in secrets:
        if s:
            stdout = stdout.replace(s, MASK)
            stderr = stderr.replace(s, MASK)
    result = Completed(tuple(argv), proc.returncode, stdout, stderr)
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
