"""Recipe loading and validation: every shipped recipe is valid, every kind of
broken recipe is refused with all its problems, each with its path."""

from __future__ import annotations

import datetime as dt
import re
import textwrap
from pathlib import Path

import pytest

from imagekit import recipe
from imagekit.errors import RecipeError

GOOD = """\
name: tiny
description: a small test recipe
os: {type: linux, distro: debian, version: "12"}
build:
  method: cloud-image
  base:
    url: http://127.0.0.1/base.qcow2
    sha256: "%s"
disk_size: 2G
""" % ("a" * 64)

SHIPPED = ["centos7", "debian-12", "ubuntu-22.04", "ubuntu-24.04", "windows-server-2022"]


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def problems_of(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe.load(path)
    assert info.value.exit_code == 2
    return info.value.problems or [info.value.message]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_are_valid(name: str) -> None:
    r = recipe.load(name)
    assert r.name == name
    assert r.description
    assert r.disk_bytes >= 1 << 30
    assert r.digest and len(r.digest) == 64


def test_shipped_recipes_are_complete() -> None:
    centos = recipe.load("centos7")
    assert centos.build.method == "cloud-image"
    assert "GenericCloud" in centos.build.base.url and centos.build.base.checksum_url
    assert any(s.op == "write" and "vault.centos.org" in s.content for s in centos.customise)
    assert any(s.op == "selinux-relabel" for s in centos.customise)
    deb = recipe.load("debian-12")
    assert deb.build.method == "dib" and "debian-minimal" in deb.build.elements
    assert deb.build.env["DIB_RELEASE"] == "bookworm"
    assert deb.build.env["DIB_DEBIAN_SECURITY_MIRROR"].endswith("debian-security")
    noble, jammy = recipe.load("ubuntu-24.04"), recipe.load("ubuntu-22.04")
    assert "noble" in noble.build.base.url and "jammy" in jammy.build.base.url
    assert jammy.build.base.checksum_url.endswith("/jammy/release/SHA256SUMS")
    assert jammy.os.version == "22.04" and jammy.customise == noble.customise
    win = recipe.load("windows-server-2022")
    assert win.build.method == "windows" and win.os.type == "windows"
    assert win.build.install_media.sha256 and win.glance.properties["os_type"] == "windows"
    assert "virtio-win" in win.build.virtio_drivers.url and win.build.cloudbase_init.url.endswith(".msi")


def test_extends_deep_merges_and_appends(tmp_path: Path) -> None:
    write(tmp_path, "base", GOOD.replace("name: tiny", "abstract: true") + """\
glance:
  properties: {hw_disk_bus: virtio, hw_vif_model: virtio}
  tags: [a]
customise:
  - {op: hostname, hostname: one}
""")
    child = write(tmp_path, "child", """\
extends: base
name: child
glance:
  properties: {hw_vif_model: e1000}
  tags: [b]
customise+:
  - {op: timezone, timezone: UTC}
""")
    r = recipe.load(child)
    assert r.glance.properties == {"hw_disk_bus": "virtio", "hw_vif_model": "e1000"}  # merged key by key
    assert r.glance.tags == ["b"]  # lists are replaced
    assert [s.op for s in r.customise] == ["hostname", "timezone"]  # customise+ appends
    assert r.description == "a small test recipe"


def test_abstract_recipe_cannot_be_used(tmp_path: Path) -> None:
    p = write(tmp_path, "base", GOOD + "abstract: true\n")
    with pytest.raises(RecipeError, match="abstract"):
        recipe.load(p)


def test_variables_in_names_urls_env(tmp_path: Path) -> None:
    p = write(tmp_path, "v", GOOD.replace("http://127.0.0.1/base.qcow2", "http://127.0.0.1/{release}/{arch}.img") + """\
vars: {release: noble}
glance: {name: "{name}-{release}-{date}"}
output: {name: "{name}-{version}"}
""")
    r = recipe.load(p, now=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    assert r.build.base.url == "http://127.0.0.1/noble/x86_64.img"
    assert r.glance.name == "tiny-noble-20260102"
    assert r.output.name == "tiny-12"


def test_default_name_templates_are_substituted(tmp_path: Path) -> None:
    r = recipe.load(write(tmp_path, "plain", GOOD))
    assert r.output.name == "tiny" and r.glance.name == "tiny"
    assert recipe.load("debian-12").output.name == "debian-12"


def test_digest_is_stable_across_days(tmp_path: Path) -> None:
    p = write(tmp_path, "v", GOOD + 'glance: {name: "{name}-{date}"}\n')
    a = recipe.load(p, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    b = recipe.load(p, now=dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    assert a.glance.name != b.glance.name and a.digest == b.digest


def test_recipe_path_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "debian-12", GOOD.replace("name: tiny", "name: debian-12"))
    monkeypatch.setenv("IMAGEKIT_RECIPE_PATH", str(tmp_path))
    r = recipe.load("debian-12")
    assert r.build.method == "cloud-image" and r.source == str(tmp_path / "debian-12.yaml")


# ---- broken recipes: each case is (description, recipe text, expected problem lines)
BROKEN = [
    ("unknown top-level key with suggestion", GOOD + "descripton: x\n",
     ["descripton: unknown key (did you mean 'description'?)"]),
    ("missing required fields", "name: x\nos: {type: linux, distro: d, version: '1'}\n",
     ["description: required field is missing", "build: required field is missing",
      "disk_size: required field is missing"]),
    ("wrong type: packages not a list", GOOD + "customise:\n  - {op: install, packages: vim}\n",
     ["customise[0].packages: expected a list, got 'vim'"]),
    ("bad enum", GOOD.replace("type: linux", "type: bsd"),
     ["os.type: expected one of 'linux' or 'windows', got 'bsd'"]),
    ("unknown step", GOOD + "customise:\n  - {op: hostname, hostname: h}\n  - {op: frobnicate}\n",
     ["customise[1]: unknown value 'frobnicate'"]),
    ("step without op", GOOD + "customise:\n  - {path: /x}\n", ["customise[0]: missing 'op'"]),
    ("unknown key inside a step", GOOD + "customise:\n  - {op: mkdir, path: /x, mdoe: '0755'}\n",
     ["customise[0].mdoe: unknown key (did you mean 'mode'?)"]),
    ("bad build method", GOOD.replace("method: cloud-image", "method: packer"),
     ["build: unknown value 'packer'"]),
    ("unverifiable download", GOOD.replace('    sha256: "' + "a" * 64 + '"\n', ""),
     ["build.base: no way to verify the download"]),
    ("short checksum", GOOD.replace("a" * 64, "abc"), ["build.base.sha256: expected 64 hexadecimal digits"]),
    ("bad size", GOOD.replace("disk_size: 2G", "disk_size: lots"), ["disk_size: 'lots' is not a size"]),
    ("string where integer needed", GOOD + "glance: {keep: '3'}\n", ["glance.keep: expected an integer, got '3'"]),
    ("negative keep", GOOD + "glance: {keep: -1}\n", ["glance.keep: must be >= 0"]),
    ("unknown variable", GOOD + 'glance: {name: "{nme}"}\n', ["glance.name: unknown variable {nme}"]),
    ("compression with raw output", GOOD + "output: {format: raw, compression: zlib}\n",
     ["output: compression is only possible with format qcow2"]),
    ("cluster size not a power of two", GOOD + "output: {cluster_size: 48K}\n",
     ["output.cluster_size: cluster_size must be a power of two"]),
    ("plain-text root password", GOOD + "customise:\n  - {op: root-password, hash: hunter2}\n",
     ["customise[0]: hash must be a crypt(3) hash"]),
    ("lower-case env name", GOOD.replace("method: cloud-image\n  base:\n    url: http://127.0.0.1/base.qcow2\n"
                                          '    sha256: "' + "a" * 64 + '"\n',
                                          "method: dib\n  elements: [vm]\n  env: {dib_release: x}\n"),
     ["build.env: environment variable names must be UPPER_CASE: dib_release"]),
    ("windows build on linux os", GOOD.replace("method: cloud-image\n  base:\n    url: http://127.0.0.1/base.qcow2\n"
                                                '    sha256: "' + "a" * 64 + '"\n', """method: windows
  image_name: W
  install_media: {url: http://127.0.0.1/w.iso, trust: first-use}
  virtio_drivers: {url: http://127.0.0.1/v.iso, trust: first-use}
  cloudbase_init: {url: http://127.0.0.1/c.msi, trust: first-use}
"""), ["(top level): build method windows needs os.type windows"]),
    ("not a URL", GOOD.replace("http://127.0.0.1/base.qcow2", "ftp//x"), ["build.base.url: 'ftp//x' is not an http"]),
]


@pytest.mark.parametrize(("label", "text", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipe_reports_each_problem(tmp_path: Path, label: str, text: str, expected: list[str]) -> None:
    problems = problems_of(write(tmp_path, "broken", text))
    for want in expected:
        assert any(p.startswith(want) for p in problems), f"{label}: {want!r} not in {problems}"


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("type: linux", "type: bsd").replace("disk_size: 2G", "disk_size: x") + (
        "customise:\n  - {op: install, packages: vim}\n  - {op: nope}\nbogus: 1\n")
    problems = problems_of(write(tmp_path, "many", text))
    assert len(problems) == 5, problems


@pytest.mark.parametrize(("text", "message"), [
    ("name: [unclosed\n", "not valid YAML (line 2, column 1)"),
    ("", "the file is empty"),
    ("- a\n- b\n", "a recipe must be a YAML mapping, not a list"),
])
def test_unparseable_files(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "x.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=re.escape(message)):
        recipe.load(p)


def test_extends_loop_and_missing_parent(tmp_path: Path) -> None:
    write(tmp_path, "a", "extends: b\nname: a\n")
    write(tmp_path, "b", "extends: a\nname: b\n")
    with pytest.raises(RecipeError, match="inheritance loops: a -> b -> a"):
        recipe.load(tmp_path / "a.yaml")
    write(tmp_path, "c", "extends: no-such-parent\nname: c\n")
    with pytest.raises(RecipeError, match="extends 'no-such-parent'"):
        recipe.load(tmp_path / "c.yaml")


def test_unknown_recipe_name_suggests() -> None:
    with pytest.raises(RecipeError) as info:
        recipe.load("debian12")
    assert "no recipe named 'debian12'" in info.value.message
    assert info.value.hint and "debian-12" in info.value.hint


@pytest.mark.parametrize(("text", "n"), [("10G", 10 << 30), ("512M", 512 << 20), ("64K", 65536), ("1GiB", 1 << 30),
                                         (4096, 4096), ("1.5G", 3 << 29)])
def test_parse_size(text: str | int, n: int) -> None:
    assert recipe.parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "G", "-1G", "ten", True, None, 0])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        recipe.parse_size(bad)
