"""The --json contract: every command prints exactly one document that validates against its published schema.

Each command runs through the real CLI (``python -m imagekit``) in success and in failure (bad
input, unsafe image, unreachable cloud, invalid recipe, bad usage); stdout is parsed as one
JSON document and validated with a real JSON Schema validator against ``docs/schemas/``.
The expensive successes (build, boot, customise, guest-inspect) are validated where the suite
already runs them (test_build, test_customise, test_guest_inspect). The schemas themselves
must be what the code's result types generate, and every command must declare its type.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest

from imagekit.cli import cli, schemas
from imagekit.cli.output import RESULT_TYPES
from tests.conftest import ROOT
from tests.glance_fixture import GlanceFixture
from tests.json_contract import SCHEMAS, assert_document


def _leaf_commands(group: click.Group, prefix: str = "") -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        out += _leaf_commands(cmd, path + " ") if isinstance(cmd, click.Group) else [path]
    return out


def test_every_command_declares_its_result_type() -> None:
    leaves = set(_leaf_commands(cli))
    assert leaves == set(RESULT_TYPES), f"without @result_type: {leaves - set(RESULT_TYPES)}"


def test_published_schemas_are_generated_from_the_code() -> None:
    generated = schemas.all_schemas()
    on_disk = {p.name for p in SCHEMAS.glob("*.json")}
    assert on_disk == set(generated), "regenerate: python -m imagekit.cli.schemas docs/schemas"
    for name, schema in generated.items():
        assert json.loads((SCHEMAS / name).read_text()) == schema, f"{name} is stale: regenerate the schemas"
    assert (SCHEMAS / "README.md").read_text() == schemas.index()


def run(imagekit: Any, command: str, *args: str, code: int = 0, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = imagekit(*command.split(), *args, "--json", env=env)
    assert res.code == code, (res.code, res.err[-2000:])
    doc = assert_document(command, res.out)
    if code:
        assert doc["error"]["exit_code"] == code and doc["error"]["message"] and doc["error"]["code"]
    return doc


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("json-images")
    raw = d / "disk.raw"
    raw.write_bytes(b"imagekit" * 65536)
    good = d / "good.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(good)], check=True)
    hostile = d / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", "-u", str(hostile),
                    "1M"], check=True)
    bad_recipe = d / "bad.yaml"
    bad_recipe.write_text("name: Bad\nos: {type: bsd}\n")
    return {"raw": raw, "good": good, "hostile": hostile, "bad_recipe": bad_recipe, "dir": d}


def test_recipes(imagekit: Any, images: dict[str, Path]) -> None:
    assert any(r["name"] == "debian-12" for r in run(imagekit, "recipes list")["recipes"])
    assert run(imagekit, "recipes show", "debian-12")["name"] == "debian-12"
    assert run(imagekit, "recipes show", "nope", code=2)["error"]["code"] == "recipe-invalid"
    assert run(imagekit, "recipes validate")["ok"] is True
    bad = run(imagekit, "recipes validate", str(images["bad_recipe"]), code=2)
    assert bad["results"][0]["problems"]  # the partial result stays next to the error


def test_images(imagekit: Any, images: dict[str, Path], tmp_path: Path) -> None:
    assert run(imagekit, "inspect", str(images["good"]))["format"] == "qcow2"
    assert run(imagekit, "inspect", str(tmp_path / "missing"), code=1)["error"]["code"] == "image-unreadable"
    assert run(imagekit, "check", str(images["good"]))["verdict"] == "accept"
    rejected = run(imagekit, "check", str(images["hostile"]), code=3)
    assert rejected["verdict"] == "reject" and "backing-file" in {f["code"] for f in rejected["findings"]}
    assert rejected["error"]["code"] == "unsafe-image"
    assert len(run(imagekit, "check", "--list-codes")["codes"]) > 100
    out = run(imagekit, "convert", str(images["raw"]), "-o", str(tmp_path / "o.qcow2"))
    assert out["output"]["format"] == "qcow2" and out["writer"] == "imagekit" and out["compare"] == "map-as-planned"
    unsafe = run(imagekit, "convert", str(images["hostile"]), "-o", str(tmp_path / "h.qcow2"), code=3)
    assert unsafe["error"]["verdict"]["verdict"] == "reject"
    run(imagekit, "convert", str(images["raw"]), "-o", str(tmp_path / "o.qcow2"), code=1)  # exists


def test_properties(imagekit: Any) -> None:
    assert run(imagekit, "properties lint", "--recipe", "debian-12")["ok"] is True
    bad = run(imagekit, "properties lint", "--property", "os_secure_boot=required", "--property",
              "hw_firmware_type=bios", code=2)
    assert bad["error"]["problems"]
    assert "P001" in run(imagekit, "properties rules")["rules"]


def test_doctor_and_usage(imagekit: Any) -> None:
    assert run(imagekit, "doctor", "--no-appliance")["tools"]
    res = imagekit("doctor", "--no-appliance", "--json", env={"IMAGEKIT_ACCEL": "xen"})
    assert res.code == 2 and assert_document("doctor", res.out)["error"]["code"] == "usage"
    res = imagekit("convert", "--json")  # a missing argument: click's usage error, still one document
    assert res.code == 2 and assert_document("convert", res.out)["error"]["code"] == "usage"


def test_cache_and_build_failures(imagekit: Any, tmp_path: Path) -> None:
    env = {"IMAGEKIT_CACHE_DIR": str(tmp_path / "cache")}
    assert run(imagekit, "cache list", env=env)["entries"] == []
    assert run(imagekit, "cache prune", "--all", env=env)["removed"] == []
    run(imagekit, "cache prune", code=2, env=env)
    assert run(imagekit, "build", "no-such-recipe", code=2)["error"]["code"] == "recipe-invalid"
    run(imagekit, "boot", str(tmp_path / "missing.qcow2"), code=1)
    run(imagekit, "customise", str(tmp_path / "missing.qcow2"), "-o", str(tmp_path / "x.qcow2"), "--step",
        "{op: hostname, hostname: a}", code=2)
    run(imagekit, "guest-inspect", str(tmp_path / "missing.qcow2"), code=1)


def test_publish(imagekit: Any, images: dict[str, Path], glance_env: GlanceFixture, tmp_path: Path) -> None:
    env = glance_env.env
    up = run(imagekit, "upload", str(images["good"]), "--cloud", glance_env.cloud, "--name", "json-contract",
             env=env)
    assert up["verified"] is True and up["image"]["status"] == "active"
    assert run(imagekit, "upload", "--lint-only", "--recipe", "debian-12", env=env)["ok"] is True
    run(imagekit, "upload", str(images["hostile"]), "--cloud", glance_env.cloud, code=3, env=env)
    listed = run(imagekit, "images list", "--cloud", glance_env.cloud, "--name-prefix", "json-contract", env=env)
    assert [i["name"] for i in listed["images"]] == ["json-contract"]
    pruned = run(imagekit, "images prune", "--cloud", glance_env.cloud, "--name-prefix", "json-contract",
                 "--keep", "1", "--dry-run", env=env)
    assert pruned["images"][0]["action"] == "keep"
    dead = tmp_path / "clouds.yaml"
    dead.write_text("clouds:\n  dead:\n    auth_type: admin_token\n    auth: {token: 'u:p', endpoint: "
                    "'http://127.0.0.1:9'}\n    image_endpoint_override: 'http://127.0.0.1:9/'\n")
    unreachable = run(imagekit, "images list", "--cloud", "dead", code=1, env={"OS_CLIENT_CONFIG_FILE": str(dead)})
    assert "cannot reach" in unreachable["error"]["message"]
    run(imagekit, "images prune", "--cloud", "dead", "--name-prefix", "x", "--keep", "1", code=1,
        env={"OS_CLIENT_CONFIG_FILE": str(dead)})


def test_local_glance_commands(imagekit: Any, tmp_path: Path) -> None:
    env = {"IMAGEKIT_STATE_DIR": str(tmp_path / "state"), "OS_CLIENT_CONFIG_FILE": str(tmp_path / "clouds.yaml")}
    assert run(imagekit, "glance status", code=1, env=env)["error"]["code"]
    run(imagekit, "glance env", code=1, env=env)
    served = run(imagekit, "glance serve", env=env)
    try:
        assert run(imagekit, "glance status", env=env)["endpoint"] == served["endpoint"]
        assert run(imagekit, "glance env", env=env)["OS_IMAGE_URL"] == served["endpoint"]
    finally:
        assert run(imagekit, "glance stop", env=env)["stopped"] is True
    assert run(imagekit, "glance stop", env=env)["stopped"] is False


def test_schemas_are_valid_json_schema() -> None:
    from jsonschema import Draft202012Validator

    for path in sorted(SCHEMAS.glob("*.json")):
        Draft202012Validator.check_schema(json.loads(path.read_text()))
    assert (ROOT / "README.md").read_text().count("docs/schemas") >= 1
