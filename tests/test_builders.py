"""Build methods: a method registered from outside runs through the unchanged pipeline; a
failing or interrupted build replays its clean-ups in reverse and leaves no cache entry;
stage results come back from the cache as the same dataclasses. The guest inventory is
stubbed (no appliance), so these tests take seconds."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytest

from imagekit import builders, cache, pipeline, sbom
from imagekit import recipe as rec
from imagekit.accel import AccelChoice
from imagekit.builders.base import (
    BaseImage,
    BuildContext,
    BuildError,
    BuildSpec,
    ManifestInput,
    ToolVersions,
    UnknownBuildMethod,
    recipe_inputs,
    run_builder,
)
from imagekit.guest import GuestError
from imagekit.run import run
from tests.conftest import ROOT

TCG = AccelChoice("tcg", "tcg", "chosen by the test")


class FakeBuild(BuildSpec):
    method: Literal["fake"] = "fake"
    size: int = 4 << 20
    fail: Literal["error", "interrupt", "wrong-path"] | None = None


@dataclass(frozen=True)
class FakeFacts:
    note: str
    layers: tuple[str, ...]


class FakeBuilder:
    """A build method the pipeline has never heard of: an empty qcow2, three clean-ups registered."""

    method = "fake"
    model = FakeBuild
    facts = FakeFacts

    def __init__(self) -> None:
        self.undone: list[str] = []
        self.builds = 0

    def check_recipe(self, recipe: rec.Recipe) -> None:
        return None

    def cache_inputs(self, recipe: rec.Recipe, tools: ToolVersions) -> dict[str, Any]:
        return {**recipe_inputs(recipe), "qemu-img": tools.qemu_img}

    def build(self, recipe: rec.Recipe, out: Path, ctx: BuildContext) -> BaseImage[FakeFacts]:
        spec = recipe.build
        assert isinstance(spec, FakeBuild)
        self.builds += 1
        for what in ("mount", "loop device", "chroot"):
            ctx.add_rollback(partial(self.undone.append, what), f"undo the {what}")
        ctx.phase("making an empty disk")
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(out), str(spec.size)], timeout=60)
        if spec.fail == "error":
            raise BuildError("the fake build failed")
        if spec.fail == "interrupt":
            raise KeyboardInterrupt
        return BaseImage(out if spec.fail != "wrong-path" else out.with_name("elsewhere"), "qcow2", spec.size,
                         FakeFacts("made by a fake", ("a", "b")),
                         inputs=(ManifestInput(name="fake input", url="fake://x", digest="0" * 64),),
                         elements=("one", "two"))


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(tmp_path / "cache"))

    def no_appliance(*_a: Any, **_k: Any) -> dict[str, Any]:
        raise GuestError("no appliance in this test")

    monkeypatch.setattr(sbom, "inspect_guest", no_appliance)
    b = builders.register(FakeBuilder())
    try:
        yield b
    finally:
        builders.unregister("fake")


def fake_recipe(tmp_path: Path, **build: Any) -> rec.Recipe:
    p = tmp_path / "fakeimg.yaml"
    p.write_text("name: fakeimg\ndescription: built by a fake method\nos: {type: linux, distro: debian, version: '12'}\n"
                 "build: {method: cloud-image, base: {url: 'http://127.0.0.1/x.qcow2', trust: first-use}}\n"
                 "disk_size: 4M\n")
    # the recipe model knows the shipped methods only; a registered method needs no change elsewhere
    return rec.load(p).model_copy(update={"build": FakeBuild(**build)})


def options(**kw: Any) -> pipeline.BuildOptions:
    return pipeline.BuildOptions(accel=TCG, network=False, **kw)


def test_a_registered_method_runs_through_the_pipeline(fake: FakeBuilder, tmp_path: Path) -> None:
    said: list[tuple[str, str]] = []
    first = pipeline.build(fake_recipe(tmp_path), tmp_path / "out", options(), phase=lambda s, m: said.append((s, m)))
    assert [(s.name, s.cached) for s in first.stages] == [("build", False), ("customise", False),
                                                           ("convert", False), ("check", False)]
    assert ("build", "making an empty disk") in said
    base = first.stages[0].result
    assert isinstance(base, BaseImage) and base.facts == FakeFacts("made by a fake", ("a", "b"))
    assert base.path == Path(first.stages[0].output or "") and base.path.is_file()
    assert first.verdict == "accept" and first.output.virtual_size == 4 << 20
    m = json.loads(first.manifest.read_text())
    assert m["recipe"]["build_method"] == "fake" and m["elements"] == ["one", "two"]
    assert m["inputs"][0] == {"name": "fake input", "url": "fake://x", "sha256": "0" * 64}
    assert m["inputs"][1]["name"] == "recipe" and m["accelerator"]["accel"] == "tcg"
    assert "error" in m["guest"]["os"]

    # typed results round-trip through the cache: the same dataclasses, equal, facts included
    again = pipeline.build(fake_recipe(tmp_path), tmp_path / "out2", options())
    assert [s.cached for s in again.stages] == [True, True, True, False] and fake.builds == 1
    for before, after in zip(first.stages[:3], again.stages[:3], strict=True):
        assert type(after.result) is type(before.result) and after.result == before.result
    cached_base = again.stages[0].result
    assert isinstance(cached_base, BaseImage) and type(cached_base.facts) is FakeFacts
    assert again.output.sha256 == first.output.sha256
    assert json.loads(json.dumps(again.to_dict()))["stages"][0]["details"]["facts"]["note"] == "made by a fake"


def test_the_pipeline_names_no_build_method() -> None:
    """Dispatch goes through the registry: pipeline.py imports no builder module."""
    tree = ast.parse((ROOT / "imagekit" / "pipeline.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("imagekit.builders")} <= {"imagekit.builders.base"}
    assert not {"dib", "cloud_image", "windows"} & {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                                                   for a in n.names}


@pytest.mark.parametrize("fail, exc", [("error", BuildError), ("interrupt", KeyboardInterrupt),
                                       ("wrong-path", BuildError)])
def test_failed_build_rolls_back_in_reverse_and_caches_nothing(fake: FakeBuilder, tmp_path: Path, fail: str,
                                                               exc: type[BaseException]) -> None:
    with pytest.raises(exc):
        pipeline.build(fake_recipe(tmp_path, fail=fail), tmp_path / "out", options())
    assert fake.undone == ["chroot", "loop device", "mount"]  # last registered, first undone
    assert cache.entries() == []
    assert not any(cache.root().iterdir())  # no temporary folder either
    assert not any((tmp_path / "out").iterdir())


def test_a_stage_failing_after_the_build_leaves_no_entry_of_its_own(fake: FakeBuilder, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_convert(src: Path, dst: Path, opts: Any) -> Any:
        Path(dst).write_bytes(b"half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "convert", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build(fake_recipe(tmp_path), tmp_path / "out", options())
    assert sorted(e.stage or "" for e in cache.entries()) == ["base", "customise"]  # complete ones stay
    assert not [p for p in cache.root().iterdir() if p.name.startswith(".")]
    assert fake.undone == []  # the build itself succeeded: nothing of it is undone


def test_build_context_rollbacks(caplog: pytest.LogCaptureFixture) -> None:
    ctx = BuildContext(accel=TCG, tools=ToolVersions("test"))
    done: list[str] = []

    def broken() -> None:
        raise OSError("device busy")

    ctx.add_rollback(partial(done.append, "first"), "first")
    ctx.add_rollback(broken, "the broken one")
    ctx.add_rollback(partial(done.append, "last"), "last")
    with pytest.raises(ValueError), ctx.guard():
        raise ValueError("boom")
    assert done == ["last", "first"]  # a failing clean-up does not stop the others
    assert "rollback failed: the broken one" in caplog.text
    assert ctx.rollbacks == []

    ctx.add_rollback(partial(done.append, "never"), "never")
    with ctx.guard():
        pass
    assert ctx.rollbacks == [] and "never" not in done  # success: nothing undone


def test_run_builder_refuses_a_result_elsewhere(tmp_path: Path) -> None:
    b = FakeBuilder()
    r = fake_recipe(tmp_path, fail="wrong-path")
    with pytest.raises(BuildError, match="not"):
        run_builder(b, r, tmp_path / "img", BuildContext(accel=TCG, tools=ToolVersions("test")))
    assert b.undone == ["chroot", "loop device", "mount"]


def test_registry_of_shipped_methods() -> None:
    assert builders.methods() == ["cloud-image", "dib", "snapshot", "windows"]
    for method in builders.methods():
        b = builders.get(method)
        assert isinstance(b, builders.Builder) and b.model.model_fields["method"].annotation == Literal[method]
    with pytest.raises(UnknownBuildMethod) as err:
        builders.get("kickstart")
    assert err.value.code == "build-method-unknown" and "dib" in (err.value.hint or "")
    with pytest.raises(ValueError, match="already registered"):
        builders.register(builders.get("dib"))


def test_dib_builder_rolls_back_its_partial_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped dib builder: when diskimage-builder fails, the partial image is removed (diskimage-builder
    itself is stubbed: this is about the wiring; dib.build's own work folder clean-up is tested in test_dib.py
    and test_signals.py against real builds)."""
    from imagekit.builders import dib

    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []

    def failing_build(recipe: Any, out: Path, **_kw: Any) -> Any:
        calls.append(out)
        out.write_bytes(b"partial")
        raise dib.DibError("disk-image-create failed")

    monkeypatch.setattr(dib, "build", failing_build)
    out = tmp_path / "artifact"
    with pytest.raises(dib.DibError):
        run_builder(builders.get("dib"), rec.load("debian-12"), out, BuildContext(accel=TCG, tools=ToolVersions("t")))
    assert calls == [out] and not out.exists()
