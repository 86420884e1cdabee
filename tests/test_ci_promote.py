"""``imagekit ci promote`` against the two real Glances, with their failures made real.

One Glance stopped while the image is being sent to it (the upload held in flight by a relay,
then the server stopped): the other cloud completes, the command fails and says which cloud;
once the Glance is back, the same command skips the finished cloud, removes the record the
interrupted upload left and finishes; nothing of the pipeline is left queued anywhere.
A stalled import (web-download from a server that stops sending) is given up after
``import_timeout``, deleted and retried with the next import method.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ci_fixture import Clouds, Project, Registry, TcpPause, sha256_of
from tests.http_fixture import FileServer

pytestmark = pytest.mark.slow


def project_for(project: Project, name: str, registry: Registry, served: FileServer,
                clouds: list[dict[str, Any]]) -> None:
    project.write_recipe("tiny-p", served.url("boot.qcow2"), sha256_of(served.root / "boot.qcow2"))
    project.write_pipeline({"name": name, "images": [{"recipe": "recipes/tiny-p.yaml"}], "clouds": clouds,
                            "cache": {"oci": {"url": f"{registry.host}/warm/cache", "insecure": True}}})
    res = project.ci("run", "tiny-p")
    assert res.code == 0, res.err[-3000:]


def owned(clouds: Clouds, cloud: str, pipeline: str) -> list[dict[str, Any]]:
    return [i for i in clouds.images(cloud) if i["properties"].get("imagekit_pipeline") == pipeline]


def test_promote_with_a_glance_stopped_midway_resumes(ci_project: Project, registry: Registry, two_clouds: Clouds,
                                                      served: FileServer) -> None:
    project = ci_project
    relay = TcpPause(two_clouds.ports["cloud-b"])
    conf = yaml.safe_load(two_clouds.clouds_yaml.read_text())
    b = conf["clouds"]["cloud-b"]
    via = f"http://127.0.0.1:{relay.port}"
    b["auth"]["endpoint"], b["image_endpoint_override"] = via, via + "/"
    (project.folder / "clouds.yaml").parent.mkdir(parents=True, exist_ok=True)
    (project.folder / "clouds.yaml").write_text(yaml.safe_dump(conf))
    project.env["OS_CLIENT_CONFIG_FILE"] = str(project.folder / "clouds.yaml")
    try:
        project_for(project, "halfway", registry, served, [{"name": "cloud-a", "import_timeout": "60s"},
                                                           {"name": "cloud-b", "retries": 1, "import_timeout": "60s"}])
        relay.hold_after(1 << 20)
        promote = project.popen("promote", "tiny-p", "--to", "stable", "--force")
        assert relay.held.wait(120), "the upload to cloud-b never started"
        two_clouds.stop("cloud-b")
        relay.cut()
        out, err = promote.communicate(timeout=300)
        assert promote.returncode == 1, err[-3000:]
        import json

        res = json.loads(out)
        states = {c["cloud"]: c["state"] for c in res["clouds"]}
        assert states == {"cloud-a": "uploaded", "cloud-b": "failed"} and res["error"]["code"] == "ci-promote-incomplete"
        assert "cloud-b" in res["error"]["message"]
    finally:
        relay.release()
        two_clouds.start("cloud-b")
    left = [i for i in owned(two_clouds, "cloud-b", "halfway") if i["status"] != "active"]
    assert left, "the interrupted upload left a record in cloud-b"
    plan = project.ci("plan")
    assert plan.code == 0, plan.err[-2000:]
    reasons = {r["code"]: r["detail"] for r in plan.json()["units"][0]["reasons"]}
    assert "cloud-b" in reasons["missing-in-cloud"] and "cloud-a" not in reasons["missing-in-cloud"]

    again = project.ci("promote", "tiny-p", "--to", "stable", "--force")
    assert again.code == 0, again.err[-3000:]
    res = again.json()
    by = {c["cloud"]: c for c in res["clouds"]}
    assert by["cloud-a"]["state"] == "done" and by["cloud-b"]["state"] == "uploaded"
    assert set(by["cloud-b"]["removed_leftovers"]) == {i["id"] for i in left}
    for cloud in ("cloud-a", "cloud-b"):
        imgs = owned(two_clouds, cloud, "halfway")
        assert [(i["status"], i["properties"]["imagekit_channel"]) for i in imgs] == [("active", "stable")], imgs
    relay.close()


class _Stalling:
    """An HTTP server that answers with headers and a few bytes, then sends nothing more until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(64 << 20))
                self.end_headers()
                self.wfile.write(b"\0" * 4096)
                self.wfile.flush()
                outer.release.wait(120)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling() -> Iterator[_Stalling]:
    s = _Stalling()
    try:
        yield s
    finally:
        s.stop()


def test_stalled_import_is_retried_with_the_other_method(ci_project: Project, registry: Registry,
                                                         two_clouds: Clouds, served: FileServer,
                                                         stalling: _Stalling) -> None:
    project = ci_project
    project_for(project, "stalled", registry, served, [
        {"name": "cloud-a", "import_methods": ["web-download", "glance-direct"], "import_timeout": "6s",
         "retries": 2, "web_download_url": f"http://127.0.0.1:{stalling.port}/{{file}}"}])
    res = project.ci("promote", "tiny-p", "--to", "stable", "--force")
    assert res.code == 0, res.err[-3000:]
    cloud = res.json()["clouds"][0]
    assert [(a["method"], a["error"] is None) for a in cloud["attempts"]] == [("web-download", False),
                                                                               ("glance-direct", True)]
    assert "did not finish within 6 s" in cloud["attempts"][0]["error"] and stalling.requests >= 1
    imgs = owned(two_clouds, "cloud-a", "stalled")
    assert [(i["status"], i["properties"]["imagekit_channel"]) for i in imgs] == [("active", "stable")], imgs
    assert Path(project.folder).is_dir()


def test_gate_failure_removes_the_candidate_and_blocks_promotion(ci_project: Project, registry: Registry,
                                                                 two_clouds: Clouds, served: FileServer) -> None:
    """The tiny image reaches a login prompt but runs no cloud-init: a gate waiting for cloud-init fails."""
    project = ci_project
    project_for(project, "failing", registry, served, [{"name": "cloud-a"}, {"name": "cloud-b"}])
    doc = yaml.safe_load(project.pipeline.read_text())
    doc["gate"] = {"boot": {"wait_for": "cloud-init", "timeout": "12s", "memory": 256}}
    project.write_pipeline(doc)
    gate = project.ci("gate", "tiny-p")
    assert gate.code == 1 and gate.json()["error"]["code"] == "ci-gate-failed", gate.err[-2000:]
    assert "was removed" in gate.json()["error"]["message"]
    report = (project.folder / "ci-out" / "tiny-p" / "gate-junit.xml").read_text()
    assert "<failure" in report and "did not reach cloud-init" in report
    assert owned(two_clouds, "cloud-a", "failing") == []  # the candidate is gone
    promote = project.ci("promote", "tiny-p", "--to", "stable")
    assert promote.code == 1 and promote.json()["error"]["code"] == "ci-not-tested"
    assert owned(two_clouds, "cloud-a", "failing") == owned(two_clouds, "cloud-b", "failing") == []
