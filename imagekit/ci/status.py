"""``imagekit ci status [--json|--html FILE]``: which image each unit has in each cloud and channel.

For every unit, cloud and channel: the newest usable image of the pipeline there (its
sha256, Glance ID, age in days, how many images the channel holds), and the unit's latest
build (its record's sha256). *Drift* is a cloud whose last channel does not hold the unit's
latest build (missing, or an older one), a unit never built, or a cloud that does not
answer; the command exits 1 when there is any. ``render_html`` makes a static page (inline
CSS, no script) that a CI job can publish as an artifact or on GitLab/GitHub Pages.
"""

from __future__ import annotations

import datetime as _dt
import html

from imagekit.ci import clouds as cl
from imagekit.ci.model import Pipeline
from imagekit.ci.results import Cell, StatusReport, UnitStatus
from imagekit.ci.shared import open_cache, read_record
from imagekit.errors import ImagekitError


def _age_days(created: str, now: _dt.datetime) -> float | None:
    try:
        t = _dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round((now - t).total_seconds() / 86400, 1)


def _unit_status(pipeline: Pipeline, unit: str, latest: str | None, built: str | None,
                 images: dict[str, list[cl.CloudImage]], errors: dict[str, str], now: _dt.datetime) -> UnitStatus:
    cells, drift = [], []
    last = pipeline.spec.channels[-1]
    if latest is None:
        drift.append("never built")
    for cloud in (c.name for c in pipeline.spec.clouds):
        if cloud in errors:
            drift.append(f"{cloud} does not answer")
            continue
        mine = [i for i in images.get(cloud, []) if i.unit == unit and i.usable and not i.hidden]
        for ch in pipeline.spec.channels:
            in_ch = [i for i in mine if i.channel == ch]
            newest = in_ch[0] if in_ch else None
            cells.append(Cell(cloud, ch, newest.sha256 if newest else None, newest.id if newest else None,
                              _age_days(newest.created_at, now) if newest else None, len(in_ch),
                              bool(newest and latest and newest.sha256 == latest)))
            if ch == last and latest is not None:
                if newest is None:
                    drift.append(f"not {last} in {cloud}")
                elif newest.sha256 != latest:
                    drift.append(f"{cloud} {last} has {str(newest.sha256)[:12]}, the latest is {latest[:12]}")
    return UnitStatus(unit, latest, built, tuple(cells), tuple(drift))


def status(pipeline: Pipeline) -> StatusReport:
    shared = open_cache(pipeline)
    images: dict[str, list[cl.CloudImage]] = {}
    errors: dict[str, str] = {}
    for c in pipeline.spec.clouds:
        try:
            images[c.name] = cl.owned(cl.open_cloud(c.name), pipeline.spec.name)
        except ImagekitError as exc:
            errors[c.name] = exc.message
    now = _dt.datetime.now(_dt.UTC)
    units = []
    for u in pipeline.units:
        rec = read_record(pipeline, u, shared)
        units.append(_unit_status(pipeline, u.name, rec.sha256 if rec else None, rec.created if rec else None,
                                  images, errors, now))
    return StatusReport(pipeline.spec.name, now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        tuple(c.name for c in pipeline.spec.clouds), tuple(pipeline.spec.channels), tuple(units),
                        tuple(f"{k}: {v}" for k, v in errors.items()),
                        bool(errors) or any(u.drift for u in units))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } .meta { color: #666; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border: 1px solid #bbb; padding: .35em .6em; text-align: left; vertical-align: top; }
thead th { background: #eef; } th.cloud { text-align: center; background: #dde; }
td.latest { background: #d8f5d0; } td.older { background: #ffe2b8; } td.empty { color: #999; }
td.drift { color: #a00; } td.ok { color: #060; }
code { font-size: .95em; } .age { color: #555; font-size: .85em; } tbody th, code { white-space: nowrap; }
"""


def render_html(report: StatusReport) -> str:
    """The report as a self-contained HTML page."""
    e = html.escape
    n = len(report.channels)
    head1 = "".join(f'<th class="cloud" colspan="{n}">{e(c)}</th>' for c in report.clouds)
    head2 = "".join(f"<th>{e(ch)}</th>" for _ in report.clouds for ch in report.channels)
    rows = []
    for u in report.units:
        cells = []
        by = {(c.cloud, c.channel): c for c in u.cells}
        for cloud in report.clouds:
            for ch in report.channels:
                c = by.get((cloud, ch))
                if c is None or c.sha256 is None:
                    cells.append('<td class="empty">-</td>')
                    continue
                age = f'<div class="age">{c.age_days} d, {c.count} image{"s" * (c.count != 1)}</div>'
                cells.append(f'<td class="{"latest" if c.latest else "older"}"><code>{e(c.sha256[:12])}</code>'
                             f"{age}</td>")
        drift = "<br>".join(e(d) for d in u.drift)
        rows.append(f"<tr><th>{e(u.unit)}</th><td><code>{e((u.latest or '-')[:12])}</code>"
                    f'<div class="age">{e(u.built or "")}</div></td>{"".join(cells)}'
                    f'<td class="{"drift" if u.drift else "ok"}">{drift or "in sync"}</td></tr>')
    errors = "".join(f'<p class="drift">{e(x)}</p>' for x in report.errors)
    verdict = "drift" if report.drift else "in sync"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>imagekit: {e(report.pipeline)}'
            f"</title><style>{_CSS}</style></head><body>\n<h1>Images of pipeline {e(report.pipeline)}: {verdict}</h1>"
            f'<p class="meta">generated {e(report.generated)}; clouds: {e(", ".join(report.clouds))}; channels: '
            f'{e(" -> ".join(report.channels))}</p>{errors}\n<table id="status"><thead><tr><th rowspan="2">unit</th>'
            f'<th rowspan="2">latest build</th>{head1}<th rowspan="2">drift</th></tr><tr>{head2}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>\n</body></html>\n")
