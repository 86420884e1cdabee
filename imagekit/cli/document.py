"""The one JSON document a command prints with ``--json``: envelope, result, error.

Every document is an object::

    {"schema_version": 1, "command": "check", <the command's result fields>, "ok": true, "error": null}

On failure ``ok`` is false and ``error`` is an object (``code``, ``message``, ``hint``,
``exit_code``, ``kind`` and what the error carries: ``problems``, a ``verdict``, the step
that failed, ...), next to whatever result the command had produced before failing (the
verdict of a rejected image, the stages of a build that failed). The result is first
validated against the command's declared result type (``@result_type``): a result that does
not match is a bug, reported on stderr (and raised when ``IMAGEKIT_STRICT_RESULTS`` is set,
as the test suite does), never silently reshaped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import click

SCHEMA_VERSION = 1
log = logging.getLogger("imagekit.cli")


class ResultShapeError(RuntimeError):
    """A command produced a result its declared type does not describe (a bug)."""


def to_jsonable(obj: Any) -> Any:
    """A result as JSON data: pydantic models and dataclasses through pydantic."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        from pydantic import TypeAdapter

        return TypeAdapter(type(obj)).dump_python(obj, mode="json")
    return obj


def normalise(tp: Any, data: Any) -> Any:
    """``data`` validated against ``tp`` and dumped as JSON data (the form the schema describes)."""
    from pydantic import TypeAdapter, ValidationError

    adapter: TypeAdapter[Any] = TypeAdapter(tp)
    try:
        value = adapter.validate_python(to_jsonable(data), context={"base_dir": Path.cwd()})
        return adapter.dump_python(value, mode="json")
    except ValidationError as exc:
        if os.environ.get("IMAGEKIT_STRICT_RESULTS"):
            raise ResultShapeError(f"result does not match {getattr(tp, '__name__', tp)}: {exc}") from exc
        log.warning("the --json result does not match its declared type (please report): %s", exc)
        return to_jsonable(data)


def command_path(group: click.Group, args: list[str]) -> str | None:
    """The command named by ``args`` ("cache list"), walking the click groups; None when none is named."""
    words: list[str] = []
    node: click.Command = group
    takes_value = {"--accel"}
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = arg in takes_value
            continue
        if not isinstance(node, click.Group) or arg not in node.commands:
            break
        node = node.commands[arg]
        words.append(arg)
    return " ".join(words) or None


def error_object(exc: Any, exit_code: int) -> dict[str, Any]:
    """The ``error`` object of a failed command, from an ImagekitError (or a code/message pair)."""
    data = dict(exc.to_dict()) if hasattr(exc, "to_dict") else dict(exc)
    message = data.pop("error", None) or data.pop("message", "")
    out = {"code": data.pop("code", "failed"), "message": message, "hint": data.pop("hint", None),
           "exit_code": exit_code, "kind": data.pop("kind", "error")}
    data.pop("ok", None)
    out.update({k: to_jsonable(v) for k, v in data.items()})
    return out


def document(command: str | None, result: Any, ok: bool, error: dict[str, Any] | None) -> dict[str, Any]:
    body = result if isinstance(result, dict) else ({} if result is None else {"result": result})
    return {"schema_version": SCHEMA_VERSION, "command": command, **body, "ok": ok, "error": error}


def write(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False, default=str))
