"""Offline customisation: apply customise steps to a disk image.

``customise(image, steps, output=...)`` never touches its input unless asked
(``in_place=True``). It creates a qcow2 copy-on-write overlay over the input
(``qemu-img create -f qcow2 -F FMT -b INPUT``), opens ONE libguestfs session on
the overlay, applies every step in order (:func:`run_steps`), and then:

* with ``output``: converts the overlay into ``output`` (written under a
  temporary name in the same directory and renamed when complete; the
  conversion drops the blocks a ``sparsify`` step trimmed);
* with ``in_place``: commits the overlay into the input (``qemu-img commit``).

The overlay is always deleted. Before anything is launched the steps are checked
once more (:func:`preflight`: their host files can still be read, a step that
requires the network has it). When a step fails the run stops with a
:class:`CustomiseError` that names the step (its 0-based index in the list, as
in the recipe), the command it ran and the command's output; the input is
untouched and no output is left behind.

This module knows nothing about any particular step: each step is a class of
``imagekit.steps`` with its own validation, host files, secrets, network needs and
effect (``step.apply(ctx)``). Each step is logged as a :class:`StepResult` (through
the ``log`` callback and the ``imagekit.customise`` logger). The steps' secrets
(password hashes) are masked (``****``) in every summary, output, log line and error.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from imagekit.accel import AccelChoice
from imagekit.errors import ImagekitError, OutputExistsError, UnsafeImageError, UsageError
from imagekit.guest import GuestSession, open_image
from imagekit.run import run
from imagekit.secrets import Secrets
from imagekit.steps import StepBase, StepContext, StepFailure, StepOutcome, secrets_of
from imagekit.steps.base import one_line
from imagekit.steps.fields import host_file_problem

log = logging.getLogger("imagekit.customise")

QEMU_IMG_TIMEOUT = 3 * 3600
OUTPUT_TAIL = 30
OUTPUT_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class StepResult:
    """What one step did: its index in the step list, its op, a one-line summary, how long it
    took, whether it succeeded, and the output of any command it ran."""

    index: int
    op: str
    summary: str
    duration: float
    ok: bool
    output: str = ""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["duration"] = round(self.duration, 2)
        return d


class CustomiseError(ImagekitError):
    """A step failed (or cannot be done); the input image is untouched."""

    def __init__(self, message: str, hint: str | None = None, *, index: int | None = None, op: str | None = None,
                 command: str | None = None, output: str = "", results: Sequence[StepResult] = ()) -> None:
        super().__init__(message, hint)
        self.index = index
        self.op = op
        self.command = command
        self.output = output
        self.results = list(results)

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d.update(step=self.index, op=self.op, command=self.command, output=self.output,
                 steps=[r.to_dict() for r in self.results])
        return d


StepLog = Callable[[StepResult], None]


def _tail(text: str, n: int = OUTPUT_TAIL) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


# ---------------------------------------------------------------- checks before launching


def detect_format(path: str | os.PathLike[str]) -> str:
    """The qemu format name of an image, from its content (imagekit's detector, never the name)."""
    from imagekit.formats.detect import detect

    det = detect(path)
    if det.qemu_format not in ("qcow2", "raw"):
        raise UsageError(f"{path} is a {det.format} image: customise works on qcow2 and raw images",
                         "convert it to qcow2 first ('qemu-img convert -O qcow2')")
    return det.qemu_format


def ensure_safe(path: str | os.PathLike[str], fmt: str) -> None:
    """Refuse an input that is not safe to give QEMU (backing files, polyglots, wrong format)."""
    from imagekit.check import check

    verdict = check(path, declared=fmt, deep=False)
    if not verdict.ok:
        reasons = "; ".join(f.message for f in verdict.findings if f.severity == "reject")
        raise UnsafeImageError(f"{path} failed the safety check: {reasons}",
                               "run 'imagekit check' on it for details", verdict=verdict)


def preflight(steps: Sequence[StepBase], network: bool) -> None:
    """What can still go wrong before the appliance starts: a host file a step reads is gone or
    unreadable (steps were validated when their recipe was loaded; files may change since), or a
    step requires the network and the run has none. Raises CustomiseError naming the step."""
    for i, st in enumerate(steps):
        for path in st.host_files():
            problem = host_file_problem(path)
            if problem:
                raise CustomiseError(f"step {i} ({st.op}) cannot be done: {problem}", index=i, op=st.op)
        if st.NETWORK == "required" and not network:
            raise CustomiseError(f"step {i} ({st.op}) needs the network, but network access is off",
                                 "drop --no-network to run this step", index=i, op=st.op)


@dataclass(frozen=True)
class OutputSpec:
    """Where a customised image goes: a new file in ``format`` (qcow2 or raw), replaced only with ``overwrite``."""

    path: str | os.PathLike[str]
    format: str = "qcow2"
    overwrite: bool = False


def _check_request(image: str | os.PathLike[str], in_place: bool,
                   output: OutputSpec | None) -> tuple[Path, Path | None]:
    """The input and the output (None: in place), or UsageError/OutputExistsError."""
    src = Path(image)
    if not src.is_file():
        raise UsageError(f"{src} does not exist or is not a file")
    if in_place == (output is not None):
        raise UsageError("give either an output image or in_place=True (--in-place)",
                         "the input is never changed unless --in-place is given")
    if output is not None and output.format not in OUTPUT_FORMATS:
        raise UsageError(f"output format '{output.format}' is not supported", f"use one of {', '.join(OUTPUT_FORMATS)}")
    dest = Path(output.path) if output is not None else None
    if dest is not None and output is not None:
        if dest.resolve() == src.resolve():
            raise UsageError("the output is the input", "use --in-place to change the input itself")
        if dest.exists() and not output.overwrite:
            raise OutputExistsError(f"{dest} already exists", "remove it or choose another output name")
        if not dest.parent.is_dir():
            raise UsageError(f"the output directory {dest.parent} does not exist")
    return src, dest


# ---------------------------------------------------------------- the run


def customise(
    image: str | os.PathLike[str],
    steps: Sequence[StepBase],
    *,
    in_place: bool = False,
    output: str | os.PathLike[str] | OutputSpec | None = None,
    fmt: str | None = None,
    network: bool = True,
    accel: AccelChoice | str | None = None,
    log: StepLog | None = None,
    after: Callable[[GuestSession], None] | None = None,
) -> list[StepResult]:
    """Apply ``steps`` (``imagekit.steps.Step`` models) in order to ``image``; return one StepResult per step.

    Exactly one of ``output`` (a new qcow2 image, or an ``OutputSpec`` with the format and
    whether to replace an existing file) and ``in_place`` must be given. ``fmt`` is the
    input's format (detected from its content when None). ``network`` gives the appliance a
    network when a step can use one. ``accel`` is the accelerator (resolved once by the
    caller; None: ``IMAGEKIT_ACCEL`` or auto). Raises CustomiseError when a step fails (input untouched,
    nothing written), UsageError for impossible requests, UnsafeImageError for an input
    QEMU must not open, GuestError when the appliance cannot start or the guest cannot be
    inspected. ``after`` is called with the still-open session once every step succeeded
    (e.g. ``sbom.guest_info`` for an inventory without launching the appliance a second time).
    """
    spec = output if isinstance(output, OutputSpec) or output is None else OutputSpec(output)
    src, dest = _check_request(image, in_place, spec)
    if fmt is None:
        fmt = detect_format(src)
    ensure_safe(src, fmt)
    preflight(steps, network)
    use_net = network and any(st.NETWORK != "no" for st in steps)
    workdir = dest.parent if dest is not None else src.parent
    tag = f"{os.getpid()}-{int(time.time())}"
    overlay = workdir / f".{src.name}.imagekit-{tag}.overlay.qcow2"
    partial = dest.with_name(f".{dest.name}.imagekit-{tag}.partial") if dest is not None else None
    try:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(src.resolve()), str(overlay)],
            timeout=120)
        with open_image(overlay, readonly=False, fmt="qcow2", network=use_net, accel=accel) as session:
            results = run_steps(session, steps, network=use_net, log=log)
            if after is not None:
                after(session)
        if dest is not None and partial is not None:
            run(["qemu-img", "convert", "-f", "qcow2", "-O", spec.format if spec else "qcow2", str(overlay),
                 str(partial)],
                timeout=QEMU_IMG_TIMEOUT)
            os.replace(partial, dest)
        else:
            run(["qemu-img", "commit", "-q", "-f", "qcow2", str(overlay)], timeout=QEMU_IMG_TIMEOUT)
    finally:
        for p in (overlay, partial):
            if p is not None:
                p.unlink(missing_ok=True)
    return results


