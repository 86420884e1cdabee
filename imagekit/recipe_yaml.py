"""Reading recipe and pipeline YAML files from untrusted hands, at bounded cost.

Recipes (and pipeline files) come from merge requests: a hostile one must be refused as
cheaply as a typo. ``read_mapping(path)`` enforces, before anything is built from the text:

- a size limit (``MAX_BYTES``);
- no aliases (``*name``): an "alias bomb" of a few hundred bytes expands to gigabytes when
  aliases are followed (anchors alone are harmless and allowed);
- a nesting depth limit (``MAX_DEPTH``) and a limit on the number of YAML nodes
  (``MAX_NODES``);
- the top level is a mapping with string keys.

The limits are checked on the parser's event stream (linear in the text, nothing expanded),
and only then is the text loaded with ``yaml.safe_load``. Every violation is a
``RecipeError`` naming the file, the line and column, and the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from imagekit.errors import RecipeError

MAX_BYTES = 256 * 1024
MAX_DEPTH = 24
MAX_NODES = 20_000
_YAML_HINT = "check indentation and quoting; strings containing ': ' or starting with '{' need quotes"


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def check_events(text: str, source: str) -> None:
    """Refuse aliases, too deep nesting and too many nodes, from the parser's events alone."""
    depth = nodes = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise RecipeError(f"{source}: YAML aliases (*{event.anchor}) are not allowed{_where(event.start_mark)}",
                                  "write the value out again instead of referring to an &anchor")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError(f"{source}: nesting deeper than {MAX_DEPTH} levels{_where(event.start_mark)}",
                                      "recipes are a few levels deep; this file is not a recipe")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_NODES:
                    raise RecipeError(f"{source}: more than {MAX_NODES} YAML nodes{_where(event.start_mark)}",
                                      "recipes are small; this file is not a recipe")
    except yaml.YAMLError as exc:
        raise _syntax_error(source, exc) from exc


def _syntax_error(source: str, exc: yaml.YAMLError) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return RecipeError(f"{source}: not valid YAML{_where(mark)}: {problem}", _YAML_HINT)


def loads_mapping(text: str, source: str) -> dict[str, Any]:
    """A YAML mapping from ``text``, within the limits (see the module documentation)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise RecipeError(f"{source}: the file is larger than {MAX_BYTES // 1024} KiB",
                          "recipes are small; this file is not a recipe")
    check_events(text, source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _syntax_error(source, exc) from exc
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. a timestamp out of range
        raise RecipeError(f"{source}: a value cannot be read: {exc}", _YAML_HINT) from exc
    if data is None:
        raise RecipeError(f"{source}: the file is empty", "a recipe is a YAML mapping with name, description, os, build")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, not a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"{source}: top-level keys must be names, not {', '.join(repr(k) for k in bad[:3])}")
    return data


def read_mapping(path: Path) -> dict[str, Any]:
    """Read ``path`` (at most ``MAX_BYTES`` are read) and return its YAML mapping."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError as exc:
        raise RecipeError(f"recipe file {path} does not exist") from exc
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_BYTES:
        raise RecipeError(f"{path}: the file is larger than {MAX_BYTES // 1024} KiB",
                          "recipes are small; this file is not a recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"cannot read recipe file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return loads_mapping(text, str(path))
