"""``imagekit recipes list|show|validate|new``."""

from __future__ import annotations

from typing import Any

import click

from imagekit.cli.completion import complete_recipe
from imagekit.cli.output import (
    emit,
    json_option,
    out_console,
    result_type,
)
from imagekit.cli.root import cli
from imagekit.errors import RecipeError, UsageError


@cli.group()
def recipes() -> None:
    """List, show and validate recipes."""


@recipes.command("list")
@result_type("imagekit.cli.results:RecipeList", "recipes list")
@json_option
def recipes_list() -> None:
    """List the recipes in the search path and where each comes from.

    The search path: IMAGEKIT_RECIPE_PATH (env), ./recipes, ~/.config/imagekit/recipes (user),
    then the recipes imagekit ships (shipped); the first file with a name wins.
    """
    from imagekit import recipe as rec

    rows = []
    for listed in rec.list_recipes():
        data = listed.data
        row: dict[str, Any] = {"name": listed.name, "description": data.get("description"), "method": None,
                               "abstract": bool(data.get("abstract")), "extends": data.get("extends"),
                               "path": str(listed.path), "origin": listed.origin, "valid": None}
        if not row["abstract"]:
            try:
                r = rec.load(listed.path)
                row.update(description=r.description, method=r.build.method, valid=True,
                           os=f"{r.os.distro} {r.os.version} {r.os.arch}")
            except RecipeError as exc:
                row.update(valid=False, error=exc.message)
        rows.append(row)

    def human() -> None:
        for r in rows:
            if r["abstract"]:
                continue
            state = "" if r["valid"] else "  (invalid: run 'imagekit recipes validate')"
            out_console.print(f"{r['name']:<22} {r['method'] or '?':<12} {r['origin']:<10} {r['description'] or ''}"
                              f"{state}", markup=False)

    emit({"recipes": rows}, human)


@recipes.command("show")
@result_type("imagekit.cli.results:RecipeShow", "recipes show")
@click.argument("name", shell_complete=complete_recipe)
@click.option("--confined", is_flag=True, help="The recipe comes from an untrusted source: refuse host files outside its folder, DIB environment, unpinned or non-https downloads, public images (docs/trust-model.md).")
@json_option
def recipes_show(name: str, confined: bool) -> None:
    """Print the resolved recipe NAME (a name or a path), YAML or --json."""
    from imagekit import recipe as rec

    r = rec.load(name, confined=confined)
    data = {"name": r.name, "source": r.source, "digest": r.digest, **r.to_dict()}

    def human() -> None:
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)

    emit(data, human)


@recipes.command("validate")
@result_type("imagekit.cli.results:ValidateResult", "recipes validate")
@click.argument("refs", nargs=-1, shell_complete=complete_recipe)
@click.option("--confined", is_flag=True, help="The recipe comes from an untrusted source: refuse host files outside its folder, DIB environment, unpinned or non-https downloads, public images (docs/trust-model.md).")
@json_option
def recipes_validate(refs: tuple[str, ...], confined: bool) -> None:
    """Validate recipes (names or paths); all concrete recipes when none are given."""
    from imagekit import recipe as rec

    targets: list[str] = list(refs) or [r.name for r in rec.list_recipes() if not r.data.get("abstract")]
    if not targets:
        raise UsageError("no recipes found", "add YAML files to recipes/ or set IMAGEKIT_RECIPE_PATH")
    results: list[dict[str, Any]] = []
    for ref in targets:
        try:
            r = rec.load(ref, confined=confined)
            results.append({"recipe": ref, "ok": True, "name": r.name, "source": r.source, "problems": []})
        except RecipeError as exc:
            problems = exc.problems or [exc.message]
            results.append({"recipe": ref, "ok": False, "error": exc.message, "problems": problems, "hint": exc.hint})
    bad = [r for r in results if not r["ok"]]

    def human() -> None:
        for r in results:
            if r["ok"]:
                out_console.print(f"ok      {r['recipe']}", markup=False)
            else:
                out_console.print(f"invalid {r['recipe']}: {r['error']}", markup=False)
                for p in r["problems"]:
                    if p != r["error"]:
                        out_console.print(f"  - {p}", markup=False)

    emit({"ok": not bad, "results": results}, human)
    if bad:
        n = len(bad)
        raise RecipeError(f"{n} of {len(results)} recipe{'s' if len(results) != 1 else ''} invalid",
                          "fix the problems listed above")


@recipes.command("new")
@result_type("imagekit.recipe_new:NewRecipe", "recipes new")
@click.argument("name")
@click.option("--from", "start", required=True, metavar="RECIPE", shell_complete=complete_recipe,
              help="The recipe to start from (a name from 'imagekit recipes list').")
@click.option("--dir", "folder", type=click.Path(file_okay=False), default="recipes", show_default=True,
              help="Where to write NAME.yaml (./recipes is in the search path).")
@json_option
def recipes_new(name: str, start: str, folder: str) -> None:
    """Write a starting recipe NAME.yaml that extends RECIPE (never overwrites a file)."""
    from pathlib import Path

    from imagekit.recipe_new import new_recipe

    made = new_recipe(name, start, Path(folder))

    def human() -> None:
        out_console.print(f"wrote {made.path} (extends {made.extends}, {made.extends_origin})", markup=False)
        ref = made.name if made.found_by_name else str(made.path)
        out_console.print(f"next: edit it, then 'imagekit recipes show {ref}' and 'imagekit build {ref}'", markup=False)

    emit(made, human)
