"""``build --upload``: the convert stage writes the output and sends it to the real local Glance in the same
pass (the small served cloud image of tests/test_pipeline.py); a cached rebuild uploads from the file and finds
the identical image."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from imagekit import pipeline
from imagekit.check import check
from tests.glance_fixture import GlanceFixture
from tests.http_fixture import FileServer
from tests.test_pipeline import options, recipe_for, served  # noqa: F401 - the fixture


def test_build_upload_streams_while_converting(served: FileServer, glance_env: GlanceFixture,  # noqa: F811
                                               tmp_path: Path) -> None:
    sha = hashlib.sha256((served.root / "base.qcow2").read_bytes()).hexdigest()
    r = recipe_for(tmp_path, served, sha, "glance: {name: tiny-stream, keep: 0}\n")
    first = pipeline.build(r, tmp_path / "out", options(upload_cloud=glance_env.cloud))
    assert [s.name for s in first.stages] == ["build", "customise", "convert", "check", "upload"]
    up = first.upload
    assert up is not None and up.verified and up.status == "active" and not up.reused
    out = Path(first.output.path)
    data = out.read_bytes()
    assert up.os_hash_value == hashlib.sha512(data).hexdigest() and up.size == len(data)
    assert first.output.sha256 == hashlib.sha256(data).hexdigest()
    conv = next(s for s in first.stages if s.name == "convert").result
    assert isinstance(conv, pipeline.Converted) and conv.compare == "map-as-planned"
    m = json.loads(first.manifest.read_text())
    assert m["glance"]["id"] == up.id and m["output"]["sha256"] == first.output.sha256
    # compressed by default (zlib)
    rep = check(out).format_report
    assert first.output.compat == "0.10" and rep is not None and rep.stats["compressed_clusters"] > 0
    again = pipeline.build(r, tmp_path / "out2", options(upload_cloud=glance_env.cloud))
    assert again.upload is not None and again.upload.reused and again.upload.id == up.id
    assert again.output.sha256 == first.output.sha256
