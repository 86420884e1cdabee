"""``imagekit ci`` end to end, for real: a pipeline of two small bootable images over two real
Glances (``cloud-a``, ``cloud-b``) with the shared step cache in a real registry on 127.0.0.1.

plan -> run (two runners at once, separate HOMEs) -> gate (QEMU boot to a login prompt) ->
promote -> rotate -> status (JSON and HTML, the page opened in headless Chromium); then the
same plan says nothing to do; a changed recipe rebuilds only its unit, in a fresh HOME, from
the base and customised layers in the shared cache; rotation removes the superseded image
except where it is protected, and never touches an image imagekit does not own.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.ci_fixture import Clouds, Project, Registry, sha256_of
from tests.http_fixture import FileServer

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def pipeline_doc(name: str, registry: Registry) -> dict[str, Any]:
    return {
        "name": name,
        "images": [{"recipe": "recipes/tiny-a.yaml"}, {"recipe": "recipes/tiny-b.yaml"}],
        "clouds": [{"name": "cloud-a", "visibility": "public", "properties": {"hw_rng_model": "virtio"},
                    "import_timeout": "60s"},
                   {"name": "cloud-b", "import_methods": ["glance-direct", "direct"], "import_timeout": "60s"}],
        "gate": {"cloud": "cloud-a", "boot": {"wait_for": "login", "timeout": "3m", "memory": 256}},
        "retention": {"candidate": {"keep": 1}, "tested": {"keep": 2}, "stable": {"keep": 1, "action": "delete"}},
        "cache": {"oci": {"url": f"{registry.host}/{name}/cache", "insecure": True}, "lease_ttl": "60s",
                  "settle": "0.3s"},
    }


def ok(res: Any) -> dict[str, Any]:
    assert res.code == 0, f"exit {res.code}:\n{res.err[-3000:]}\n{res.out[-2000:]}"
    data: dict[str, Any] = res.json()
    return data


def run_together(project: Project, *commands: tuple[tuple[str, ...], str]) -> list[dict[str, Any]]:
    """Start the commands at once (each in its own HOME), wait for all, return their JSON."""
    procs = [project.popen(*args, home=home) for args, home in commands]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"exit {p.returncode}:\n{err[-3000:]}"
        outs.append(json.loads(out))
    return outs


def plan_of(project: Project) -> dict[str, dict[str, Any]]:
    return {u["unit"]: u for u in ok(project.ci("plan"))["units"]}


def screenshot(html: Path, out: Path) -> str:
    """Open the page in headless Chromium: a PNG screenshot, and the DOM as rendered."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="imagekit-chromium-") as profile:
        common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars"]
        subprocess.run([*common, "--window-size=1200,500", f"--screenshot={out}", html.as_uri()],
                       capture_output=True, timeout=120, check=True)
        dom = subprocess.run([*common, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120,
                             check=True).stdout
    return dom


def test_pipeline_plan_run_gate_promote_rotate_status(ci_project: Project, registry: Registry, two_clouds: Clouds,
                                                      served: FileServer, tmp_path: Path) -> None:
    project = ci_project
    sha = sha256_of(served.root / "boot.qcow2")
    project.write_recipe("tiny-a", served.url("boot.qcow2"), sha)
    project.write_recipe("tiny-b", served.url("boot.qcow2"), sha, output="{compat: '0.10', cluster_size: 64K}")
    project.write_pipeline(pipeline_doc("e2e", registry))

    plan = plan_of(project)
    assert {u: p["actions"] for u, p in plan.items()} == {"tiny-a": ["run", "gate", "promote"],
                                                          "tiny-b": ["run", "gate", "promote"]}
    assert all(p["reasons"][0]["code"] == "never-built" for p in plan.values())

    # two runners at once: the base and customised layers (the same for both) are built once
    a, b = run_together(project, (("run", "tiny-a"), "a"), (("run", "tiny-b"), "b"))
    pulled = sorted([tuple(a["pulled"]), tuple(b["pulled"])])
    assert pulled == [(), ("base", "customise")], pulled
    for r in (a, b):
        out = Path(r["output_dir"])
        assert sha256_of(Path(r["image"])) == r["sha256"]
        for f in ("junit.xml", "build.log", "ci-run.json", "artifacts.json", "tiny-a.manifest.json"
                  if r["unit"] == "tiny-a" else "tiny-b.manifest.json"):
            assert (out / f).is_file(), f
        statement = json.loads((out / "provenance" / Path(r["image"]).with_suffix(".qcow2.intoto.json").name)
                               .read_text())
        assert statement["subject"][0]["digest"]["sha256"] == r["sha256"]
        assert statement["predicate"]["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"] == sha

    # one cloud operation at a time: the local Glances keep their database in SQLite, which refuses
    # concurrent writes ("database is locked"); a cloud's real database does not
    gates = [ok(project.ci("gate", u, home=h)) for u, h in (("tiny-a", "a"), ("tiny-b", "b"))]
    assert all(g["passed"] and g["channel"] == "tested" and "login" in g["reached"] for g in gates)
    promoted = [ok(project.ci("promote", u, "--to", "stable", home=h)) for u, h in (("tiny-a", "a"), ("tiny-b", "b"))]
    for p in promoted:
        states = {c["cloud"]: c["state"] for c in p["clouds"]}
        assert states == {"cloud-a": "moved", "cloud-b": "uploaded"} and p["complete"]
    for cloud in ("cloud-a", "cloud-b"):
        mine = [i for i in two_clouds.images(cloud) if i["properties"].get("imagekit_pipeline") == "e2e"]
        assert len(mine) == 2, (cloud, two_clouds.images(cloud), promoted)
        assert sorted((i["properties"]["imagekit_unit"], i["properties"]["imagekit_channel"], i["status"])
                      for i in mine) == [("tiny-a", "stable", "active"), ("tiny-b", "stable", "active")]
        assert all(i["visibility"] == ("public" if cloud == "cloud-a" else "private") for i in mine)
    assert ok(project.ci("rotate"))["changed"] == 0

    status = ok(project.ci("status", "--html", str(tmp_path / "status.html")))
    assert status["drift"] is False
    for u in status["units"]:
        stable = [c for c in u["cells"] if c["channel"] == "stable"]
        assert {c["cloud"] for c in stable if c["latest"]} == {"cloud-a", "cloud-b"}

    if CHROMIUM is not None:
        dom = screenshot(tmp_path / "status.html", tmp_path / "status.png")
        png = (tmp_path / "status.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        table = dom[dom.index('<table id="status">'):]
        for text in ("cloud-a", "cloud-b", "candidate", "tested", "stable", "tiny-a", "tiny-b", "in sync"):
            assert text in table, text

    # nothing changed: nothing to do
    again = ok(project.ci("plan"))
    assert again["nothing_to_do"] and all(u["reasons"][0]["code"] == "up-to-date" for u in again["units"])

    # one recipe changes: only its unit rebuilds, in a fresh HOME, from the shared base and customised layers
    old_b = b["sha256"]
    project.write_recipe("tiny-b", served.url("boot.qcow2"), sha, output="{compat: '0.10', cluster_size: 128K}")
    plan = plan_of(project)
    assert plan["tiny-a"]["actions"] == [] and plan["tiny-b"]["actions"] == ["run", "gate", "promote"]
    assert plan["tiny-b"]["reasons"][0]["code"] == "recipe-changed"
    b2 = ok(project.ci("run", "tiny-b", home="fresh"))
    assert b2["pulled"] == ["base", "customise"]
    assert [(s["name"], s["source"]) for s in b2["stages"][:3]] == [("build", "shared"), ("customise", "shared"),
                                                                     ("convert", "built")]
    assert b2["sha256"] != old_b
    ok(project.ci("gate", "tiny-b", home="fresh"))
    ok(project.ci("promote", "tiny-b", "--to", "stable", home="fresh"))

    # retention: the superseded tiny-b goes, except where it is protected; a foreign image stays
    protect_and_foreign(two_clouds, old_b)
    dry = ok(project.ci("rotate", "--dry-run"))
    assert dry["changed"] == 0 and any(r["action"] == "delete" for r in dry["rows"])
    rot = ok(project.ci("rotate"))
    acted = {(r["cloud"], r["unit"], r["action"], r["reason"].split(" ")[0]) for r in rot["rows"]
             if r["action"] not in ("keep",)}
    assert acted == {("cloud-a", "tiny-b", "skip", "protected"), ("cloud-b", "tiny-b", "delete", "older")}, acted
    for cloud in ("cloud-a", "cloud-b"):
        imgs = two_clouds.images(cloud)
        b_imgs = {i["properties"].get("imagekit_sha256") for i in imgs
                  if i["properties"].get("imagekit_pipeline") == "e2e" and i["properties"]["imagekit_unit"] == "tiny-b"}
        assert b_imgs == ({old_b, b2["sha256"]} if cloud == "cloud-a" else {b2["sha256"]})
        assert any(i["name"] == "tiny-b-foreign" for i in imgs) or cloud == "cloud-b"
    assert ok(project.ci("status"))["drift"] is False
    assert ok(project.ci("plan"))["nothing_to_do"]
    print("timings:", project.timings)


def protect_and_foreign(clouds: Clouds, old_sha: str) -> None:
    """Protect the old tiny-b in cloud-a; add an image of the same name there that imagekit does not own."""
    import os

    from imagekit.cloud import connect

    os.environ["OS_CLIENT_CONFIG_FILE"] = str(clouds.clouds_yaml)
    c = connect("cloud-a")
    for img in clouds.images("cloud-a"):
        if img["properties"].get("imagekit_sha256") == old_sha:
            c.glance.images.update(img["id"], protected=True)
    foreign = c.glance.images.create(name="tiny-b-foreign", disk_format="raw", container_format="bare",
                                     imagekit_unit="tiny-b", imagekit_channel="stable")
    c.glance.images.upload(foreign["id"], io.BytesIO(b"not imagekit's"))


@pytest.fixture(autouse=True)
def _unprotect(two_clouds: Clouds) -> Any:
    """Protected images would outlive the test session's Glance clean-up otherwise (they stay in its folder)."""
    yield
