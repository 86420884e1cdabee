"""Confined mode: what a recipe from an untrusted source (a fork, a merge request) may not do.

``imagekit ... --confined`` (and ``confined: true`` in a pipeline file) loads recipes under
these rules, checked at validation time with the path of every offending field, before
anything runs (docs/trust-model.md explains why each exists):

- host files (``upload``, ``script``, ``ssh-key`` steps) only from inside the recipe's own
  folder, symbolic links resolved (checked by ``steps.fields.HostPath``);
- no diskimage-builder environment from the recipe except ``ALLOWED_DIB_ENV`` (the
  environment can point diskimage-builder at other elements, mirrors or hooks, which run as
  root on the host), and element names only (no paths);
- downloads only over https and pinned by ``sha256`` or ``sha512`` (no checksum file from
  the same server, no trust on first use);
- no visibility that makes an image public (``public``, ``community``).

Recipes shipped with imagekit are trusted: the rules apply to every file of an ``extends``
chain that is not a shipped recipe, and to the final, resolved recipe (URLs after variables
are substituted, the visibility that results).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagekit import paths

if TYPE_CHECKING:
    from imagekit.recipe import Recipe

ALLOWED_DIB_ENV = frozenset({"DIB_RELEASE", "DIB_CLOUD_INIT_DATASOURCES"})
PUBLIC_VISIBILITIES = frozenset({"public", "community"})
_ELEMENT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def trusted_dirs() -> list[Path]:
    """Folders whose recipes are trusted: the recipes shipped with imagekit."""
    root = paths.project_root()
    return [(root / "recipes").resolve()] if root is not None else []


def is_trusted(path: Path) -> bool:
    real = path.resolve()
    return any(real.parent == d for d in trusted_dirs())


def _sources(node: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """Every download (a mapping with a ``url``) under ``node``, with its path."""
    if isinstance(node, dict):
        found = [(where, node)] if "url" in node else []
        for k, v in node.items():
            found += _sources(v, f"{where}.{k}")
        return found
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in _sources(v, f"{where}[{i}]")]
    return []


def _source_problems(build: Any) -> list[str]:
    out = []
    for where, src in _sources(build, "build"):
        url = str(src.get("url", ""))
        if not url.startswith("https://"):
            out.append(f"{where}.url: '{url}' is not https (confined: downloads only over https)")
        if not (src.get("sha256") or src.get("sha512")):
            out.append(f"{where}: no pinned sha256 or sha512 (confined: a checksum file or trust on first use "
                       "is not enough)")
    return out


def _build_problems(build: Any) -> list[str]:
    if not isinstance(build, dict):
        return []
    out = _source_problems(build)
    env = build.get("env")
    if isinstance(env, dict):
        out += [f"build.env.{k}: not allowed (confined: the diskimage-builder environment can name other "
                f"elements, mirrors and hooks that run as root; allowed: {', '.join(sorted(ALLOWED_DIB_ENV))})"
                for k in env if k not in ALLOWED_DIB_ENV]
    elements = build.get("elements")
    if isinstance(elements, list):
        out += [f"build.elements[{i}]: '{e}' is not an element name (confined: no paths)"
                for i, e in enumerate(elements) if not (isinstance(e, str) and _ELEMENT_RE.match(e))]
    return out


def raw_problems(data: dict[str, Any], path: Path) -> list[str]:
    """What one untrusted recipe file asks for that confined mode refuses (field paths)."""
    out = _build_problems(data.get("build"))
    glance = data.get("glance")
    if isinstance(glance, dict) and glance.get("visibility") in PUBLIC_VISIBILITIES:
        out.append(f"glance.visibility: '{glance['visibility']}' (confined: images from untrusted recipes are "
                   "never made public)")
    parent = data.get("extends")
    if isinstance(parent, str) and ("/" in parent or parent.endswith((".yaml", ".yml"))):
        target = (path.parent / parent).resolve()
        if path.parent.resolve() not in target.parents:
            out.append(f"extends: '{parent}' is outside the recipe's folder (confined)")
    return [f"{path.name}: {p}" for p in out]


def final_problems(recipe: Recipe) -> list[str]:
    """What the resolved recipe does that confined mode refuses (after variables and extends)."""
    out = [p for p in _source_problems(recipe.build.model_dump(mode="json")) if "is not https" in p]
    if recipe.glance.visibility in PUBLIC_VISIBILITIES:
        out.append(f"glance.visibility: '{recipe.glance.visibility}' (confined: never public)")
    return out


def check_cli_publish(visibility: str | None, properties: dict[str, str]) -> list[str]:
    """Command-line choices confined mode refuses for an upload: a public visibility, and any
    ``--property`` (properties come from the reviewed recipe only)."""
    out = []
    if visibility in PUBLIC_VISIBILITIES:
        out.append(f"--visibility {visibility}: confined uploads are never public")
    out += [f"--property {k}: confined uploads take their properties from the recipe only" for k in properties]
    return out
