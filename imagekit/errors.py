"""Typed errors. Library code raises these; only ``cli`` prints them and exits.

Every error carries a message (what went wrong) and an optional hint (what to do).
``exit_code`` follows the CLI contract: 1 failed, 2 bad usage or invalid recipe,
3 unsafe image.
"""

from __future__ import annotations


class ImagekitError(Exception):
    """Base class of every error imagekit raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict[str, object]:
        return {"error": self.message, "hint": self.hint, "kind": type(self).__name__}


class UsageError(ImagekitError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class RecipeError(ImagekitError):
    """A recipe is missing, malformed or invalid. ``problems`` lists every finding."""

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


class UnsafeImageError(ImagekitError):
    """An image failed the safety check; ``verdict`` holds the findings."""

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


class ToolNotFound(ToolError):
    pass


class ToolFailed(ToolError):
    def __init__(self, message: str, hint: str | None = None, returncode: int | None = None, output: str = "") -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.output = output


class ToolTimeout(ToolError):
    pass


class OutputExistsError(ImagekitError):
    exit_code = 1
