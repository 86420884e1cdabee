"""What the CI commands share: the shared step cache of a pipeline and each unit's record.

A *unit record* (:class:`UnitRecord`) says what the last ``imagekit ci run`` of a unit
produced: the stage keys it was built with, the tools, the image's file name, sha256 and
sizes, when and by whom. ``ci run`` writes it next to its outputs (``ci-run.json``, which
``ci gate`` and ``ci promote`` read from the job's artifacts) and to the shared cache
(a record), where ``ci plan`` and ``ci status`` find it from any machine.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from imagekit.builders.base import ToolVersions
from imagekit.cache_remote import DirectoryStore, Listener, SharedCache, SharedCacheError, Store
from imagekit.ci.model import Pipeline, Unit
from imagekit.errors import ImagekitError
from imagekit.pipeline import StageKeys

RUN_RECORD = "ci-run.json"


class ArtifactsMissing(ImagekitError):
    """A gate or promote job found no output of ``imagekit ci run`` for its unit."""

    code = "ci-artifacts-missing"


@dataclass(frozen=True)
class UnitRecord:
    pipeline: str
    unit: str
    recipe: str
    recipe_digest: str | None
    keys: StageKeys
    tools: ToolVersions
    image: str  # the image's file name in the unit's output folder
    format: str
    sha256: str
    size: int
    virtual_size: int
    created: str  # UTC, ISO 8601
    runner: str
    invocation: str | None = None


RECORD_JSON = TypeAdapter(UnitRecord)


def store_of(pipeline: Pipeline) -> Store | None:
    """The pipeline's shared store (None: no ``cache:`` section)."""
    conf = pipeline.spec.cache
    if conf.oci is not None:
        from imagekit.ci.cache_oci import OciStore

        user = os.environ.get(conf.oci.username_env) if conf.oci.username_env else None
        password = os.environ.get(conf.oci.password_env) if conf.oci.password_env else None
        return OciStore(conf.oci.url, insecure=conf.oci.insecure, username=user, password=password)
    if conf.directory is not None:
        return DirectoryStore(pipeline.resolve(conf.directory))
    return None


def open_cache(pipeline: Pipeline, listener: Listener | None = None) -> SharedCache | None:
    store = store_of(pipeline)
    if store is None:
        return None
    conf = pipeline.spec.cache
    return SharedCache(store, lease_ttl=conf.lease_ttl, settle=conf.settle, listener=listener)


def record_name(pipeline: Pipeline, unit: Unit) -> str:
    return "unit-" + hashlib.sha256(f"{pipeline.spec.name}/{unit.name}".encode()).hexdigest()[:40]


def read_record(pipeline: Pipeline, unit: Unit, shared: SharedCache | None) -> UnitRecord | None:
    """The unit's last record: the shared cache's, else the local output folder's."""
    if shared is not None:
        try:
            data = shared.store.get_record(record_name(pipeline, unit))
        except SharedCacheError:
            data = None
        if data is not None:
            try:
                return RECORD_JSON.validate_json(data)
            except ValidationError:
                pass
    return local_record(pipeline.output_dir(unit.name))


def local_record(folder: Path) -> UnitRecord | None:
    try:
        return RECORD_JSON.validate_json((folder / RUN_RECORD).read_bytes())
    except (OSError, ValidationError):
        return None


def require_record(pipeline: Pipeline, unit: Unit, artifacts: Path | None) -> tuple[UnitRecord, Path]:
    """The record and image of the unit's run, from ``artifacts`` (default: the output folder)."""
    folder = artifacts or pipeline.output_dir(unit.name)
    rec = local_record(folder)
    if rec is None or not (folder / rec.image).is_file():
        raise ArtifactsMissing(f"no output of 'imagekit ci run {unit.name}' in {folder}",
                               "run it first, or pass the run job's artifacts with --artifacts DIR")
    if rec.unit != unit.name or rec.pipeline != pipeline.spec.name:
        raise ArtifactsMissing(f"{folder / RUN_RECORD} belongs to {rec.pipeline}/{rec.unit}, not "
                               f"{pipeline.spec.name}/{unit.name}")
    return rec, folder / rec.image


def write_record(pipeline: Pipeline, unit: Unit, record: UnitRecord, folder: Path,
                 shared: SharedCache | None) -> None:
    data = RECORD_JSON.dump_json(record, indent=2)
    tmp = folder / f".{RUN_RECORD}.part"
    tmp.write_bytes(data)
    os.replace(tmp, folder / RUN_RECORD)
    if shared is not None:
        shared.store.put_record(record_name(pipeline, unit), data)
