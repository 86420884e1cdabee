"""``imagekit ci ...``: image pipelines over many clouds, one unit of work per command.

``validate``, ``plan``, ``run UNIT``, ``gate UNIT``, ``promote UNIT --to CHANNEL``,
``rotate``, ``status``, ``emit gitlab|github|zuul``. Every command reads the pipeline file
(``--pipeline``, else ``IMAGEKIT_PIPELINE``, else ``./imagekit-pipeline.yaml``);
``--events FILE`` appends JSON lines of what the command does (``imagekit.ci.events``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from imagekit.ci.results import (
    UnitInfo,
    ValidateResult,
)
from imagekit.cli.output import StatusLine, emit, err_console, json_option, out_console, result_type
from imagekit.cli.root import accel_choice, cli
from imagekit.errors import ImagekitError


class Drift(ImagekitError):
    """``ci status`` found a cloud that does not serve a unit's latest image."""

    code = "ci-drift"


def _pipeline_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--pipeline", "pipeline_file", envvar="IMAGEKIT_PIPELINE", type=click.Path(dir_okay=False),
                        default="imagekit-pipeline.yaml", show_default=True,
                        help="The pipeline file (or IMAGEKIT_PIPELINE).")(f)


def _events_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--events", "events_file", type=click.Path(dir_okay=False),
                        help="Append JSON lines of what happens to this file (for CI log viewers).")(f)


def _load(pipeline_file: str) -> Any:
    from imagekit.ci import model

    return model.load(pipeline_file)


@cli.group("ci")
def ci() -> None:
    """Image pipelines: plan, run one unit, gate, promote, rotate, status, and CI configuration."""


@ci.command("validate")
@result_type("imagekit.ci.results:ValidateResult", "ci validate")
@_pipeline_option
@json_option
def ci_validate(pipeline_file: str) -> None:
    """Check the pipeline file (and every unit's recipe); list the units."""
    p = _load(pipeline_file)
    res = ValidateResult(p.spec.name, str(p.path), tuple(UnitInfo(u.name, u.recipe_ref, u.variables, u.image.paused)
                                                         for u in p.units))

    def human() -> None:
        n = len(res.units)
        out_console.print(f"{p.path}: valid, {n} unit{'s' * (n != 1)}", markup=False)
        for u in res.units:
            out_console.print(f"  {u.unit:<30} {u.recipe}{'  (paused)' if u.paused else ''}", markup=False)

    emit(res, human)


@ci.command("plan")
@result_type("imagekit.ci.results:PlanResult", "ci plan")
@click.argument("units", nargs=-1)
@click.option("--no-clouds", is_flag=True, help="Do not look at the clouds (build reasons only).")
@_pipeline_option
@json_option
def ci_plan(units: tuple[str, ...], no_clouds: bool, pipeline_file: str) -> None:
    """What each unit needs (run, gate, promote) and why, or why nothing."""
    from imagekit.ci import plan as planmod

    p = _load(pipeline_file)
    with StatusLine() as status:
        status("plan", f"planning {len(units) or len(p.units)} units")
        res = planmod.plan(p, list(units) or None, clouds=not no_clouds)

    def human() -> None:
        for u in res.units:
            what = ", ".join(u.actions) if u.actions else "nothing to do"
            out_console.print(f"[bold]{u.unit}[/]: {what}", highlight=False)
            for r in u.reasons:
                out_console.print(f"    {r.code}: {r.detail}", markup=False, highlight=False)
        out_console.print("nothing to do" if res.nothing_to_do else f"work: {', '.join(res.work)}", markup=False)

    emit(res, human)


