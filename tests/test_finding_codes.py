"""Every finding code the code can emit is documented (imagekit.finding_codes), and the docs show them.

The emitted codes are found in the source: the first argument (a kebab-case string literal)
of every ``Finding(...)`` and of every ``reject/warn/info/add(code, ...)`` call with a message.
"""

from __future__ import annotations

import ast
import re

from imagekit import finding_codes
from tests.conftest import ROOT

KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
METHODS = ("reject", "warn", "info", "add", "Finding")


def emitted_codes() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted((ROOT / "imagekit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and len(node.args) >= 2):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            receiver = getattr(getattr(func, "value", None), "id", None)
            first = node.args[0]
            if (isinstance(name, str) and name.endswith(METHODS) and receiver not in ("log", "logging")
                    and isinstance(first, ast.Constant)
                    and isinstance(first.value, str) and KEBAB.match(first.value)):
                found.setdefault(first.value, str(path.relative_to(ROOT)))
    return found


def _tuple_codes() -> dict[str, str]:
    """Codes the qcow2 walk emits from tables of (key, code, text) tuples."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "imagekit" / "formats").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple) and len(node.elts) == 3 and all(isinstance(e, ast.Constant)
                                                                           for e in node.elts):
                code = node.elts[1].value
                if isinstance(code, str) and KEBAB.match(code) and "-" in code:
                    found.setdefault(code, str(path.relative_to(ROOT)))
    return found


def test_every_emitted_code_is_documented() -> None:
    codes = {**emitted_codes(), **_tuple_codes()}
    assert len(codes) > 100  # the scan really finds the verifiers' codes
    missing = {c: where for c, where in codes.items() if c not in finding_codes.CODES}
    assert not missing, f"finding codes without documentation in imagekit/finding_codes.py: {missing}"


def test_documented_codes_are_real() -> None:
    stale = sorted(set(finding_codes.CODES) - set(emitted_codes()) - set(_tuple_codes()))
    assert not stale, f"documented codes the code no longer emits: {stale}"


def test_docs_page_is_generated_from_the_table() -> None:
    page = (ROOT / "docs" / "finding-codes.md").read_text()
    assert page == finding_codes.markdown(), "regenerate: python -m imagekit.finding_codes > docs/finding-codes.md"


def test_cli_lists_the_codes(imagekit) -> None:  # type: ignore[no-untyped-def]
    res = imagekit("check", "--list-codes", "--json")
    assert res.code == 0, res.err
    doc = res.json()
    assert {c["code"] for c in doc["codes"]} == set(finding_codes.CODES)
    human = imagekit("check", "--list-codes")
    assert "backing-file" in human.out and "CVE-2024-32498" in human.out
