"""``imagekit recipes new NAME --from RECIPE``: a starting recipe that extends another one.

The new file says ``extends: RECIPE`` and its own ``name``, with the usual changes as
comments, so it builds at once and follows the recipe it starts from (``imagekit recipes
show NAME`` prints the merged result). It is written into a folder of the search path
(``./recipes`` by default) under a temporary name, validated, then linked into place: an
existing file is never overwritten, and a name that another recipe of the search path
already has is refused (the new file would hide it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from imagekit import recipe as rec
from imagekit.errors import OutputExistsError, RecipeError, UsageError

_COMMENTED = """\
# Common changes (uncomment and edit):
# disk_size: 20G
# customise+:            # '+' appends to {start}'s steps; 'customise:' would replace them
#   - op: install
#     packages: [htop]
#   - op: timezone
#     timezone: Europe/Paris
# glance:
#   properties: {{hw_disk_bus: virtio}}
#   tags: [imagekit, {name}]
"""


@dataclass(frozen=True)
class NewRecipe:
    """What ``recipes new`` wrote: the recipe's name and file, whether the search path finds it by
    name (else it is used by its path), and the recipe it extends (its file and the origin of that
    file's folder in the search path)."""

    name: str
    path: Path
    found_by_name: bool
    extends: str
    extends_path: Path
    extends_origin: str


def render(name: str, start: rec.ListedRecipe) -> str:
    """The text of a recipe NAME that extends ``start``."""
    header = (f"# {name}: starts from the recipe {start.name} ({start.origin}: {start.path}).\n"
              f"# Whatever {start.name} sets applies; a key set here replaces it (mappings merge key by key,\n"
              f"# lists are replaced). 'imagekit recipes show {name}' prints the result, 'imagekit recipes\n"
              f"# validate {name}' checks it, 'imagekit build {name}' builds it.\n")
    body = yaml.safe_dump({"extends": start.name, "name": name,
                           "description": f"{name}, from {start.name}"}, sort_keys=False)
    return header + body + _COMMENTED.format(start=start.name, name=name)


def new_recipe(name: str, start: str, folder: Path) -> NewRecipe:
    """Write ``folder/NAME.yaml`` extending the recipe ``start``; refuse to overwrite or to hide."""
    if not rec._NAME_RE.match(name):
        raise UsageError(f"'{name}' is not a recipe name", "names use lower-case letters, digits, '.', '_' and '-'")
    listed = {r.name: r for r in rec.list_recipes()}
    source = listed.get(start)
    if source is None:
        rec.load(start)  # raises "no recipe named ..." with its did-you-mean hint
        raise UsageError(f"'{start}' is a file; --from takes the name of a recipe in the search path",
                         "list them with 'imagekit recipes list'")
    if source.data.get("abstract"):
        raise UsageError(f"'{start}' is abstract (a base for other recipes, not buildable)",
                         "start from a concrete recipe: 'imagekit recipes list'")
    target = folder / f"{name}.yaml"
    if target.exists() or (folder / f"{name}.yml").exists():
        raise OutputExistsError(f"{target} already exists; it was not changed", "choose another name or remove it")
    if name in listed:
        raise UsageError(f"a recipe named '{name}' already exists ({listed[name].origin}: {listed[name].path})",
                         "choose another name: a recipe of the same name earlier in the search path hides the other")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.new-{os.getpid()}.yaml"
    try:
        tmp.write_text(render(name, source), encoding="utf-8")
        try:
            rec.load(tmp)
        except RecipeError as exc:
            raise RecipeError(f"a recipe extending '{start}' does not validate: {exc.message}",
                              f"fix '{start}' first: imagekit recipes validate {start}", exc.problems) from exc
        try:
            os.link(tmp, target)  # fails if the name appeared meanwhile: never overwrites
        except FileExistsError as exc:
            raise OutputExistsError(f"{target} already exists; it was not changed", "choose another name") from exc
    finally:
        tmp.unlink(missing_ok=True)
    found = any(r.name == name and r.path.resolve() == target.resolve() for r in rec.list_recipes())
    return NewRecipe(name, target, found, source.name, source.path, source.origin)
