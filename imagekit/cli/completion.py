"""Shell completion (click's): recipe names for the options and arguments that take a recipe.

The shell asks ``imagekit`` itself: ``_IMAGEKIT_COMPLETE=bash_source imagekit`` (or
``zsh_source``, ``fish_source``) prints the script to load once (README: Shell completion);
then every TAB runs imagekit with ``_IMAGEKIT_COMPLETE=bash_complete`` and the words so far.
Commands, options and choices complete through click; :func:`complete_recipe` adds the
recipes of the search path, and falls back to file names for what looks like a path.
"""

from __future__ import annotations

import os

import click
from click.shell_completion import CompletionItem


def complete_recipe(_ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The concrete recipes whose name starts with ``incomplete``; file names for a path."""
    if os.sep in incomplete or incomplete.startswith((".", "~")) or incomplete.endswith((".yaml", ".yml")):
        return [CompletionItem(incomplete, type="file")]
    from imagekit import recipe as rec

    return [CompletionItem(r.name, help=str(r.data.get("description") or "")) for r in rec.list_recipes()
            if r.name.startswith(incomplete) and not r.data.get("abstract")]
