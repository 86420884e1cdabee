"""JSON Schemas of the ``--json`` documents, generated from the commands' declared result types.

``schema_for(command)`` builds the schema of one command's document: the envelope every
document has (``schema_version``, ``command``, ``ok``, ``error``) and, when ``ok`` is true,
the command's result type (``@result_type``, the same pydantic/dataclass types the output
layer validates results against). When ``ok`` is false the document holds an ``error``
object and whatever partial result the command produced. ``write_all(folder)`` writes one
file per command (``check.json``, ``cache-list.json``, ...) plus an index;
``python -m imagekit.cli.schemas docs/schemas`` regenerates the published copies (a test
fails when they differ from what the code declares).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from imagekit.cli.document import SCHEMA_VERSION
from imagekit.cli.output import RESULT_TYPES, resolve_type

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Why the command failed. Errors carry more fields of their own (problems, verdict, step...).",
    "required": ["code", "message", "hint", "exit_code", "kind"],
    "properties": {
        "code": {"type": "string", "description": "stable, kebab-case error code (e.g. unsafe-image, usage)"},
        "message": {"type": "string", "description": "what went wrong"},
        "hint": {"type": ["string", "null"], "description": "what to do"},
        "exit_code": {"type": "integer", "description": "the process exit code: 1 failed, 2 usage, 3 unsafe, 130+"},
        "kind": {"type": "string"},
        "problems": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": True,
}
ENVELOPE: dict[str, Any] = {
    "schema_version": {"const": SCHEMA_VERSION},
    "command": {"type": ["string", "null"], "description": "the command path, e.g. 'cache list'"},
    "ok": {"type": "boolean", "description": "true when the command succeeded (exit code 0)"},
    "error": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Error"}]},
}


def file_name(command: str) -> str:
    return command.replace(" ", "-") + ".json"


def _result_schema(command: str) -> dict[str, Any]:
    from pydantic import TypeAdapter

    return TypeAdapter(resolve_type(RESULT_TYPES[command])).json_schema(mode="serialization")


def _with_envelope(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The result object schema ``node`` (inline or a $ref) with the envelope's keys allowed in it."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        doc_name = f"{name}Document"
        if doc_name not in defs:
            defs[doc_name] = _with_envelope(copy.deepcopy(defs[name]), defs)
        return {"$ref": f"#/$defs/{doc_name}"}
    if "anyOf" in node:
        return {**node, "anyOf": [_with_envelope(n, defs) for n in node["anyOf"]]}
    out = copy.deepcopy(node)
    out.setdefault("properties", {}).update(copy.deepcopy(ENVELOPE))
    return out


def schema_for(command: str) -> dict[str, Any]:
    result = _result_schema(command)
    defs = result.pop("$defs", {})
    success = _with_envelope(result, defs)
    defs["Error"] = ERROR_SCHEMA
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://imagekit.invalid/schemas/{file_name(command)}",
        "title": f"imagekit {command} --json",
        "description": f"The one JSON document 'imagekit {command} --json' prints on stdout, on success and "
                       "on failure (then ok is false, error says why, and the result is partial).",
        "type": "object",
        "required": list(ENVELOPE),
        "properties": copy.deepcopy(ENVELOPE),
        "if": {"properties": {"ok": {"const": True}}},
        "then": {"allOf": [success], "properties": {"error": {"type": "null"}}},
        "else": {"properties": {"error": {"$ref": "#/$defs/Error"}}},
        "$defs": defs,
    }


def all_schemas() -> dict[str, dict[str, Any]]:
    import imagekit.cli  # noqa: F401 - registers every command and its result type

    return {file_name(c): schema_for(c) for c in sorted(RESULT_TYPES)}


def index() -> str:
    rows = "\n".join(f"| `imagekit {c} --json` | [{file_name(c)}]({file_name(c)}) |" for c in sorted(RESULT_TYPES))
    return ("# JSON Schemas of imagekit's `--json` output\n\n"
            "With `--json`, every command prints exactly one JSON document on stdout, on success and on\n"
            "failure (exit code unchanged). Every document has `schema_version`, `command`, `ok` and `error`\n"
            "(null, or an object with `code`, `message`, `hint`, `exit_code`); on success the command's\n"
            "result fields sit next to them. `imagekit guest-inspect --sbom` prints the SBOM itself\n"
            "(CycloneDX 1.5 or SPDX 2.3). Generated from the code's result types by\n"
            "`python -m imagekit.cli.schemas docs/schemas`.\n\n"
            f"| command | schema |\n|---|---|\n{rows}\n")


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas().items():
        path = folder / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    (folder / "README.md").write_text(index(), encoding="utf-8")
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        sys.stderr.write(f"wrote {p}\n")