@ci.command("run")
@result_type("imagekit.ci.results:RunResult", "ci run")
@click.argument("unit")
@click.option("--fresh", is_flag=True, help="Build without the step caches (as rebuild.max_age does).")
@_events_option
@_pipeline_option
@json_option
def ci_run(unit: str, fresh: bool, events_file: str | None, pipeline_file: str) -> None:
    """Build UNIT through the (shared) step cache; write image, manifest, log, JUnit, provenance."""
    from imagekit import workdir
    from imagekit.ci.events import EventLog
    from imagekit.ci.runner import run_unit

    for reaped in workdir.reap_stale():
        err_console.print(f"removed a stale work folder: {reaped.summary()}", markup=False, highlight=False)
    p = _load(pipeline_file)
    with EventLog(events_file, unit) as events, StatusLine() as status:
        res = run_unit(p, unit, accel_choice(), events, fresh=fresh, say=status)

    def human() -> None:
        out_console.print(f"[green]built[/] {res.unit}: {res.image}", highlight=False)
        out_console.print(f"  sha256   {res.sha256}", highlight=False)
        for s in res.stages:
            out_console.print(f"  {s.name:<9} {s.source if s.cached else f'{s.seconds:.1f} s'}", markup=False)
        out_console.print(f"  junit    {res.junit}\n  provenance {len(res.provenance)} files"
                          f"{' (signed)' if res.signed else ''}", markup=False)
        for w in res.warnings:
            err_console.print(f"warning: {w}", markup=False)

    emit(res, human)


@ci.command("gate")
@result_type("imagekit.ci.results:GateResult", "ci gate")
@click.argument("unit")
@click.option("--artifacts", type=click.Path(file_okay=False), help="The run job's output folder for UNIT.")
@_events_option
@_pipeline_option
@json_option
def ci_gate(unit: str, artifacts: str | None, events_file: str | None, pipeline_file: str) -> None:
    """Upload UNIT's image as a candidate, boot-test it, move it to tested (or remove it)."""
    from imagekit.ci.events import EventLog
    from imagekit.ci.gate import gate

    p = _load(pipeline_file)
    with EventLog(events_file, unit) as events, StatusLine() as status:
        res = gate(p, unit, accel_choice(), events, artifacts=Path(artifacts) if artifacts else None, say=status)

    def human() -> None:
        how = "already tested" if res.already else f"booted in {res.boot_seconds} s"
        out_console.print(f"[green]passed[/] {res.unit} ({how}): image {res.image_id} is {res.channel} in "
                          f"{res.cloud}", highlight=False)

    emit(res, human)


@ci.command("promote")
@result_type("imagekit.ci.results:PromoteResult", "ci promote")
@click.argument("unit")
@click.option("--to", "channel", required=True, help="The channel (e.g. stable).")
@click.option("--cloud", "only", multiple=True, help="Only this cloud (repeatable).")
@click.option("--artifacts", type=click.Path(file_okay=False), help="The run job's output folder for UNIT.")
@click.option("--force", is_flag=True, help="Promote even if the image has not passed the gate.")
@_events_option
@_pipeline_option
@json_option
def ci_promote(unit: str, channel: str, only: tuple[str, ...], artifacts: str | None, force: bool,
               events_file: str | None, pipeline_file: str) -> None:
    """Put UNIT's image in CHANNEL of every cloud; re-running resumes where it stopped."""
    from imagekit.ci.events import EventLog
    from imagekit.ci.promote import PromoteIncomplete, promote

    p = _load(pipeline_file)
    with EventLog(events_file, unit) as events, StatusLine() as status:
        res = promote(p, unit, channel, events, artifacts=Path(artifacts) if artifacts else None,
                      only=list(only) or None, force=force, say=status)

    def human() -> None:
        for c in res.clouds:
            colour = "red" if c.state == "failed" else "green"
            out_console.print(f"[{colour}]{c.state:<8}[/] {c.cloud}: {c.image_id or c.error}", highlight=False)

    emit(res, human)
    if not res.complete:
        failed = [c.cloud for c in res.clouds if c.state == "failed"]
        raise PromoteIncomplete(f"{unit}: not promoted to {channel} in {', '.join(failed)}",
                                "run the same command again once the cloud answers: finished clouds are skipped")


@ci.command("rotate")
@result_type("imagekit.ci.results:RotateResult", "ci rotate")
@click.option("--dry-run", is_flag=True, help="Say what would be done.")
@click.option("--cloud", "only", multiple=True, help="Only this cloud (repeatable).")
@_events_option
@_pipeline_option
@json_option
def ci_rotate(dry_run: bool, only: tuple[str, ...], events_file: str | None, pipeline_file: str) -> None:
    """Apply each channel's retention to the pipeline's own images (protected ones never)."""
    from imagekit.ci.events import EventLog
    from imagekit.ci.rotate import rotate

    p = _load(pipeline_file)
    with EventLog(events_file) as events, StatusLine() as status:
        res = rotate(p, events, dry_run=dry_run, only=list(only) or None, say=status)

    def human() -> None:
        for r in res.rows:
            out_console.print(f"{r.action:<10} {r.cloud:<14} {r.unit:<20} {str(r.channel):<10} {r.id}  {r.reason}",
                              markup=False)
        acted = sum(1 for r in res.rows if r.action not in ("keep", "skip"))
        out_console.print(f"{'would change' if dry_run else 'changed'} {acted} images", markup=False)

    emit(res, human)
    if res.errors:
        raise ImagekitError("rotation failed in " + "; ".join(res.errors), "the other clouds were rotated")


