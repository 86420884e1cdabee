"""Build outputs are compressed by default (zlib); zstd is opt-in and the property linter warns about it."""

from __future__ import annotations

from pathlib import Path

from imagekit import properties, recipe
from imagekit.recipe import Output

RECIPE = """\
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


def test_qcow2_output_is_zlib_by_default_other_formats_uncompressed() -> None:
    assert Output().compression == "zlib"
    assert Output(format="raw").compression == "none" and Output(format="vmdk").compression == "none"
    assert Output(compression="none").compression == "none"


def test_shipped_linux_recipes_build_compressed() -> None:
    for name in ("debian-12", "ubuntu-24.04", "ubuntu-22.04", "centos7"):
        assert recipe.load(name).output.compression == "zlib", name


def test_zstd_output_gets_a_lint_warning(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text(RECIPE)
    zstd = tmp_path / "zstd.yaml"
    zstd.write_text(RECIPE + "output: {compression: zstd}\n")
    r_plain, r_zstd = recipe.load(plain), recipe.load(zstd)
    assert [f.code for f in properties.lint(properties.build(r_plain), r_plain)] == []
    found = [f for f in properties.lint(properties.build(r_zstd), r_zstd) if f.code == "P022"]
    assert len(found) == 1 and found[0].severity == "warning" and "5.1" in found[0].message
    assert properties.check_lint(properties.build(r_zstd), r_zstd)  # a warning, not an error
    assert "P022" in properties.RULES
