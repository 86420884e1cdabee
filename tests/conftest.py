"""Shared fixtures: run the real CLI in a subprocess, isolated cache/state directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.glance_fixture", "tests.nova_fixture", "tests.debian_build"]


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
