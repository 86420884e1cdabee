"""``imagekit ci plan``: the units, and for each what needs doing and why (or why nothing).

For every unit the plan computes the stage keys a build would use now
(``imagekit.pipeline.stage_keys``: the recipe with its matrix variables, the tools, the
upstream base's digest) and compares them with the unit's last record (the shared cache's,
:mod:`imagekit.ci.shared`), then looks at every cloud:

- ``run`` because: ``never-built``; ``recipe-changed`` (the recipe's digest differs);
  ``tools-changed``; ``upstream-changed`` (same recipe and tools, another base: a new
  upstream image, or changed element files); ``too-old`` (``rebuild.max_age``; the run then
  builds without the cache); ``cache-miss`` (recorded, but the output is in neither the
  shared nor this machine's cache);
- ``gate`` because ``not-tested`` (the output is not in the tested channel, or later, of the
  gate cloud);
- ``promote`` because ``missing-in-cloud`` (not in the last channel of a cloud).

A unit with nothing to do says ``up-to-date``; a paused one ``paused``. A cloud that does
not answer is reported (``cloud-unreachable``) without stopping the plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from imagekit import cache
from imagekit import pipeline as pl
from imagekit.builders.base import ToolVersions
from imagekit.cache_remote import SharedCache
from imagekit.ci import clouds as cl
from imagekit.ci.model import Pipeline, Unit
from imagekit.ci.results import CloudState, PlanResult, Reason, UnitPlan
from imagekit.ci.runner import too_old
from imagekit.ci.shared import UnitRecord, open_cache, read_record
from imagekit.errors import ImagekitError

log = logging.getLogger("imagekit.ci")


@dataclass
class _Clouds:
    images: dict[str, list[cl.CloudImage]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _scan_clouds(pipeline: Pipeline) -> _Clouds:
    out = _Clouds()
    for c in pipeline.spec.clouds:
        try:
            out.images[c.name] = cl.owned(cl.open_cloud(c.name), pipeline.spec.name)
        except ImagekitError as exc:
            out.errors[c.name] = exc.message
    return out


def _build_reasons(unit: Unit, recipe_digest: str | None, keys: pl.StageKeys, tools: ToolVersions,
                   rec: UnitRecord | None, shared: SharedCache | None) -> list[Reason]:
    if rec is None:
        return [Reason("never-built", "no record of a build of this unit")]
    if rec.keys.convert != keys.convert:
        if rec.recipe_digest != recipe_digest:
            return [Reason("recipe-changed", "the recipe (or its matrix variables) changed since the last build")]
        if rec.tools != tools:
            return [Reason("tools-changed", "imagekit, qemu-img, libguestfs or diskimage-builder changed")]
        if rec.keys.base != keys.base:
            if not unit.image.rebuild.upstream:
                return []
            return [Reason("upstream-changed", "the base's inputs changed (a new upstream image or element files)")]
        return [Reason("inputs-changed", "a customise file or setting changed")]
    if too_old(rec, unit.image.rebuild.max_age):
        return [Reason("too-old", f"built {rec.created}, older than rebuild.max_age")]
    local = cache.entry("convert", keys.convert).meta_path.is_file()
    if not local and (shared is None or shared.has("convert", keys.convert) is None):
        return [Reason("cache-miss", "the output is in neither the shared cache nor this machine's")]
    return []


def _cloud_states(pipeline: Pipeline, unit: Unit, sha: str | None, scan: _Clouds) -> list[CloudState]:
    channels = pipeline.spec.channels
    states = []
    for c in pipeline.spec.clouds:
        if c.name in scan.errors:
            states.append(CloudState(c.name, None, None, scan.errors[c.name]))
            continue
        mine = [i for i in scan.images.get(c.name, []) if i.unit == unit.name and i.sha256 == sha and i.usable
                and i.channel in channels]
        best = max(mine, key=lambda i: channels.index(str(i.channel)), default=None)
        states.append(CloudState(c.name, best.channel if best else None, best.id if best else None))
    return states


def plan_unit(pipeline: Pipeline, unit: Unit, shared: SharedCache | None, scan: _Clouds,
              tools: ToolVersions) -> UnitPlan:
    recipe = unit.load_recipe()
    if unit.image.paused:
        return UnitPlan(unit.name, recipe.name, True, None, None, None, (), (Reason("paused", "paused: true"),))
    keys = pl.stage_keys(recipe, tools=tools)
    rec = read_record(pipeline, unit, shared)
    reasons = _build_reasons(unit, recipe.digest, keys, tools, rec, shared)
    actions = ["run", "gate", "promote"] if reasons else []
    states = _cloud_states(pipeline, unit, rec.sha256 if rec else None, scan)
    if not reasons and rec is not None:
        channels = pipeline.spec.channels
        gate = next((s for s in states if s.cloud == pipeline.gate_cloud), None)
        if gate is not None and gate.error is None and (gate.channel is None or
                                                        channels.index(gate.channel) < 1):
            reasons.append(Reason("not-tested", f"{rec.sha256[:12]} is not {channels[1]} in {gate.cloud}"))
            actions += ["gate", "promote"]
        missing = [s.cloud for s in states if s.error is None and s.channel != channels[-1]]
        if missing:
            reasons.append(Reason("missing-in-cloud", f"{rec.sha256[:12]} is not {channels[-1]} in "
                                                      f"{', '.join(missing)}"))
            actions += [] if "promote" in actions else ["promote"]
    for s in states:
        if s.error is not None:
            reasons.append(Reason("cloud-unreachable", f"{s.cloud}: {s.error}"))
    if not actions and not any(r.code == "cloud-unreachable" for r in reasons):
        reasons.append(Reason("up-to-date", f"{rec.sha256[:12] if rec else '?'} built {rec.created if rec else '?'}, "
                                            f"{pipeline.spec.channels[-1]} in every cloud"))
    return UnitPlan(unit.name, recipe.name, False, keys.convert, rec.sha256 if rec else None,
                    rec.created if rec else None, tuple(actions), tuple(reasons), tuple(states))


def plan(pipeline: Pipeline, units: list[str] | None = None, *, clouds: bool = True) -> PlanResult:
    """The plan of every unit (or of ``units``); ``clouds=False`` skips the clouds."""
    shared = open_cache(pipeline)
    scan = _scan_clouds(pipeline) if clouds else _Clouds()
    chosen = [pipeline.unit(u) for u in units] if units else list(pipeline.units)
    tools = pl.tool_versions()
    plans = tuple(plan_unit(pipeline, u, shared, scan, tools) for u in chosen)
    work = tuple(p.unit for p in plans if p.actions)
    return PlanResult(pipeline.spec.name, plans, work, not work, tuple(shared.warnings) if shared else ())
