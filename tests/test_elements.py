"""Lint imagekit's diskimage-builder elements: README, strict scripts, valid syntax, known deps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

ELEMENTS = ROOT / "elements"
HOOK_DIRS = ("root.d", "extra-data.d", "pre-install.d", "install.d", "post-install.d", "block-device.d",
             "pre-finalise.d", "finalise.d", "cleanup.d", "environment.d")


def elements() -> list[Path]:
    return sorted(p for p in ELEMENTS.iterdir() if p.is_dir())


def scripts(el: Path) -> list[Path]:
    return sorted(f for d in HOOK_DIRS if (el / d).is_dir() for f in (el / d).iterdir() if f.is_file())


def test_there_are_elements() -> None:
    assert [e.name for e in elements()] == ["imagekit-openstack"]


@pytest.mark.parametrize("el", elements(), ids=lambda p: p.name)
def test_element_has_readme(el: Path) -> None:
    readme = [p for p in el.iterdir() if p.name.lower().startswith("readme")]
    assert readme and len(readme[0].read_text().strip()) > 40


@pytest.mark.parametrize("el", elements(), ids=lambda p: p.name)
def test_scripts_are_strict_executable_and_parse(el: Path) -> None:
    found = scripts(el)
    assert found
    for s in found:
        if s.parent.name == "environment.d":
            continue  # sourced, not executed
        text = s.read_text()
        assert text.startswith("#!/bin/bash\n"), s
        assert "set -eu" in text and "set -o pipefail" in text, f"{s}: needs set -eu and set -o pipefail"
        assert s.stat().st_mode & 0o111, f"{s} is not executable"
        subprocess.run(["bash", "-n", str(s)], check=True)


@pytest.mark.parametrize("el", elements(), ids=lambda p: p.name)
def test_element_deps_exist(el: Path) -> None:
    import diskimage_builder

    dib_elements = Path(diskimage_builder.__file__).parent / "elements"
    deps = el / "element-deps"
    if not deps.exists():
        return
    for dep in deps.read_text().split():
        assert (dib_elements / dep).is_dir() or (ELEMENTS / dep).is_dir(), f"unknown element {dep}"
