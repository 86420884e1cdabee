"""The step cache store: entries complete or absent (an exception, an interrupt or missing
metadata leave nothing), typed results that come back as the same dataclasses, list, prune."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from imagekit import cache
from imagekit.builders.base import BaseImage, ManifestInput, NoFacts
from imagekit.builders.cloud_image import CloudImageFacts
from imagekit.builders.dib import DibFacts
from imagekit.pipeline import Checked, Converted, Customised, Package, StepDone, Uploaded
from imagekit.verdict import Finding


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEKIT_CACHE_DIR", str(tmp_path / "cache"))


def meta(stage: str, key: str, result: Any, recipe: str = "r") -> cache.EntryMeta:
    return cache.EntryMeta(stage=stage, key=key, recipe=recipe, inputs={"x": 1}, result=cache.encode(result),
                           created="2024-01-01T00:00:00Z")


def leftovers() -> list[str]:
    return [p.name for p in cache.root().iterdir()] if cache.root().exists() else []


def put(stage: str, key: str, result: Any, recipe: str = "r") -> cache.Entry:
    with cache.new_entry(stage, key) as e:
        e.artifact.write_bytes(b"image")
        e.write_meta(meta(stage, key, result, recipe))
    return cache.entry(stage, key)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_entry_is_complete_or_absent(exc: type[BaseException]) -> None:
    key = cache.digest({"a": 1})
    with pytest.raises(exc), cache.new_entry("base", key) as e:
        e.artifact.write_bytes(b"half")
        e.write_meta(meta("base", key, NoFacts()))
        raise exc()
    assert leftovers() == [] and cache.lookup("base", key, NoFacts) is None


def test_an_entry_without_metadata_is_refused() -> None:
    with pytest.raises(cache.CacheError), cache.new_entry("base", "k" * 64) as e:
        e.artifact.write_bytes(b"image")
    assert leftovers() == []


def test_lookup_returns_the_typed_result_and_marks_use() -> None:
    key = cache.digest("convert")
    conv = Converted("ab" * 32, "qcow2", 1 << 20, "1.1", "ok", "identical")
    e = put("convert", key, conv)
    os.utime(e.meta_path, (1, 1))
    found = cache.lookup("convert", key, Converted)
    assert found is not None and found[0] == e and found[1] == conv and isinstance(found[1], Converted)
    assert e.meta_path.stat().st_mtime > time.time() - 60
    assert cache.lookup("convert", cache.digest("other"), Converted) is None


def test_unreadable_or_foreign_metadata_is_a_miss_and_is_replaced() -> None:
    key = cache.digest("base")
    e = put("base", key, Converted(None, "raw", 1, None, "ok", "identical"))
    assert cache.lookup("base", key, Checked) is None  # another type than the one stored
    e.meta_path.write_text('{"stage": "base", "details": {}}')  # an older imagekit's entry
    assert cache.lookup("base", key, Converted) is None
    put("base", key, Converted(None, "raw", 2, None, "ok", "identical"))
    found = cache.lookup("base", key, Converted)
    assert found is not None and found[1].virtual_size == 2


RESULTS: list[Any] = [
    BaseImage(Path("artifact"), "raw", 10 << 30, DibFacts(95.5, "partloop", {"diskimage-builder": "3.43"}, "dib.log"),
              elements=("vm", "debian-minimal")),
    BaseImage(Path("artifact"), "qcow2", 12 << 30, CloudImageFacts("qcow2", True, True),
              inputs=(ManifestInput("base image", url="http://x/y.qcow2", algo="sha512", digest="ab" * 64, size=5,
                                    format="qcow2"),)),
    BaseImage(Path("artifact"), "qcow2", 1, NoFacts()),
    Customised("qcow2", (StepDone(0, "hostname", "hostname set", 1.5),), {"distro": "debian", "kernels": [{"v": 1}]},
               (Package("bash", "5.2", "amd64"), Package(None, None, None)), "tcg"),
    Converted("cd" * 32, "qcow2", 1 << 30, "0.10", "No errors were found", "identical"),
    Checked("warn", (Finding("sparse", "warn", "message"), Finding("x", "info", "y"))),
    Uploaded("c", "id", "n", "active", "qcow2", 5, "ff", True, False, {"os_distro": "debian"}, ["t"], "private", 1,
             {"hidden": ["old"]}),
]


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: type(r).__name__)
def test_stage_results_round_trip_through_the_metadata(result: Any) -> None:
    tp = BaseImage[type(result.facts)] if isinstance(result, BaseImage) else type(result)  # type: ignore[misc]
    key = cache.digest(repr(result))
    put("stage", key, result)
    found = cache.lookup("stage", key, tp)
    assert found is not None
    assert found[1] == result and type(found[1]) is type(result)
    if isinstance(result, BaseImage):
        assert type(found[1].facts) is type(result.facts)


def test_list_and_prune(tmp_path: Path) -> None:
    a = put("base", cache.digest(1), NoFacts(), recipe="one")
    b = put("convert", cache.digest(2), NoFacts(), recipe="two")
    old = put("customise", cache.digest(3), NoFacts(), recipe="two")
    os.utime(old.meta_path, (time.time() - 10 * 86400,) * 2)
    stale = cache.root() / ".base-leftover"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * cache.LEFTOVER_SECONDS,) * 2)

    listed = {e.entry: e for e in cache.entries()}
    assert set(listed) == {a.dir.name, b.dir.name, old.dir.name}  # not the temporary folder
    assert listed[a.dir.name].stage == "base" and listed[a.dir.name].recipe == "one"
    assert listed[a.dir.name].disk_bytes > 0 and listed[a.dir.name].to_dict()["path"] == str(a.dir)

    assert [e.entry for e in cache.prune(older_than=86400, dry_run=True)] == [old.dir.name]
    assert old.dir.exists() and stale.exists()  # dry run
    assert [e.entry for e in cache.prune(older_than=86400)] == [old.dir.name]
    assert not old.dir.exists() and not stale.exists()
    assert [e.recipe for e in cache.prune(recipe="two")] == ["two"]
    assert [e.entry for e in cache.prune(everything=True)] == [a.dir.name]
    assert cache.entries() == []
