"""Where imagekit keeps things on the host: cache and state directories (XDG)."""

from __future__ import annotations

import os
from pathlib import Path


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


def project_root() -> Path | None:
    """The source checkout imagekit runs from, when it runs from one (has recipes/)."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "recipes").is_dir() else None
