"""Recipes: YAML files that describe an image, loaded into frozen, validated models.

A recipe is found by name in the search path (``IMAGEKIT_RECIPE_PATH`` directories
first, then ``./recipes``, ``~/.config/imagekit/recipes`` and the shipped recipes:
``imagekit.paths.recipe_dirs``). ``extends: OTHER`` deep-merges the recipe
over OTHER (mappings merge key by key, lists are replaced; a key written
``customise+`` appends to the parent's list instead). Variables such as
``{release}`` or ``{date}`` are substituted in names, URLs and build environment
values. Validation is strict: every unknown key, wrong type, bad enum value and
missing field is reported at once, each with its path, e.g.
``customise[2].packages: expected a list``; a step's own checks (``imagekit.steps``)
run here too, so ``imagekit recipes validate`` finds a bad host name, duration or
package name before anything is built.

Host files named by customise steps (``upload`` ``src``, ``script`` ``file``,
``ssh-key`` ``key_file``) are relative to the folder of the recipe file that
declares the step, whatever the current directory: the loader passes that folder
to validation (pydantic validation context ``base_dir``), which resolves them to
absolute paths and checks that they exist and can be read. A step inherited
through ``extends`` keeps the folder of the parent file that declared it.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from imagekit import builders, confine, paths, recipe_errors, recipe_yaml
from imagekit.builders import Build
from imagekit.errors import RecipeError
from imagekit.specs import Source, StrictBool, StrictInt, format_size, parse_size  # noqa: F401 - re-exported
from imagekit.specs import SpecModel as _Model
from imagekit.steps import Step, anchor_host_paths, validation_context

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_VAR_RE = re.compile(r"\{([a-z][a-z0-9_]*)\}")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
MAX_EXTENDS_DEPTH = 10



# ---------------------------------------------------------------- the rest


class OsSpec(_Model):
    type: Literal["linux", "windows"]
    distro: str
    version: str
    arch: Literal["x86_64", "aarch64"] = "x86_64"


class Output(_Model):
    format: Literal["qcow2", "raw", "vmdk", "vhdx", "vpc"] = "qcow2"
    compat: Literal["0.10", "1.1"] = "1.1"
    # default: zlib for qcow2 (every QEMU reads it), none for the other formats
    compression: Literal["none", "zlib", "zstd"] = Field(default_factory=lambda data: "zlib" if data.get(
        "format", "qcow2") == "qcow2" else "none")
    cluster_size: str = "64K"
    name: str = "{name}"

    @field_validator("cluster_size")
    @classmethod
    def _cluster(cls, v: str) -> str:
        n = parse_size(v)
        if n < 512 or n > 2 << 20 or n & (n - 1):
            raise ValueError("cluster_size must be a power of two between 512 and 2M")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Output:
        if self.compression != "none" and self.format != "qcow2":
            raise ValueError(f"compression is only possible with format qcow2, not {self.format}")
        if self.compression == "zstd" and self.compat == "0.10":
            raise ValueError("zstd compression needs compat 1.1")
        return self


class Glance(_Model):
    name: str = "{name}"
    properties: dict[str, str] = Field(default_factory=dict)
    visibility: Literal["public", "private", "shared", "community"] = "private"
    tags: list[str] = Field(default_factory=list)
    keep: StrictInt = Field(default=3, ge=0)
    protected: StrictBool = False
    min_ram: StrictInt | None = Field(default=None, ge=0)


class Recipe(_Model):
    """A validated, fully resolved recipe."""

    name: str
    description: str
    os: OsSpec
    build: Build
    disk_size: str
    customise: list[Step] = Field(default_factory=list)
    output: Output = Field(default_factory=Output)
    glance: Glance = Field(default_factory=Glance)
    vars: dict[str, str] = Field(default_factory=dict)
    # Set by the loader, not by recipe authors:
    source: str | None = Field(default=None, exclude=True)
    digest: str | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("names use lower-case letters, digits, '.', '_' and '-'")
        return v

    @field_validator("disk_size")
    @classmethod
    def _disk(cls, v: str) -> str:
        parse_size(v)
        return v

    @model_validator(mode="after")
    def _build_method(self) -> Recipe:
        builders.get(self.build.method).check_recipe(self)  # what the method needs of the rest
        return self

    @property
    def disk_bytes(self) -> int:
        return parse_size(self.disk_size)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# ---------------------------------------------------------------- loading

META_KEYS = ("extends", "abstract")
_KNOWN_KEYS: set[str] = set()


def _collect_keys(model: type[BaseModel]) -> None:
    for name, f in model.model_fields.items():
        _KNOWN_KEYS.add(name)
        for arg in _walk_types(f.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg.__name__ not in _seen:
                _seen.add(arg.__name__)
                _collect_keys(arg)


_seen: set[str] = set()


def _walk_types(tp: Any) -> Iterable[Any]:
    yield tp
    for a in getattr(tp, "__args__", ()) or ():
        yield from _walk_types(a)
    for a in getattr(tp, "__metadata__", ()) or ():
        yield from _walk_types(a)
    origin = getattr(tp, "__origin__", None)
    if origin is not None and origin is not tp:
        yield from _walk_types(origin)


_collect_keys(Recipe)
_KNOWN_KEYS.update(META_KEYS)


def search_path() -> list[Path]:
    """Directories searched for recipes, first match wins."""
    return [d.path for d in paths.recipe_dirs()]


def _recipe_files() -> dict[str, tuple[Path, str]]:
    """name -> (file, origin of its folder: ``paths.SearchDir.origin``), first match wins."""
    found: dict[str, tuple[Path, str]] = {}
    for d in paths.recipe_dirs():
        if not d.path.is_dir():
            continue
        for f in sorted(d.path.glob("*.yaml")) + sorted(d.path.glob("*.yml")):
            found.setdefault(f.stem, (f, d.origin))
    return found


def _read_yaml(path: Path) -> dict[str, Any]:
    """The recipe file's mapping, read within imagekit.recipe_yaml's limits (size, aliases, depth)."""
    return recipe_yaml.read_mapping(path)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged onto ``base``: mappings recursively, lists replaced, ``key+`` appends."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(key, str) and key.endswith("+"):
            real = key[:-1]
            prev = out.get(real, [])
            if not isinstance(prev, list) or not isinstance(value, list):
                raise RecipeError(f"'{key}' appends to a list, but '{real}' or the new value is not a list")
            out[real] = prev + value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_raw(ref: str | Path, chain: tuple[str, ...] = (), near: Path | None = None,
                 files: list[tuple[Path, dict[str, Any]]] | None = None) -> tuple[dict[str, Any], Path]:
    """The merged raw mapping of ``ref`` and its ``extends`` chain; ``files`` collects each file's own mapping."""
    path = _locate(ref, near)
    key = str(path.resolve())
    if key in chain:
        names = " -> ".join(Path(c).stem for c in chain + (key,))
        raise RecipeError(f"recipe inheritance loops: {names}", "remove one of the extends: lines")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise RecipeError(f"recipe inheritance is deeper than {MAX_EXTENDS_DEPTH} levels at {path}")
    data = _read_yaml(path)
    if files is not None:
        files.append((path, data))
    parent = data.get("extends")
    if parent is None:
        return data, path
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected the name of another recipe")
    try:
        base, base_path = _resolve_raw(parent, chain + (key,), near=path.parent, files=files)
    except RecipeError as exc:
        if "does not exist" in exc.message or "no recipe named" in exc.message:
            raise RecipeError(f"{path}: extends '{parent}', {exc.message}", exc.hint) from exc
        raise
    base = _anchor_steps(base, base_path.parent)
    base = {k: v for k, v in base.items() if k not in ("abstract", "name")}
    merged = deep_merge(base, {k: v for k, v in data.items() if k != "extends"})
    return merged, path


