"""The ``--json`` contract, for any test that runs a command with ``--json``.

``assert_document(command, stdout)`` checks that stdout is exactly one JSON document and that
it validates against the published schema ``docs/schemas/<command>.json`` (JSON Schema
2020-12, with the real ``jsonschema`` validator); it returns the document.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator

from tests.conftest import ROOT

SCHEMAS = ROOT / "docs" / "schemas"


@cache
def validator(command: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / (command.replace(" ", "-") + ".json")).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def assert_document(command: str, stdout: str) -> dict[str, Any]:
    doc = json.loads(stdout)  # the whole of stdout: exactly one document (json.loads refuses trailing data)
    assert isinstance(doc, dict), doc
    errors = sorted(validator(command).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
    assert doc["command"] == command and doc["schema_version"] == 1
    assert (doc["error"] is None) == doc["ok"]
    return doc
