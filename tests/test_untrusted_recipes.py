"""Recipes from untrusted hands: bounded loading, confined mode, and no crash on any YAML.

- Loading is bounded: aliases refused (the alias bomb of the issue: 700 bytes, eight levels of
  nine, used to take 24 s and 1.7 GB), size, nesting depth and node count limited; each a
  validation error with the file and line. Memory and CPU are bounded by resource limits on
  the CLI process and by tracemalloc in process (no timing asserts).
- ``--confined``: each rule refused with the field's path (docs/trust-model.md).
- Any YAML document ends in a recipe or a RecipeError, never another exception.
"""

from __future__ import annotations

import os
import resource
import string
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagekit import recipe as rec
from imagekit import recipe_yaml
from imagekit.errors import RecipeError
from tests.conftest import ROOT

BASE = ("name: r\ndescription: d\nos: {type: linux, distro: debian, version: '12'}\n"
        "build: {method: dib, elements: [vm]}\ndisk_size: 2G\n")


def alias_bomb(levels: int, width: int = 9) -> str:
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"{names[i]}: &{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * width) + "]")
    return "\n".join(lines) + "\nname: bomb\n"


def _limited() -> None:  # in the child: 512 MiB of address space, 20 s of CPU
    resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (20, 20))


@pytest.mark.parametrize("levels", [8, 12])
def test_alias_bomb_is_refused_within_bounded_resources(tmp_path: Path, levels: int) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(levels))
    assert len(bomb.read_bytes()) < 1200
    proc = subprocess.run([sys.executable, "-m", "imagekit", "recipes", "validate", str(bomb)], capture_output=True,
                          text=True, cwd=ROOT, preexec_fn=_limited, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "YAML aliases (*l0) are not allowed (line 2" in proc.stdout
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match="aliases"):
            recipe_yaml.read_mapping(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20  # the event scan never builds the expansion


def test_anchors_without_aliases_are_fine(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(BASE.replace("disk_size: 2G", "disk_size: &size 2G"))
    assert rec.load(p).disk_size == "2G"


def test_size_depth_and_node_limits(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "# " + "x" * recipe_yaml.MAX_BYTES + "\n")
    with pytest.raises(RecipeError, match="larger than 256 KiB"):
        rec.load(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text(BASE + "vars: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(RecipeError, match=r"nesting deeper than 24 levels \(line 6"):
        rec.load(deep)
    wide = tmp_path / "wide.yaml"
    wide.write_text(BASE + "vars: [" + ", ".join("x" for _ in range(recipe_yaml.MAX_NODES)) + "]\n")
    with pytest.raises(RecipeError, match="more than 20000 YAML nodes"):
        rec.load(wide)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        rec.load(binary)
    numeric = tmp_path / "keys.yaml"
    numeric.write_text("1: a\nname: b\n")
    with pytest.raises(RecipeError, match="top-level keys must be names"):
        rec.load(numeric)


def test_extends_depth_and_loops_are_bounded(tmp_path: Path) -> None:
    for i in range(rec.MAX_EXTENDS_DEPTH + 2):
        (tmp_path / f"r{i}.yaml").write_text(f"extends: r{i + 1}\n" if i <= rec.MAX_EXTENDS_DEPTH else BASE)
    with pytest.raises(RecipeError, match="deeper than 10 levels"):
        rec.load(tmp_path / "r0.yaml")
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(RecipeError, match="loops"):
        rec.load(tmp_path / "a.yaml")


# ---------------------------------------------------------------- confined mode


def confined_problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        rec.load(path, confined=True)
    return exc.value.problems


@pytest.fixture
def fork(tmp_path: Path) -> Path:
    """A recipe folder as a merge request would bring it, with one harmless file."""
    d = tmp_path / "fork"
    (d / "files").mkdir(parents=True)
    (d / "files" / "motd").write_text("hello\n")
    return d


def test_confined_accepts_a_tame_recipe_and_shipped_parents(fork: Path) -> None:
    r = fork / "tame.yaml"
    r.write_text("extends: debian-12\nname: tame\ncustomise+:\n  - {op: upload, src: files/motd, dest: /etc/motd}\n")
    loaded = rec.load(r, confined=True)
    assert loaded.build.env  # the shipped parent's environment is trusted
    assert rec.load("ubuntu-24.04", confined=True).name == "ubuntu-24.04"


def test_confined_refuses_host_files_outside_the_folder(fork: Path, tmp_path: Path) -> None:
    secret = tmp_path / "clouds.yaml"
    secret.write_text("password: hunter2\n")
    (fork / "files" / "link").symlink_to(secret)
    r = fork / "r.yaml"
    r.write_text(BASE + "customise:\n  - {op: upload, src: ../clouds.yaml, dest: /root/c}\n"
                 "  - {op: upload, src: files/link, dest: /root/l}\n"
                 "  - {op: upload, src: files/motd, dest: /etc/motd}\n")
    problems = confined_problems(r)
    assert any(p.startswith("customise[0].src: '../clouds.yaml' is outside the recipe's folder") for p in problems)
    assert any(p.startswith("customise[1].src: 'files/link' is outside the recipe's folder") for p in problems)
    assert not any(p.startswith("customise[2]") for p in problems)
    assert rec.load(r).customise[1].src.endswith("files/link")  # not confined: allowed (a trusted recipe)


def test_confined_refuses_dib_environment_and_element_paths(fork: Path) -> None:
    r = fork / "r.yaml"
    r.write_text(BASE.replace("build: {method: dib, elements: [vm]}",
                              "build: {method: dib, elements: [vm, ../../evil], env: {ELEMENTS_PATH: /tmp/e, "
                              "DIB_RELEASE: bookworm}}"))
    problems = confined_problems(r)
    assert any(p.startswith("r.yaml: build.env.ELEMENTS_PATH: not allowed") for p in problems)
    assert not any("DIB_RELEASE: not allowed" in p for p in problems)
    assert any(p.startswith("r.yaml: build.elements[1]: '../../evil' is not an element name") for p in problems)


@pytest.mark.parametrize(("source", "expected"), [
    ("{url: 'http://example.org/i.img', sha256: '" + "a" * 64 + "'}", "build.base.url: 'http://example.org/i.img' is not https"),
    ("{url: 'https://example.org/i.img', checksum_url: 'https://example.org/SUMS'}", "build.base: no pinned sha256"),
    ("{url: 'https://example.org/i.img', trust: first-use}", "build.base: no pinned sha256"),
])
def test_confined_refuses_unpinned_or_plain_http_downloads(fork: Path, source: str, expected: str) -> None:
    r = fork / "r.yaml"
    r.write_text(BASE.replace("build: {method: dib, elements: [vm]}", f"build: {{method: cloud-image, base: {source}}}"))
    assert any(p.startswith(f"r.yaml: {expected}") for p in confined_problems(r))
    rec.load(r)  # accepted when trusted


def test_confined_refuses_public_images_and_outside_parents(fork: Path, tmp_path: Path) -> None:
    r = fork / "r.yaml"
    r.write_text(BASE + "glance: {visibility: public}\n")
    assert any("glance.visibility: 'public'" in p for p in confined_problems(r))
    outside = tmp_path / "outside.yaml"
    outside.write_text(BASE)
    child = fork / "child.yaml"
    child.write_text("extends: ../outside.yaml\nname: child\n")
    assert any("extends: '../outside.yaml' is outside the recipe's folder" in p for p in confined_problems(child))


def test_confined_cli(imagekit: Any, fork: Path, tmp_path: Path) -> None:
    r = fork / "r.yaml"
    r.write_text(BASE + "glance: {visibility: community}\n")
    res = imagekit("recipes", "validate", "--confined", str(r))
    assert res.code == 2 and "glance.visibility: 'community'" in res.out
    assert imagekit("recipes", "validate", str(r)).code == 0
    img = tmp_path / "x.raw"
    img.write_bytes(b"\0" * 4096)
    res = imagekit("upload", str(img), "--confined", "--visibility", "public", "--property", "x=y", "--cloud", "c",
                   "--json")
    assert res.code == 2
    problems = res.json()["error"]["problems"]
    assert "--visibility public: confined uploads are never public" in problems
    assert any(p.startswith("--property x:") for p in problems)


def test_trust_model_is_documented() -> None:
    doc = (ROOT / "docs" / "trust-model.md").read_text()
    for part in ("--confined", "root", "libguestfs appliance", "host files", "network"):
        assert part in doc
    assert "docs/trust-model.md" in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- any YAML: a recipe or a RecipeError

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(string.printable, max_size=20), st.sampled_from(["linux", "dib", "qcow2", "{name}",
                                                                              "{nope}", "10G", "-1", "0644"]))
_keys = st.sampled_from(["name", "description", "os", "build", "disk_size", "customise", "customise+", "output",
                         "glance", "vars", "extends", "abstract", "type", "method", "op", "elements", "url", "format",
                         "env", "src", "path", "packages", "x"])
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.one_of(_keys, st.integers(0, 3)), inner, max_size=5), max_leaves=25)
_documents = st.dictionaries(_keys, _values, max_size=8)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_documents, mangle=st.sampled_from(["none", "cut", "tab", "garbage"]))
def test_any_yaml_ends_in_a_recipe_or_a_recipe_error(tmp_path: Path, doc: dict[Any, Any], mangle: str) -> None:
    text = yaml.safe_dump(doc, default_flow_style=False, allow_unicode=True)
    if mangle == "cut":
        text = text[: len(text) // 2]
    elif mangle == "tab":
        text = text.replace("  ", "\t", 1)
    elif mangle == "garbage":
        text += "\n: : [ {\n"
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    for confined in (False, True):
        try:
            rec.load(path, confined=confined)
        except RecipeError:
            pass


def test_the_fuzz_harness_sees_valid_recipes_too(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(BASE)))
    assert rec.load(path, confined=True).name == "r"
    assert os.path.getsize(path) < recipe_yaml.MAX_BYTES
