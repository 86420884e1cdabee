"""Where imagekit keeps things on the host (cache, state and config directories, XDG) and where
it finds recipes and diskimage-builder elements.

Recipes are looked up in ``IMAGEKIT_RECIPE_PATH`` (``:``-separated), then ``./recipes``, then
``~/.config/imagekit/recipes`` (``$XDG_CONFIG_HOME``), then the shipped ones; the first file
with a name wins. The shipped recipes and elements are the checkout's top-level ``recipes/``
and ``elements/`` when imagekit runs from a checkout (an editable install, ``PYTHONPATH``),
else the copies a wheel carries in ``imagekit/shipped/`` (mapped there by ``setup.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


def cache_dir() -> Path:
    """``IMAGEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/imagekit``, else ``~/.cache/imagekit``."""
    env = os.environ.get("IMAGEKIT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "imagekit"


def state_dir() -> Path:
    """``IMAGEKIT_STATE_DIR``, else ``$XDG_STATE_HOME/imagekit``, else ``~/.local/state/imagekit``."""
    env = os.environ.get("IMAGEKIT_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "imagekit"


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/imagekit``, else ``~/.config/imagekit``."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "imagekit"


def project_root() -> Path | None:
    """The source checkout imagekit runs from, when it runs from one (pyproject.toml and recipes/
    next to the package; an installed package sits in site-packages, which has neither)."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() and (here / "recipes").is_dir() else None


def shipped_dir(kind: Literal["recipes", "elements"]) -> Path:
    """The shipped recipes or elements: the checkout's top-level folder, else the package's copy."""
    root = project_root()
    if root is not None:
        return root / kind
    return Path(__file__).resolve().parent / "shipped" / kind


@dataclass(frozen=True)
class SearchDir:
    """A folder of the recipe search path and where it comes from: ``env`` (``IMAGEKIT_RECIPE_PATH``),
    ``./recipes``, ``user`` (the config folder) or ``shipped``."""

    path: Path
    origin: str


def recipe_dirs() -> list[SearchDir]:
    """The recipe search path, first match wins. A folder reached twice counts once, where first seen,
    and the shipped folder is called ``shipped`` wherever it is reached (in a checkout, ``./recipes``
    is the shipped folder itself). Folders that do not exist are kept."""
    shipped = shipped_dir("recipes")
    dirs = [SearchDir(Path(p), "env")
            for p in os.environ.get("IMAGEKIT_RECIPE_PATH", "").split(os.pathsep) if p]
    dirs += [SearchDir(Path("recipes"), "./recipes"), SearchDir(config_dir() / "recipes", "user"),
             SearchDir(shipped, "shipped")]
    out: dict[Path, SearchDir] = {}
    for d in dirs:
        key = d.path.resolve()
        if key not in out:
            out[key] = SearchDir(d.path, "shipped") if key == shipped.resolve() else d
    return list(out.values())


def element_dirs(extra: list[Path] | None = None) -> list[Path]:
    """diskimage-builder's ``ELEMENTS_PATH`` (earlier folders override later ones): ``extra``, then
    ``IMAGEKIT_ELEMENTS_PATH``, then the shipped elements; each folder once (a missing one is kept, for
    diskimage-builder to name it)."""
    dirs = list(extra or []) + [Path(p) for p in os.environ.get("IMAGEKIT_ELEMENTS_PATH", "").split(os.pathsep) if p]
    dirs.append(shipped_dir("elements"))
    seen: set[Path] = set()
    out = []
    for d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out
