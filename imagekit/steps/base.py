"""The base of every customise step, and what a step gets when it runs.

A step is ONE pydantic class, a subclass of :class:`StepBase` in a family module
of ``imagekit.steps``. The class holds everything about the step:

* its model: ``op: Literal["name"]`` and its fields, with ALL of their validation
  (the field types of :mod:`imagekit.steps.fields`, field and model validators), so
  ``imagekit recipes validate`` finds whatever can be found before a build;
* the host files it reads: its :data:`~imagekit.steps.fields.HostPath` fields,
  resolved against the recipe's folder when the recipe is loaded (``host_files()``
  returns them absolute);
* the secrets it carries (``secrets()``: values masked in every log line, message
  and output);
* ``NETWORK``: ``"no"``, ``"optional"`` (the appliance gets a network for it when the
  run allows one) or ``"required"`` (refused before launching when it does not);
* ``OS_TYPES``: the guest OS types it applies to; recipe validation refuses the step
  in a recipe whose ``os.type`` is not one of them (validation context ``os_type``);
* its effect: ``linux(ctx)`` and ``windows(ctx)``, each returning a
  :class:`StepOutcome` or raising :class:`StepFailure`. The defaults say the step
  does not apply; ``apply(ctx)`` calls the one for the guest's OS type (from
  libguestfs inspection).

:class:`StepContext` is what a step works with: the open guest session, whether
the appliance has a network, the secrets of the run's steps, flags steps of one run
share (``apt-updated``), and helpers (run a shell script in the guest, shorten a text
with its secrets masked first, systemd and Debian-family checks). Summaries and
outputs a step returns are masked by the run loop; a step that shortens a text must
use ``ctx.one_line`` so that no cut, unrecognisable part of a secret remains.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from pydantic import ValidationInfo, model_validator

from imagekit.errors import ImagekitError, RecipeError
from imagekit.secrets import Secrets
from imagekit.specs import SpecModel
from imagekit.steps.fields import HOST_PATH, OS_TYPE, resolve_host_path

if TYPE_CHECKING:
    from typing import Self

    from imagekit.guest import GuestSession

Network = Literal["no", "optional", "required"]


class StepFailure(ImagekitError):
    """A step could not do its work: what failed, the command it ran and that command's output."""

    code = "step-failed"

    def __init__(self, message: str, hint: str | None = None, *, command: str | None = None, output: str = "") -> None:
        super().__init__(message, hint)
        self.command = command
        self.output = output


class HostFileError(RecipeError):
    """A host file a step reads is missing or unreadable."""

    code = "host-file-unreadable"


@dataclass(frozen=True)
class StepOutcome:
    """What a step did: a one-line summary, and the output of any command it ran."""

    summary: str
    output: str = ""


@dataclass
class StepContext:
    """The open guest session a run's steps work on, and what they share."""

    session: GuestSession
    network: bool
    secrets: Secrets = field(default_factory=Secrets)  # of all the run's steps
    flags: set[str] = field(default_factory=set)  # shared by the steps of one run, e.g. "apt-updated"

    @property
    def g(self) -> Any:
        """The libguestfs handle."""
        return self.session.g

    @functools.cached_property
    def os_type(self) -> str:
        return self.session.os_type

    def sh(self, script: str, timeout: float, what: str, env: dict[str, str] | None = None) -> str:
        """Run ``script`` in the guest; a non-zero exit or a timeout raises StepFailure with the output."""
        res = self.session.run(script, timeout, env=env)
        if res.timed_out:
            raise StepFailure(f"{what} did not finish within {timeout:g} s and was stopped",
                              "raise the step's timeout if the command is just slow", command=script, output=res.output)
        if res.status != 0:
            raise StepFailure(f"{what} exited with status {res.status}", command=script, output=res.output)
        return res.output

    def one_line(self, text: str, n: int = 80) -> str:
        """``text`` on one line, cut to ``n`` characters, secrets masked BEFORE it is cut (a cut
        secret would no longer be recognised)."""
        return one_line(self.secrets.scrub(text), n)

    def has_any(self, *paths: str) -> bool:
        return any(self.session.exists(p) for p in paths)

    def systemd(self) -> bool:
        return self.has_any("/usr/bin/systemctl", "/bin/systemctl")

    def debian_like(self) -> bool:
        s = self.session
        return s.distro in ("debian", "ubuntu", "linuxmint", "kalilinux") or s.package_format == "deb"


