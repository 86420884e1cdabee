"""The house rules that ruff cannot check: module and function sizes, and one way to run programs.

- every module of the package is at most 600 lines, every function at most 80;
- only ``imagekit.run`` and ``imagekit.process`` import ``subprocess`` (the one helper for
  programs run to completion and the one for long-lived processes); ``partloop`` is a
  program diskimage-builder runs, not library code, and is the documented exception;
- only the CLI package prints (no ``print(`` in library modules; ``partloop`` again excepted).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "imagekit"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
SUBPROCESS_ALLOWED = {"imagekit/run.py", "imagekit/process.py", "imagekit/partloop.py"}
PRINT_ALLOWED = {"imagekit/partloop.py"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_modules_are_small() -> None:
    big = {_rel(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_are_small() -> None:
    long: dict[str, int] = {}
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{_rel(p)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_programs_run_through_one_helper() -> None:
    offenders = [_rel(p) for p in _modules()
                 if _rel(p) not in SUBPROCESS_ALLOWED and "subprocess" in _imports(ast.parse(p.read_text()))]
    assert not offenders, f"these modules import subprocess instead of imagekit.run / imagekit.process: {offenders}"


def test_only_the_cli_prints() -> None:
    offenders = []
    for p in _modules():
        rel = _rel(p)
        if rel.startswith("imagekit/cli") or rel in PRINT_ALLOWED:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"library code prints (only imagekit.cli may): {offenders}"


def test_the_cli_starts_light() -> None:
    """Importing the command line loads no heavy library: quick commands (check, --version) stay quick."""
    import subprocess
    import sys

    heavy = ("pydantic", "yaml", "rich", "numpy", "imagekit.builders", "imagekit.recipe", "glanceclient", "openstack")
    code = f"import imagekit.cli, sys; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "", f"imported at start-up: {out.strip()}"
