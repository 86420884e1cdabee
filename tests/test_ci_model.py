"""The pipeline file and the pieces of ``imagekit ci`` that need no server: validation (every
problem at once, with paths), matrix units, the directory store of the shared cache (complete
or absent, concurrent publishers, altered entries ignored, dead leases taken over), DSSE-signed
provenance, JUnit, and the webhook."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagekit import cache
from imagekit.cache_remote import DirectoryStore, Lease, SharedCache, index_of
from imagekit.ci import junit, model, notify, provenance
from tests.ci_fixture import Project
from tests.conftest import ROOT

RECIPE = ("name: {name}\ndescription: d\nos: {{type: linux, distro: debian, version: '12'}}\n"
          "build:\n  method: cloud-image\n  base: {{url: 'http://127.0.0.1:9/{{release}}.img', sha256: '{sha}'}}\n"
          "disk_size: 1G\nvars: {{release: '12'}}\n")


def write(tmp: Path, doc: Any, recipe: bool = True) -> Path:
    if recipe:
        (tmp / "r.yaml").write_text(RECIPE.format(name="tiny", sha="0" * 64))
    p = tmp / "imagekit-pipeline.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def test_every_problem_at_once_with_paths(tmp_path: Path) -> None:
    p = write(tmp_path, {
        "name": "Bad Name", "colour": "blue",
        "images": [{"recipe": "r.yaml", "matrix": {"release": "12"}, "paused": "maybe"},
                   {"recipe": "missing-recipe"}],
        "clouds": [{"name": "a", "import_methods": ["web-download", "carrier-pigeon"]}, {"name": "a"}],
        "gate": {"cloud": "zzz", "boot": {"timeout": "5 minutes"}},
        "retention": {"stabel": {"keep": 1}},
        "cache": {"oci": {"url": "x/y"}, "directory": "/tmp/x"},
        "provenance": {"signing_key": "nope.pem"}})
    with pytest.raises(model.PipelineError) as exc:
        model.load(p)
    problems = exc.value.problems
    expected = ["name: names use", "colour: unknown key", "images[0].matrix.release: expected a list",
                "images[0].paused: expected true or false", "clouds[0].import_methods[1]: expected one of",
                "gate.boot.timeout: '5 minutes' is not a duration", "clouds: 'a' is listed twice",
                "gate.cloud: 'zzz' is not one of the clouds", "retention.stabel: not a channel",
                "clouds[0].web_download_url: required", "cache: give oci or directory, not both",
                "provenance.signing_key: nope.pem does not exist", "images[1].recipe: no recipe named 'missing-recipe'"]
    for e in expected:
        assert any(x.startswith(e) for x in problems), (e, problems)
    assert len(problems) == len(expected), problems
    assert exc.value.exit_code == 2 and exc.value.code == "pipeline-invalid"


def test_matrix_units_and_their_recipes(tmp_path: Path) -> None:
    p = write(tmp_path, {"name": "m", "images": [
        {"recipe": "r.yaml", "name": "deb", "matrix": {"release": ["12", "13"], "arch": ["amd64"]}},
        {"recipe": "r.yaml", "paused": True}]})
    pipe = model.load(p)
    assert [u.name for u in pipe.units] == ["deb-12-amd64", "deb-13-amd64", "r"]
    r13 = pipe.unit("deb-13-amd64").load_recipe()
    assert r13.build.base.url == "http://127.0.0.1:9/13.img"  # type: ignore[union-attr]
    assert r13.digest != pipe.unit("deb-12-amd64").load_recipe().digest
    assert pipe.unit("r").image.paused and pipe.gate_cloud is None
    with pytest.raises(Exception, match="no unit named 'nope'"):
        pipe.unit("nope")
    bad = write(tmp_path, {"name": "m", "images": [{"recipe": "r.yaml", "matrix": {"release": ["1 2"]}}]})
    with pytest.raises(model.PipelineError) as exc:
        model.load(bad)
    assert any("matrix value '1 2'" in x for x in exc.value.problems)
    broken = write(tmp_path, "name: [unclosed\n", recipe=False)
    with pytest.raises(model.PipelineError, match="not valid YAML"):
        model.load(broken)


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    project = Project(tmp_path, {"PYTHONPATH": str(ROOT)})
    write(tmp_path, {"name": "ok", "images": [{"recipe": "r.yaml"}]})
    good = project.ci("validate")
    assert good.code == 0 and good.json()["units"][0]["unit"] == "r"
    write(tmp_path, {"name": "ok", "images": [{"recipe": "r.yaml", "rebuild": {"max_age": "soon"}}]})
    bad = project.ci("validate")
    assert bad.code == 2 and bad.json()["error"]["code"] == "pipeline-invalid"
    assert [p.split(":")[0] for p in bad.json()["error"]["problems"]] == ["images[0].rebuild.max_age"]
    missing = project.ci("validate", "--pipeline", str(tmp_path / "none.yaml"))
    assert missing.code == 2 and "does not exist" in missing.json()["error"]["message"]


# ---------------------------------------------------------------- the directory store


def entry_in(tmp: Path, name: str, data: bytes) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "artifact").write_bytes(data)
    (d / "meta.json").write_text("{}")
    return d


def test_directory_store_complete_or_absent_and_concurrent(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "shared")
    src = [entry_in(tmp_path, f"src{i}", bytes([i]) * 300_000) for i in range(4)]
    results: list[bool] = []

    def push(i: int) -> None:
        results.append(store.push(src[i], index_of(src[i], "base", "k" * 64, f"runner{i}")))

    threads = [threading.Thread(target=push, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]  # one publishes, the others keep its entry
    idx = store.index("base", "k" * 64)
    assert idx is not None
    out = tmp_path / "out"
    out.mkdir()
    store.pull(idx, out)
    assert (out / "artifact").read_bytes() in [s.joinpath("artifact").read_bytes() for s in src]
    assert not list((store.root / "tmp").iterdir())  # nothing half-written left

    # a push that dies before its index is written is never an entry
    half = store.root / "tmp" / "base-dead"
    half.mkdir()
    (half / "artifact").write_bytes(b"partial")
    assert store.index("base", "d" * 64) is None
    # an altered entry is refused while pulling
    (store.root / "entries" / f"base-{'k' * 64}" / "artifact").write_bytes(b"altered")
    out2 = tmp_path / "out2"
    out2.mkdir()
    with pytest.raises(Exception, match="does not match"):
        store.pull(idx, out2)


def test_shared_cache_pull_publish_and_dead_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(tmp_path / "local"))
    store = DirectoryStore(tmp_path / "shared")
    events: list[str] = []
    sc = SharedCache(store, lease_ttl=1.0, settle=0.05, poll=0.1, listener=lambda e: events.append(e.kind))
    store.write_lease(f"base-{'a' * 64}", Lease("dead-runner", "t0"))  # a runner that was killed
    t = time.monotonic()
    with sc.slot("base", "a" * 64, dict) as slot:
        assert slot.found is None
        with cache.new_entry("base", "a" * 64) as e:
            (e.dir / "artifact").write_bytes(b"x" * 1000)
            e.write_meta(cache.EntryMeta("base", "a" * 64, "r", {}, {"v": 1}, "now"))
        slot.publish(cache.entry("base", "a" * 64))
    assert time.monotonic() - t >= 1.0  # waited for the dead lease to expire
    assert events[:2] == ["wait", "lease"] and "push" in events
    assert store.read_lease(f"base-{'a' * 64}") is None
    shutil.rmtree(tmp_path / "local")
    with sc.slot("base", "a" * 64, dict) as slot:  # another machine: pulled, no lease taken
        assert slot.found is not None and slot.found[1] == {"v": 1}
    assert events[-1] == "pull"


# ---------------------------------------------------------------- provenance, JUnit, webhook


def test_provenance_signed_and_verified(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    image = tmp_path / "x.qcow2"
    image.write_bytes(b"image")
    facts = provenance.BuildFacts("https://ci.example/b", "job-1", "t0", "t1", {"unit": "x"}, {}, (
        provenance.Dependency("base image", "http://x/base", "sha256", "0" * 64),), ())
    files = provenance.write_all([image], facts, tmp_path / "prov", provenance.load_key(pem))
    envelope = json.loads(files[1].read_text())
    statement = provenance.verify(envelope, pub)
    assert statement == json.loads(files[0].read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"][0]["digest"]["sha256"] == provenance.file_sha256(image)
    # the signature covers DSSE's PAE of the payload, checked here independently of imagekit
    import base64

    payload = base64.b64decode(envelope["payload"])
    pae = b"DSSEv1 28 application/vnd.in-toto+json %d %s" % (len(payload), payload)
    key.public_key().verify(base64.b64decode(envelope["signatures"][0]["sig"]), pae)
    tampered = {**envelope, "payload": base64.b64encode(payload.replace(b"job-1", b"job-2")).decode()}
    with pytest.raises(provenance.ProvenanceError):
        provenance.verify(tampered, pub)
    with pytest.raises(provenance.ProvenanceError, match="not a PEM private key"):
        provenance.load_key(b"not a key")


def test_junit_report(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    path = junit.write(tmp_path / "j.xml", "imagekit.gate.x", [junit.Case("boot", 5.2, failure="no login", output="tail"),
                                                                junit.Case("upload", 1.0)])
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    assert suite.find("testcase/failure").get("message") == "no login"  # type: ignore[union-attr]


def test_webhook_notification(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        spec = model.PipelineSpec.model_validate({"name": "n", "images": [{"recipe": "r"}], "notify": {"webhook": {
            "url": f"http://127.0.0.1:{srv.server_address[1]}/hook?token=secret", "events": ["failure"]}}})
        assert notify.notify(spec, "failure", {"unit": "u"}) is None
        assert notify.notify(spec, "promote", {"unit": "u"}) is None  # not subscribed: nothing sent
        assert got == [{"event": "failure", "pipeline": "n", "unit": "u"}]
    finally:
        srv.shutdown()
        srv.server_close()
    warning = notify.notify(spec, "failure", {"unit": "u"})
    assert warning is not None and "secret" not in warning and "not delivered" in warning


# ---------------------------------------------------------------- plan reasons


def test_plan_reasons_from_the_record(tmp_path: Path) -> None:
    """Why a unit is rebuilt, from the keys a build would use now against its last record."""
    from imagekit import pipeline as pl
    from imagekit.ci.plan import _build_reasons
    from imagekit.ci.shared import UnitRecord

    p = write(tmp_path, {"name": "r", "images": [{"recipe": "r.yaml", "rebuild": {"max_age": "1d"}},
                                                 {"recipe": "r.yaml", "name": "fixed", "rebuild": {"upstream": False}}]})
    pipe = model.load(p)
    unit, fixed = pipe.units
    tools = pl.tool_versions()
    keys = pl.StageKeys("b" * 64, "c" * 64, "o" * 64)

    def record(keys: pl.StageKeys, digest: str = "d1", created: str = "2099-01-01T00:00:00Z",
               tools_: Any = tools) -> UnitRecord:
        return UnitRecord("r", "r", "tiny", digest, keys, tools_, "x.qcow2", "qcow2", "s" * 64, 1, 1, created, "me")

    def codes(u: Any, rec: UnitRecord | None, now_keys: pl.StageKeys = keys) -> list[str]:
        return [r.code for r in _build_reasons(u, "d1", now_keys, tools, rec, None)]

    assert codes(unit, None) == ["never-built"]
    assert codes(unit, record(keys, digest="d0"), pl.StageKeys("b" * 64, "c" * 64, "n" * 64)) == ["recipe-changed"]
    from imagekit.builders.base import ToolVersions

    other_tools = ToolVersions(imagekit="0.0.1")
    assert codes(unit, record(keys, tools_=other_tools), pl.StageKeys("x" * 64, "y" * 64, "z" * 64)) == [
        "tools-changed"]
    upstream = pl.StageKeys("u" * 64, "v" * 64, "w" * 64)  # same recipe and tools, another base
    assert codes(unit, record(keys), upstream) == ["upstream-changed"]
    assert codes(fixed, record(keys), upstream) == []  # rebuild.upstream: false
    assert codes(unit, record(keys, created="2000-01-01T00:00:00Z")) == ["too-old"]
    assert codes(unit, record(keys)) == ["cache-miss"]  # recorded, but the output is in no cache
