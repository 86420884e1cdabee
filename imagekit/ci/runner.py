"""``imagekit ci run UNIT``: one unit through the step cache, with everything a CI job publishes.

The unit's recipe (loaded with its matrix variables) goes through ``imagekit.pipeline.build``
with the pipeline's shared step cache: each stage is taken from this machine's cache, else
pulled from the shared one (waiting while another runner holds the stage's lease), else
built and pushed. A unit whose last build is older than ``rebuild.max_age`` is built again
without the cache (its entries are replaced). Outputs, in ``OUTPUT_DIR/UNIT/``:

- the image and ``IMAGE.manifest.json`` (the pipeline's);
- ``build.log`` (imagekit's log and every stage message of this run);
- ``junit.xml``: one test case per stage (cached ones say so), the failure when one failed;
- ``provenance/``: an in-toto statement (SLSA v1) for the image and for the manifest, each
  signed in a DSSE envelope when a key is configured;
- ``ci-run.json``: the unit record (also written to the shared cache, for ``ci plan``);
- ``artifacts.json``: the outputs as Zuul's artifact list (name, path, metadata).

A failure still writes ``junit.xml`` and the log, notifies the webhook and raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imagekit import accel as accel_mod
from imagekit import manifest
from imagekit import pipeline as pl
from imagekit.builders.base import BaseImage, ToolVersions
from imagekit.cache_remote import CacheEvent, runner_id
from imagekit.ci import junit, notify, provenance
from imagekit.ci.events import EventLog
from imagekit.ci.model import Pipeline, Unit
from imagekit.ci.results import RunResult, StageSummary
from imagekit.ci.shared import UnitRecord, open_cache, read_record, write_record
from imagekit.errors import ImagekitError

log = logging.getLogger("imagekit.ci")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def too_old(record: UnitRecord | None, max_age: float | None) -> bool:
    if record is None or max_age is None:
        return False
    try:
        built = time.mktime(time.strptime(record.created, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except ValueError:
        return True
    return time.time() - built > max_age


@contextlib.contextmanager
def build_log(path: Path) -> Iterator[logging.Handler]:
    """imagekit's log (INFO and up) into ``path`` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("imagekit")
    old_level = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def signing_key(pipeline: Pipeline) -> Any | None:
    conf = pipeline.spec.provenance
    if conf.signing_key_env and os.environ.get(conf.signing_key_env):
        return provenance.load_key(os.environ[conf.signing_key_env].encode())
    if conf.signing_key:
        return provenance.load_key(pipeline.resolve(conf.signing_key).read_bytes())
    return None


def run_unit(pipeline: Pipeline, unit_name: str, accel: accel_mod.AccelChoice, events: EventLog, *,
             fresh: bool = False, say: Callable[[str, str], None] | None = None) -> RunResult:
    """Build one unit (see the module documentation); raises the build's error after writing
    the JUnit report and notifying."""
    unit = pipeline.unit(unit_name)
    out = pipeline.output_dir(unit.name)
    out.mkdir(parents=True, exist_ok=True)
    cache_events: list[CacheEvent] = []

    def on_cache(ev: CacheEvent) -> None:
        cache_events.append(ev)
        events.cache_event(ev)

    shared = open_cache(pipeline, on_cache)
    started, t0 = _now(), time.monotonic()
    events.emit("run.start", data={"pipeline": pipeline.spec.name, "cache": shared.store.url if shared else None})
    with build_log(out / "build.log"):
        try:
            recipe = unit.load_recipe()
            fresh = fresh or too_old(read_record(pipeline, unit, shared), unit.image.rebuild.max_age)
            if fresh:
                log.info("the last build of %s is older than rebuild.max_age: building without the cache", unit.name)
            opts = pl.BuildOptions(accel=accel, use_cache=not fresh, shared=shared)

            def phase(stage: str, message: str) -> None:
                log.info("[%s] %s", stage, message)
                events.phase(stage, message)
                if say is not None:
                    say(stage, message)

            result = pl.build(recipe, out, opts, phase=phase)
        except BaseException as exc:
            _failed(pipeline, unit, out, exc, time.monotonic() - t0, events)
            raise
    pulled = tuple(e.stage for e in cache_events if e.kind == "pull")
    stages = tuple(StageSummary(s.name, s.cached, s.seconds,
                                "shared" if _cache_name(s.name) in pulled else "local" if s.cached else "built")
                   for s in result.stages)
    for s in stages:
        events.emit("stage.end", stage=s.name, seconds=s.seconds, data={"cached": s.cached, "source": s.source})
    image = Path(result.output.path)
    sha = result.output.sha256 or provenance.file_sha256(image)
    keys = {s.name: s.key for s in result.stages}
    tools = pl.tool_versions()
    record = UnitRecord(pipeline=pipeline.spec.name, unit=unit.name, recipe=recipe.name,
                        recipe_digest=recipe.digest,
                        keys=pl.StageKeys(keys["build"], keys["customise"], keys["convert"]),
                        tools=tools, image=image.name, format=result.output.format, sha256=sha,
                        size=result.output.size, virtual_size=result.output.virtual_size, created=_now(),
                        runner=shared.runner if shared else runner_id(), invocation=provenance.invocation_id())
    key = signing_key(pipeline)
    facts = _facts(pipeline, unit, recipe, result, started, out, tools, accel)
    prov = provenance.write_all([image, result.manifest], facts, out / "provenance", key, {image.name: sha})
    report = junit.write(out / "junit.xml", f"imagekit.run.{unit.name}",
                         [junit.Case(s.name, s.seconds, output=f"{s.source}") for s in stages])
    write_record(pipeline, unit, record, out, shared)
    _write_artifacts(out, unit, record, result)
    warnings = list(shared.warnings if shared else [])
    hook = notify.notify(pipeline.spec, "run", {"unit": unit.name, "sha256": sha, "ok": True})
    warnings += [hook] if hook else []
    events.emit("result", data={"ok": True, "sha256": sha, "image": str(image), "pulled": list(pulled)})
    return RunResult(unit.name, str(image), sha, str(result.manifest), str(out), fresh, stages, pulled,
                     tuple(e.stage for e in cache_events if e.kind == "push"), str(report),
                     tuple(str(p) for p in prov), key is not None, tuple(warnings), round(time.monotonic() - t0, 2))


