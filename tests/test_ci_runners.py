"""The shared step cache under concurrency, for real: ``imagekit ci run`` processes with separate
HOMEs (each its own local cache) against the real registry on 127.0.0.1.

Three runners on one key: every stage is built by exactly one of them and pulled by the two
others (leases), and all three produce the same image. A runner SIGKILLed while it pushes
(its upload held in flight by a relay) leaves no entry anyone trusts: the registry has no tag
for it, the next runner waits for the dead runner's lease to expire, builds and publishes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.ci_fixture import Project, Registry, TcpPause, sha256_of
from tests.http_fixture import FileServer

pytestmark = pytest.mark.slow
STAGES = ("base", "customise", "convert")


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pipeline(project: Project, name: str, cache_url: str, unit: str, served: FileServer, disk: str) -> None:
    project.write_recipe(unit, served.url("boot.qcow2"), sha256_of(served.root / "boot.qcow2"), disk_size=disk)
    project.write_pipeline({"name": name, "images": [{"recipe": f"recipes/{unit}.yaml"}],
                            "cache": {"oci": {"url": cache_url, "insecure": True}, "lease_ttl": "4s",
                                      "settle": "0.5s"}})


def test_three_runners_one_key_one_builds(ci_project: Project, registry: Registry, served: FileServer) -> None:
    project = ci_project
    pipeline(project, "three", f"{registry.host}/three/cache", "tiny-three", served, "72M")
    logs = [project.folder / f"events-{i}.jsonl" for i in range(3)]
    procs = [project.popen("run", "tiny-three", home=f"runner{i}", events=logs[i]) for i in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    for stage in STAGES:
        built = [r for r in results if stage in r["pushed"]]
        pulled = [r for r in results if stage in r["pulled"]]
        assert len(built) == 1 and len(pulled) == 2, (stage, [(r["pushed"], r["pulled"]) for r in results])
    assert len({r["sha256"] for r in results}) == 1
    assert all(sha256_of(Path(r["image"])) == r["sha256"] for r in results)
    waited = [e for log in logs for e in events(log) if e["event"] == "cache.wait"]
    assert waited, "the waiting runners say whose lease they wait for"
    tags = registry.tags("three/cache")
    assert [t for t in tags if t.startswith("l-")] == []  # every lease released
    assert len([t for t in tags if t.startswith("e-")]) == 3


def test_runner_killed_during_push_leaves_no_trusted_entry(ci_project: Project, registry: Registry,
                                                          served: FileServer) -> None:
    project = ci_project
    relay = TcpPause(registry.port)
    try:
        pipeline(project, "killed", f"127.0.0.1:{relay.port}/killed/cache", "tiny-killed", served, "80M")
        relay.hold_after(1 << 20)  # the first MiB of an upload passes, then the bytes stay in flight
        victim = project.popen("run", "tiny-killed", home="victim", events=project.folder / "victim.jsonl")
        assert relay.held.wait(120), "the push never started"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
        relay.cut()
        assert victim.returncode == -signal.SIGKILL
        pushing = [e for e in events(project.folder / "victim.jsonl") if e["event"] == "cache.lease"]
        assert pushing and pushing[0]["stage"] == "base"  # it held the lease on the base it was pushing
        tags = registry.tags("killed/cache")
        assert not [t for t in tags if t.startswith("e-")], tags  # no entry: the manifest is written last
        assert [t for t in tags if t.startswith("l-base-")]  # only its lease, which will expire
        uploads = list((registry.root / "data").rglob("_uploads/*/data"))
        assert uploads and max(u.stat().st_size for u in uploads) > 0  # part of the blob, referenced by nothing

        after = project.ci("run", "tiny-killed", home="next")
        assert after.code == 0, after.err[-3000:]
        res = after.json()
        assert res["pulled"] == [] and res["pushed"] == list(STAGES)  # nothing of the dead runner was used
        tags = registry.tags("killed/cache")
        assert len([t for t in tags if t.startswith("e-")]) == 3 and not [t for t in tags if t.startswith("l-")]
        again = project.ci("run", "tiny-killed", home="third")
        assert again.code == 0 and again.json()["pulled"] == list(STAGES)
    finally:
        relay.close()