@ci.command("status")
@result_type("imagekit.ci.results:StatusReport", "ci status")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Also write a static HTML page here.")
@_pipeline_option
@json_option
def ci_status(html_file: str | None, pipeline_file: str) -> None:
    """Which image each unit has in each cloud and channel; exit 1 on drift."""
    import os

    from imagekit.ci.status import render_html, status

    p = _load(pipeline_file)
    res = status(p)
    if html_file:
        target = Path(html_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_text(render_html(res), encoding="utf-8")
        os.replace(tmp, target)

    def human() -> None:
        for u in res.units:
            state = "; ".join(u.drift) or "in sync"
            out_console.print(f"{u.unit:<24} {(u.latest or '-')[:12]:<13} {state}", markup=False)
            for c in u.cells:
                if c.sha256:
                    out_console.print(f"    {c.cloud:<14} {c.channel:<10} {c.sha256[:12]} {c.age_days} d",
                                      markup=False)

    emit(res, human)
    if res.drift:
        raise Drift("drift: " + "; ".join(f"{u.unit}: {', '.join(u.drift)}" for u in res.units if u.drift)
                    + ("; " + "; ".join(res.errors) if res.errors else ""),
                    "'imagekit ci plan' says what to run; 'imagekit ci promote' fixes a cloud")


@ci.command("emit")
@result_type("imagekit.ci.results:Emitted", "ci emit")
@click.argument("system", type=click.Choice(["gitlab", "github", "zuul"]))
@click.option("--parent", is_flag=True, help="GitLab: the parent pipeline's jobs that make and trigger the child.")
@click.option("--matrix", is_flag=True, help="GitHub: only the matrix JSON (for fromJSON).")
@click.option("--all", "every", is_flag=True, help="Every unit, not only those with work (no planning).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Write the files here instead of stdout.")
@click.option("--command", "command", default="imagekit", show_default=True, help="How jobs call imagekit.")
@click.option("--setup", help="A command that installs imagekit in each job.")
@click.option("--runs-on", default="ubuntu-latest", show_default=True, help="GitHub: the runner label.")
@click.option("--tag", "tags", multiple=True, help="GitLab: a runner tag for every job (repeatable).")
@click.option("--to", "promote_to", help="The channel jobs promote to (default: the last).")
@_pipeline_option
@json_option
def ci_emit(system: str, parent: bool, matrix: bool, every: bool, output_dir: str | None, command: str,
            setup: str | None, runs_on: str, tags: tuple[str, ...], promote_to: str | None, pipeline_file: str) -> None:
    """The CI system's configuration: GitLab child pipeline, GitHub workflows or matrix, Zuul jobs."""
    import os

    from imagekit.ci import emit as em

    p = _load(pipeline_file)
    if os.path.isabs(pipeline_file):  # the jobs see the file relative to their checkout (the current folder here)
        rel = os.path.relpath(pipeline_file)
        pipeline_file = pipeline_file if rel.startswith("..") else rel
    opts = em.EmitOptions(command=command, pipeline_file=pipeline_file, promote_to=promote_to, setup=setup,
                          runs_on=runs_on, tags=tags)
    res = em.emit(p, system, opts, parent=parent, matrix=matrix, every=every)
    if output_dir:
        em.write(res, Path(output_dir))

    def human() -> None:
        if output_dir:
            for name in res.files:
                err_console.print(f"wrote {Path(output_dir) / name}", markup=False)
            return
        for name, text in res.files.items():
            if len(res.files) > 1:
                click.echo(f"# ---- {name}")
            click.echo(text, nl=not text.endswith("\n"))

    emit(res, human)
