"""How a pydantic ``ValidationError`` becomes the problem lines of a ``RecipeError``.

``problems(exc, data, prefix, known_keys)`` turns each error into one line
``PATH: WHAT``, the path written as a recipe author reads it
(``customise[2].packages[0]``, ``build.base.sha256``, ``(top level)``) and the
reason in plain words (``expected a list, got 'vim'``, ``unknown key (did you mean
'mode'?)``). Used by the recipe loader (``imagekit.recipe``) and by
``imagekit.steps.parse_step_texts`` (the CLI's ``--step``). Imports nothing else of
imagekit, so every layer can use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

# The keys that tag a mapping's kind in a discriminated union (pydantic adds the tag to the path).
TAG_KEYS = ("op", "method")

_TYPE_WORDS = {
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "missing": "required field is missing",
}


def problems(exc: ValidationError, data: Any, prefix: str = "", known_keys: Iterable[str] = ()) -> list[str]:
    """One ``PATH: WHAT`` line per error of ``exc`` (``data`` is what was validated)."""
    keys = sorted(set(known_keys))
    out = []
    for err in exc.errors():
        where = format_loc(tuple(err["loc"]), data, prefix)
        out.append(f"{where}: {message(err, keys)}")
    return out


def format_loc(loc: tuple[Any, ...], data: Any, prefix: str = "") -> str:
    """``('customise', 0, 'hostname', 'hostname')`` -> ``customise[0].hostname``.

    The tag pydantic inserts for a discriminated union (the value of ``op`` or
    ``method``, right after the path reaches that mapping) is dropped, even when a field
    has the same name as the tag's value (``{op: hostname, hostname: ...}``).
    """
    parts: list[str] = [prefix] if prefix else []
    cur = data
    fresh = True  # the path just reached ``cur``: a union tag may come next
    for el in loc:
        if isinstance(el, int):
            parts.append(f"[{el}]")
            cur = cur[el] if isinstance(cur, list) and 0 <= el < len(cur) else None
            fresh = True
            continue
        el = str(el)
        if fresh and isinstance(cur, dict) and el in (cur.get(k) for k in TAG_KEYS):
            fresh = False
            continue  # the tag pydantic adds for a discriminated union
        if "[" in el or "(" in el:
            continue
        parts.append(("." if parts else "") + el)
        cur = cur.get(el) if isinstance(cur, dict) else None
        fresh = True
    return "".join(parts) or "(top level)"


def message(err: Any, known_keys: Iterable[str] = ()) -> str:
    """The reason of one pydantic error, in the words of a recipe author."""
    typ = err["type"]
    if typ in _TYPE_WORDS:
        msg = _TYPE_WORDS[typ]
        if typ != "missing":
            msg += f", got {describe(err.get('input'))}"
        return msg
    ctx = err.get("ctx") or {}
    if typ == "extra_forbidden":
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, sorted(known_keys), n=1)
        return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    if typ == "literal_error":
        return f"expected one of {ctx.get('expected', '')}, got {describe(err.get('input'))}"
    if typ == "union_tag_invalid":
        return f"unknown value '{ctx.get('tag')}' (expected one of {ctx.get('expected_tags')})"
    if typ == "union_tag_not_found":
        return f"missing '{ctx.get('discriminator', '').strip(chr(39))}' (what kind of entry this is)"
    if typ == "too_short":
        return "must not be empty"
    if typ in ("greater_than_equal", "greater_than"):
        return f"must be {'>=' if typ.endswith('equal') else '>'} {ctx.get('ge', ctx.get('gt'))}"
    msg = str(err.get("msg", typ))
    return msg.removeprefix("Value error, ")


def describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"'{value[:40]}'"
    if isinstance(value, int | float):
        return f"{type(value).__name__} {value}"
    return type(value).__name__
