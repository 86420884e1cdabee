"""Shared fixtures: run the real CLI in a subprocess, isolated cache/state directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.glance_fixture", "tests.ci_fixture", "tests.nova_fixture", "tests.debian_build"]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One imagekit cache directory per test session (the KVM probe runs at most once)."""
    return tmp_path_factory.mktemp("imagekit-cache")


@pytest.fixture(autouse=True)
def _isolated_dirs(session_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(session_cache))
    monkeypatch.setenv("IMAGEKIT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("IMAGEKIT_RECIPE_PATH", raising=False)
    monkeypatch.delenv("IMAGEKIT_ACCEL", raising=False)
    # a --json result that does not match its command's declared type fails the test
    monkeypatch.setenv("IMAGEKIT_STRICT_RESULTS", "1")


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture
def imagekit() -> Callable[..., CliResult]:
    """Run ``python -m imagekit ARGS`` as a user would; returns exit code, stdout, stderr."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: str | None = None) -> CliResult:
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        proc = subprocess.run(
            [sys.executable, "-m", "imagekit", *args],
            capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or str(ROOT),
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture(scope="session", autouse=True)
def _finding_codes_are_documented() -> Iterator[None]:
    """Every finding code the tests see a check emit (hostile images, fuzzing) is documented in
    imagekit.finding_codes: a runtime complement to tests/test_finding_codes.py's source scan."""
    from imagekit import finding_codes, verdict

    seen: set[str] = set()
    real = verdict.Findings.add

    def add(self: verdict.Findings, code: str, severity: verdict.Severity, message: str) -> None:
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_globals.get("__name__") == "imagekit.verdict":
            frame = frame.f_back  # reject()/warn()/info() call add()
        if frame.f_globals.get("__name__", "").startswith("imagekit"):  # not the tests' own fakes
            seen.add(code)
        real(self, code, severity, message)

    verdict.Findings.add = add  # type: ignore[method-assign]
    yield
    verdict.Findings.add = real  # type: ignore[method-assign]
    undocumented = seen - set(finding_codes.CODES)
    assert not undocumented, f"finding codes emitted but not documented in imagekit/finding_codes.py: {undocumented}"


_MUTMUT_PHASES = {"", "stats", "fail", "list_all_tests", "mutant_generation"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``make mutate`` only (a mutant is active): run the mutant's tests fastest first, by the
    durations mutmut recorded, so that ``-x`` stops at the first (cheapest) test that kills it."""
    if os.environ.get("MUTANT_UNDER_TEST", "") in _MUTMUT_PHASES:
        return
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: float(durations.get(item.nodeid, 1e9)))