def _cache_name(stage: str) -> str:
    return "base" if stage == "build" else stage


def _failed(pipeline: Pipeline, unit: Unit, out: Path, exc: BaseException, seconds: float, events: EventLog) -> None:
    message = exc.message if isinstance(exc, ImagekitError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        message = "interrupted"
    junit.write(out / "junit.xml", f"imagekit.run.{unit.name}", [junit.Case("build", seconds, failure=message)])
    events.emit("error", data={"ok": False, "error": message})
    notify.notify(pipeline.spec, "failure", {"command": "run", "unit": unit.name, "error": message})


def _facts(pipeline: Pipeline, unit: Unit, recipe: Any, result: pl.BuildResult, started: str, out: Path,
           tools: ToolVersions, accel: accel_mod.AccelChoice) -> provenance.BuildFacts:
    base = next(s.result for s in result.stages if s.name == "build")
    inputs = (*(base.inputs if isinstance(base, BaseImage) else ()), *manifest.recipe_inputs(recipe))
    deps = tuple(provenance.Dependency(i.name, i.url or f"file://{i.path}", i.algo, i.digest)
                 for i in inputs if i.digest)
    return provenance.BuildFacts(
        builder_id=pipeline.spec.provenance.builder_id,
        invocation=provenance.invocation_id() or f"imagekit-ci:{unit.name}:{started}",
        started=started, finished=_now(),
        external={"pipeline": {"name": pipeline.spec.name, "file": pipeline.path.name,
                               "sha256": provenance.file_sha256(pipeline.path)},
                  "unit": unit.name, "recipe": recipe.name, "recipe_digest": recipe.digest,
                  "variables": unit.variables},
        internal={"tools": tools.to_dict(), "accelerator": accel.accel,
                  "stages": [{"name": s.name, "key": s.key, "cached": s.cached} for s in result.stages]},
        dependencies=deps, byproducts=(out / "build.log",))


def _write_artifacts(out: Path, unit: Unit, record: UnitRecord, result: pl.BuildResult) -> None:
    """``artifacts.json``: Zuul's artifact list (``zuul_return`` data), usable by any CI system."""
    md5 = hashlib.md5(usedforsecurity=False)  # Zuul's image artifacts carry md5sum beside sha256
    with (out / record.image).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            md5.update(chunk)
    arts = [{"name": unit.name, "url": record.image,
             "metadata": {"type": "zuul_image", "image_name": unit.name, "format": record.format,
                          "sha256": record.sha256, "md5sum": md5.hexdigest(), "size": record.size}},
            {"name": f"{unit.name} manifest", "url": result.manifest.name, "metadata": {"type": "imagekit_manifest"}},
            {"name": f"{unit.name} provenance", "url": "provenance/", "metadata": {"type": "in_toto"}},
            {"name": f"{unit.name} junit", "url": "junit.xml", "metadata": {"type": "junit"}}]
    tmp = out / ".artifacts.json.part"
    tmp.write_text(json.dumps({"zuul": {"artifacts": arts}}, indent=2) + "\n")
    os.replace(tmp, out / "artifacts.json")