def run_steps(session: GuestSession, steps: Sequence[StepBase], *, network: bool,
              log: StepLog | None = None) -> list[StepResult]:
    """Apply ``steps`` in order on an open session; stop at the first failure with a CustomiseError.

    Every text that leaves (summaries, outputs, log lines, the error) has the steps' secrets masked."""
    secrets = secrets_of(steps)
    ctx = StepContext(session, network, secrets)
    results: list[StepResult] = []
    for i, st in enumerate(steps):
        results.append(_apply(ctx, i, st, secrets, results, log))
    return results


def _run_one(ctx: StepContext, st: StepBase) -> StepOutcome | StepFailure:
    """Apply one step: what it did, or what failed."""
    try:
        return st.apply(ctx)
    except StepFailure as f:
        return f
    except ImagekitError as exc:  # e.g. GuestError: an owner that the guest does not have
        return StepFailure(exc.message, exc.hint)
    except RuntimeError as exc:  # a libguestfs call failed
        text = str(exc).strip()
        return StepFailure(text.splitlines()[0] if text else "libguestfs call failed")
    except OSError as exc:  # reading a host file
        return StepFailure(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


def _apply(ctx: StepContext, i: int, st: StepBase, secrets: Secrets, done: list[StepResult],
           callback: StepLog | None) -> StepResult:
    op = st.op
    log.info("step %d (%s) ...", i, op)
    start = time.monotonic()
    done_or_failed = _run_one(ctx, st)
    duration = time.monotonic() - start
    if isinstance(done_or_failed, StepFailure):
        failure = done_or_failed
        output = secrets.scrub(failure.output)
        command = secrets.scrub_opt(failure.command)
        message = secrets.scrub(failure.message)
        result = StepResult(i, op, f"FAILED: {message}", duration, False, output)
        log.error("step %d (%s) failed after %.1f s: %s", i, op, duration, message)
        if callback is not None:
            callback(result)
        text = f"step {i} ({op}) failed: {message}"
        if command:
            text += f"\ncommand: {one_line(command, 200)}"
        if output.strip():
            text += f"\noutput (last lines):\n{_tail(output)}"
        raise CustomiseError(text, secrets.scrub_opt(failure.hint) or "the input image was not changed", index=i,
                             op=op, command=command, output=output, results=[*done, result])
    result = StepResult(i, op, secrets.scrub(done_or_failed.summary), duration, True,
                        secrets.scrub(done_or_failed.output))
    log.info("step %d (%s) done in %.1f s: %s", i, op, duration, result.summary)
    if callback is not None:
        callback(result)
    return result