def _has_host_path_marker(tp: Any) -> bool:
    if HOST_PATH in (getattr(tp, "__metadata__", ()) or ()):
        return True
    return any(_has_host_path_marker(a) for a in (getattr(tp, "__args__", ()) or ()))


class StepBase(SpecModel):
    """One customise step: model, validation, host files, secrets, network, OS types and effect."""

    NETWORK: ClassVar[Network] = "no"
    OS_TYPES: ClassVar[frozenset[str]] = frozenset({"linux"})

    op: str

    # ------------------------------------------------------------ what the step is

    @classmethod
    def op_name(cls) -> str:
        """The ``op`` value of this class (its ``Literal``)."""
        args = get_args(cls.model_fields["op"].annotation)
        return str(args[0]) if args else ""

    @classmethod
    @functools.cache
    def host_path_fields(cls) -> tuple[str, ...]:
        """Names of the fields that are host files (typed HostPath, alone, optional or in a list)."""
        return tuple(name for name, f in cls.model_fields.items()
                     if HOST_PATH in f.metadata or _has_host_path_marker(f.annotation))

    def host_files(self) -> tuple[Path, ...]:
        """The host files this step reads, absolute (resolved when the step was validated)."""
        out: list[Path] = []
        for name in self.host_path_fields():
            value = getattr(self, name)
            for v in value if isinstance(value, list | tuple) else (value,):
                if isinstance(v, str) and v:
                    out.append(Path(v))
        return tuple(out)

    def secrets(self) -> tuple[str, ...]:
        """Values this step carries that must never be shown (password hashes and the like)."""
        return ()

    @classmethod
    def anchor_host_paths(cls, raw: dict[str, Any], base_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """A raw step mapping with its relative host paths made absolute against ``base_dir``
        (the recipe loader does this for steps a recipe inherits through ``extends``)."""
        out = dict(raw)
        for name in cls.host_path_fields():
            value = out.get(name)
            if isinstance(value, str) and value:
                out[name] = str(resolve_host_path(value, base_dir))
            elif isinstance(value, list):
                out[name] = [str(resolve_host_path(v, base_dir)) if isinstance(v, str) and v else v for v in value]
        return out

    @model_validator(mode="after")
    def _applies_to_os(self, info: ValidationInfo) -> Self:
        os_type = info.context.get(OS_TYPE) if isinstance(info.context, dict) else None
        if os_type is not None and os_type not in self.OS_TYPES:
            raise ValueError(f"step '{self.op}' does not apply to {os_type} guests "
                             f"(it applies to: {', '.join(sorted(self.OS_TYPES))})")
        return self

    # ------------------------------------------------------------ what the step does

    def apply(self, ctx: StepContext) -> StepOutcome:
        """Do the step on the guest of ``ctx``: ``linux()`` or ``windows()`` by the guest's OS type."""
        os_type = ctx.os_type
        if os_type not in self.OS_TYPES:
            raise StepFailure(f"step '{self.op}' does not apply to {os_type} guests",
                              f"it applies to: {', '.join(sorted(self.OS_TYPES))}")
        return self.windows(ctx) if os_type == "windows" else self.linux(ctx)

    def linux(self, ctx: StepContext) -> StepOutcome:
        """The step's effect on a Linux guest (the default: it does not apply)."""
        raise StepFailure(f"step '{self.op}' does not apply to linux guests")

    def windows(self, ctx: StepContext) -> StepOutcome:
        """The step's effect on a Windows guest (the default: it does not apply)."""
        raise StepFailure(f"step '{self.op}' does not apply to windows guests")


def one_line(text: str, n: int = 80) -> str:
    """``text`` on one line, cut to ``n`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= n else line[: n - 3] + "..."
