"""Typed errors. Library code raises these; only ``cli`` prints them and exits.

Every error carries a message (what went wrong) and an optional hint (what to do).
``exit_code`` follows the CLI contract: 1 failed, 2 bad usage or invalid recipe,
3 unsafe image. ``code`` is a stable, kebab-case name for machines (the ``error.code``
of a ``--json`` document); every subclass that means something new sets its own.
"""

from __future__ import annotations


class ImagekitError(Exception):
    """Base class of every error imagekit raises on purpose."""

    exit_code = 1
    code = "failed"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        # what the failing command had produced (e.g. the stages of a build): the CLI puts it in
        # the --json document next to the error
        self.partial: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        return {"error": self.message, "hint": self.hint, "kind": type(self).__name__, "code": self.code}


class UsageError(ImagekitError):
    """The command line asks for something that cannot be done as asked."""

    code = "usage"
    exit_code = 2


class RecipeError(ImagekitError):
    """A recipe is missing, malformed or invalid. ``problems`` lists every finding."""

    code = "recipe-invalid"
    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None) -> None:
        super().__init__(message, hint)
        self.problems = list(problems or [])

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d["problems"] = self.problems
        return d


class ImageReadError(ImagekitError):
    """An image cannot be read (missing, unreadable, truncated while reading)."""

    code = "image-unreadable"


class UnsafeImageError(ImagekitError):
    """An image failed the safety check; ``verdict`` holds the findings."""

    code = "unsafe-image"
    exit_code = 3

    def __init__(self, message: str, hint: str | None = None, verdict: object | None = None) -> None:
        super().__init__(message, hint)
        self.verdict = verdict

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        to_dict = getattr(self.verdict, "to_dict", None)
        if to_dict is not None:
            d["verdict"] = to_dict()
        return d


class ToolError(ImagekitError):
    """An external program is missing, failed or timed out."""

    code = "tool-failed"


class ToolNotFound(ToolError):
    code = "tool-missing"


class ToolFailed(ToolError):
    def __init__(self, message: str, hint: str | None = None, returncode: int | None = None, output: str = "") -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.output = output


class ToolTimeout(ToolError):
    code = "tool-timeout"


class OutputExistsError(ImagekitError):
    """The output already exists and replacing it was not asked for."""

    code = "output-exists"
