"""``imagekit ci emit``: GitLab, GitHub Actions and Zuul configuration, checked for real.

The GitLab child and parent pipelines are validated against GitLab's CI schema and the
GitHub workflows against GitHub's workflow schema, the ones ``check-jsonschema`` ships
(offline); a broken document is refused by the same check. The GitLab parent pipeline is
then run for real by ``gitlab-ci-local`` (shell executor): its plan job writes the child with
``imagekit ci emit gitlab``, the trigger runs it, and the child's jobs run, gate and promote the
unit against the two real Glances and the real registry. gitlab-ci-local does not report a
failing child job in its exit code, so the test checks what the jobs produced (the images in
both clouds, the JUnit reports and the status page among the artifacts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ci_fixture import Clouds, Project, Registry, sha256_of
from tests.conftest import ROOT
from tests.http_fixture import FileServer


def gitlab_ci_local() -> str | None:
    local = Path(sys.prefix) / "npm" / "node_modules" / ".bin" / "gitlab-ci-local"
    return str(local) if local.exists() else shutil.which("gitlab-ci-local")


def check_schema(schema: str, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def offline_project(tmp_path: Path) -> Project:
    project = Project(tmp_path / "project", {"PYTHONPATH": str(ROOT)})
    project.write_recipe("tiny-e", "http://127.0.0.1:9/boot.qcow2", "0" * 64)
    project.write_pipeline({"name": "emitted", "images": [{"recipe": "recipes/tiny-e.yaml",
                                                           "matrix": {"flavour": ["small", "large"]}}],
                            "clouds": [{"name": "cloud-a"}, {"name": "cloud-b"}]})
    return project


def test_gitlab_and_github_output_pass_their_schemas(tmp_path: Path) -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed (test extra)")
    project = offline_project(tmp_path)
    child = project.ci("emit", "gitlab", "--all")
    parent = project.ci("emit", "gitlab", "--parent")
    assert child.code == 0 and parent.code == 0, child.err + parent.err
    files = {"child.yml": child.json()["files"]["imagekit-child.yml"],
             ".gitlab-ci.yml": parent.json()["files"][".gitlab-ci.yml"]}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    res = check_schema("vendor.gitlab-ci", tmp_path / "child.yml", tmp_path / ".gitlab-ci.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = yaml.safe_load(files["child.yml"])
    assert doc["imagekit-run"]["parallel"]["matrix"] == [{"UNIT": ["tiny-e-small", "tiny-e-large"]}]
    assert doc["imagekit-gate-tiny-e-large"]["needs"][0]["parallel"]["matrix"] == [{"UNIT": "tiny-e-large"}]
    assert doc["imagekit-run"]["artifacts"]["reports"]["junit"] == "ci-out/$UNIT/junit.xml"
    assert "--pipeline imagekit-pipeline.yaml" in doc["imagekit-run"]["script"][0]

    broken = dict(doc)
    broken["imagekit-rotate"] = {**doc["imagekit-rotate"], "when": "sometimes"}
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    bad = check_schema("vendor.gitlab-ci", tmp_path / "broken.yml")
    assert bad.returncode == 1 and "sometimes" in bad.stdout + bad.stderr

    gh = project.ci("emit", "github", "--output-dir", str(tmp_path / "workflows"))
    assert gh.code == 0, gh.err
    wf = sorted((tmp_path / "workflows").glob("*.yml"))
    assert [p.name for p in wf] == ["imagekit-unit.yml", "imagekit.yml"]
    res = check_schema("vendor.github-workflows", *wf)
    assert res.returncode == 0, res.stdout + res.stderr
    reusable = yaml.safe_load(wf[0].read_text())
    assert reusable[True if True in reusable else "on"]["workflow_call"]["inputs"]["unit"]["required"] is True
    caller = yaml.safe_load(wf[1].read_text())
    assert caller["jobs"]["unit"]["uses"] == "./.github/workflows/imagekit-unit.yml"
    assert "fromJSON(needs.plan.outputs.matrix)" in caller["jobs"]["unit"]["strategy"]["matrix"]
    matrix = project.ci("emit", "github", "--matrix", "--all")
    assert json.loads(matrix.json()["files"]["matrix.json"]) == {
        "include": [{"unit": "tiny-e-small"}, {"unit": "tiny-e-large"}]}

    zuul = project.ci("emit", "zuul", "--all")
    assert zuul.code == 0, zuul.err
    zfiles = zuul.json()["files"]
    jobs = yaml.safe_load(zfiles["zuul.d/imagekit.yaml"])
    by_name = {j["job"]["name"]: j["job"] for j in jobs if "job" in j}
    assert by_name["imagekit-image-build"]["abstract"] is True
    assert by_name["imagekit-image-build-tiny-e-small"]["vars"] == {"imagekit_unit": "tiny-e-small"}
    assert set(by_name["imagekit-image-build"]["vars"]) >= {"imagekit_unit", "imagekit_pipeline_file",
                                                            "imagekit_promote_to"}
    post = yaml.safe_load(zfiles["playbooks/imagekit/post.yaml"])
    assert any("zuul_return" in t for t in post[0]["tasks"])


@pytest.mark.slow
def test_gitlab_child_pipeline_runs_in_gitlab_ci_local(ci_project: Project, registry: Registry, two_clouds: Clouds,
                                                       served: FileServer, tmp_path: Path) -> None:
    gcl = gitlab_ci_local()
    if gcl is None or shutil.which("rsync") is None or shutil.which("git") is None:
        pytest.skip("gitlab-ci-local, rsync or git is missing (make setup installs them)")
    project = ci_project
    project.write_recipe("tiny-p", served.url("boot.qcow2"), sha256_of(served.root / "boot.qcow2"))
    project.write_pipeline({
        "name": "gitlab", "images": [{"recipe": "recipes/tiny-p.yaml"}],
        "clouds": [{"name": "cloud-a", "import_timeout": "60s"}, {"name": "cloud-b", "import_timeout": "60s"}],
        "gate": {"boot": {"wait_for": "login", "timeout": "3m", "memory": 256}},
        "cache": {"oci": {"url": f"{registry.host}/warm/cache", "insecure": True}}})
    parent = project.ci("emit", "gitlab", "--parent")
    assert parent.code == 0, parent.err
    (project.folder / ".gitlab-ci.yml").write_text(parent.json()["files"][".gitlab-ci.yml"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "imagekit").write_text(f"#!/bin/sh\nexec {sys.executable} -m imagekit \"$@\"\n")
    (bin_dir / "imagekit").chmod(0o755)
    git = ["git", "-C", str(project.folder), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "images"],
                 ["remote", "add", "origin", "git@gitlab.example.invalid:group/images.git"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    env = {**os.environ, **project.runner_env("gitlab-runner"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run([gcl, "--shell-isolation", "--no-artifacts-to-source", "--concurrency", "1"],
                          cwd=project.folder, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    for job in ("imagekit-plan", "imagekit-run: [tiny-p]", "imagekit-gate-tiny-p", "imagekit-promote-tiny-p",
                "imagekit-rotate", "imagekit-status"):
        assert job in log, f"{job} did not run:\n{log[-5000:]}"
    for cloud in ("cloud-a", "cloud-b"):  # what the child's jobs did, whatever gitlab-ci-local's exit code says
        imgs = [i for i in two_clouds.images(cloud) if i["properties"].get("imagekit_pipeline") == "gitlab"]
        assert [(i["status"], i["properties"]["imagekit_channel"]) for i in imgs] == [("active", "stable")], imgs
    state = project.folder / ".gitlab-ci-local"
    reports = {p.name for p in state.rglob("*.xml")}
    assert {"junit.xml", "gate-junit.xml"} <= reports, reports
    assert list(state.rglob("status.html")), "the status page artifact"