def _anchor_steps(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` with the host paths of its steps made absolute against ``folder`` (the folder of
    the file that declared them), before a child recipe in another folder merges over it."""
    out = dict(data)
    for key in ("customise", "customise+"):
        if isinstance(out.get(key), list):
            out[key] = [anchor_host_paths(step, folder.resolve()) for step in out[key]]
    return out


def _locate(ref: str | Path, near: Path | None = None) -> Path:
    """A recipe file by path, or by name: next to the extending recipe first, then the search path."""
    p = Path(ref)
    if isinstance(ref, Path) or p.suffix in (".yaml", ".yml") or os.sep in str(ref):
        if near is not None and not p.is_absolute():
            p = near / p  # a path in ``extends`` is relative to the extending recipe's folder
        if not p.exists():
            raise RecipeError(f"recipe file {p} does not exist")
        return p
    if near is not None:
        for ext in (".yaml", ".yml"):
            if (near / f"{ref}{ext}").is_file():
                return near / f"{ref}{ext}"
    files = _recipe_files()
    if str(ref) in files:
        return files[str(ref)][0]
    close = difflib.get_close_matches(str(ref), list(files), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "list recipes with 'imagekit recipes list'"
    raise RecipeError(f"no recipe named '{ref}'", hint)


def builtin_vars(data: dict[str, Any], now: _dt.datetime | None = None) -> dict[str, str]:
    now = now or _dt.datetime.now(_dt.UTC)
    os_ = data.get("os") if isinstance(data.get("os"), dict) else {}
    assert isinstance(os_, dict)
    out = {
        "name": str(data.get("name", "")),
        "date": now.strftime("%Y%m%d"),
        "datetime": now.strftime("%Y%m%dT%H%M%SZ"),
        "distro": str(os_.get("distro", "")),
        "version": str(os_.get("version", "")),
        "arch": str(os_.get("arch", "x86_64")),
    }
    user = data.get("vars")
    if isinstance(user, dict):
        out.update({str(k): str(v) for k, v in user.items()})
    return out


# Where variables are substituted: names, URLs and build environment values.
_SUBST_PATHS = (("glance", "name"), ("output", "name"), ("build",))


def _substitute(data: dict[str, Any], variables: dict[str, str], problems: list[str]) -> dict[str, Any]:
    def sub(value: Any, where: str) -> Any:
        if isinstance(value, str):
            def repl(m: re.Match[str]) -> str:
                var = m.group(1)
                if var in variables:
                    return variables[var]
                problems.append(f"{where}: unknown variable {{{var}}} (known: {', '.join(sorted(variables))})")
                return m.group(0)

            return _VAR_RE.sub(repl, value)
        if isinstance(value, dict):
            return {k: sub(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    out = dict(data)
    for path in _SUBST_PATHS:
        node: Any = out
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            node[path[-1]] = sub(node[path[-1]], ".".join(path))
    return out


def _copy(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def validate_data(data: dict[str, Any], source: str = "<recipe>", now: _dt.datetime | None = None, *,
                  base_dir: str | os.PathLike[str] | None = None, confined: bool = False,
                  problems: list[str] | None = None) -> Recipe:
    """Validate a merged recipe mapping; raise RecipeError listing every problem.

    ``base_dir`` is the folder relative host paths of steps are resolved against (``load``
    passes the recipe file's folder; default: the current directory)."""
    raw_digest = hashlib.sha256(json.dumps(_copy(data), sort_keys=True).encode()).hexdigest()
    if data.get("abstract") is True:
        raise RecipeError(f"{source}: recipe is abstract (a base for others to extend), it cannot be used directly")
    body = {k: v for k, v in data.items() if k not in META_KEYS}
    problems = list(problems or [])
    variables = builtin_vars(body, now)
    body = _copy(body)
    for section in ("output", "glance"):  # name templates default to "{name}": substitute those too
        if isinstance(body.get(section, {}), dict):
            body.setdefault(section, {}).setdefault("name", "{name}")
    body = _substitute(body, variables, problems)
    os_type = body.get("os", {}).get("type") if isinstance(body.get("os"), dict) else None
    known_os = os_type in get_args(OsSpec.model_fields["type"].annotation)  # else os.type itself is reported
    context = validation_context(base_dir if base_dir is not None else Path.cwd(), os_type if known_os else None,
                                 confined)
    try:
        recipe = Recipe.model_validate(body, context=context)
    except ValidationError as exc:
        problems.extend(recipe_errors.problems(exc, body, "", _KNOWN_KEYS))
        recipe = None
    if confined and recipe is not None:
        problems.extend(confine.final_problems(recipe))
    if problems:
        n = len(problems)
        raise RecipeError(
            f"{source}: {n} problem{'s' if n != 1 else ''} in recipe",
            "fix the fields listed; 'imagekit recipes show NAME' prints a recipe as it is resolved",
            problems,
        )
    assert recipe is not None
    return recipe.model_copy(update={"source": source, "digest": raw_digest})


def load(ref: str | Path, now: _dt.datetime | None = None, *, confined: bool = False,
         variables: dict[str, str] | None = None) -> Recipe:
    """Load a recipe by name (search path) or by file path, resolving ``extends``.

    ``confined``: the recipe comes from an untrusted source; ``imagekit.confine``'s rules apply
    to every file of the chain that is not a shipped recipe (all problems reported at once).
    ``variables`` are set over the recipe's ``vars`` (a CI pipeline's matrix row)."""
    files: list[tuple[Path, dict[str, Any]]] = []
    data, path = _resolve_raw(ref, files=files)
    early: list[str] = []
    if confined:
        for file, raw in files:
            if not confine.is_trusted(file):
                early += confine.raw_problems(raw, file)
    if variables:
        data = deep_merge(data, {"vars": dict(variables)})
    return validate_data(data, str(path), now, base_dir=path.parent, confined=confined, problems=early)


@dataclass(frozen=True)
class ListedRecipe:
    """A recipe file in the search path: its name, file, the origin of its folder
    (``env``: ``IMAGEKIT_RECIPE_PATH``, ``./recipes``, ``user``, ``shipped``) and its raw data
    (``{}`` when the file cannot be read)."""

    name: str
    path: Path
    origin: str
    data: dict[str, Any]


def list_recipes() -> list[ListedRecipe]:
    """Every recipe in the search path, abstract ones included, by name."""
    out = []
    for name, (path, origin) in sorted(_recipe_files().items()):
        try:
            data = _read_yaml(path)
        except RecipeError:
            data = {}
        out.append(ListedRecipe(name, path, origin, data))
    return out
