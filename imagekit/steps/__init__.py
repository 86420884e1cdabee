"""Customise steps: the registry, the ``Step`` type, and what the rest of imagekit asks of steps.

A step is one class (a :class:`~imagekit.steps.base.StepBase` subclass) in a family
module; each family module lists its classes in ``STEPS``, and :data:`FAMILIES`
lists the family modules. From them:

* :data:`REGISTRY` (``op`` -> class) and :data:`STEP_OPS`;
* :data:`Step`, the discriminated union (on ``op``) a recipe's ``customise:`` list
  holds;
* :func:`parse_step_texts` validates ``--step`` texts (JSON or YAML mappings) with
  the current directory (or any folder) as the base of relative host paths and
  raises one ``RecipeError`` listing every problem;
* :func:`host_file_digests` (absolute path -> sha256 of every host file the steps
  read: the customise cache key) and :func:`secrets_of` (the ``Secrets`` of the steps);
* :func:`anchor_host_paths`, which the recipe loader applies to the steps a recipe
  inherits through ``extends`` (their files are relative to the parent's folder).

**To add a step:** add its class to a family module and to that module's ``STEPS``
(or add a family module and list it in :data:`FAMILIES`), plus its tests.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from imagekit import recipe_errors
from imagekit.errors import RecipeError
from imagekit.secrets import Secrets
from imagekit.steps import accounts, commands, disk, files, packages, system, windows
from imagekit.steps.base import HostFileError, StepBase, StepContext, StepFailure, StepOutcome
from imagekit.steps.fields import BASE_DIR, OS_TYPE, HostPath, validation_context

__all__ = [
    "BASE_DIR", "FAMILIES", "OS_TYPE", "REGISTRY", "STEP_CLASSES", "STEP_OPS", "HostFileError", "HostPath", "Step",
    "StepBase", "StepContext", "StepFailure", "StepOutcome", "anchor_host_paths", "host_file_digests",
    "parse_step_texts", "secrets_of", "step_keys", "validation_context",
]

FAMILIES = (files, commands, packages, accounts, system, disk, windows)
STEP_CLASSES: tuple[type[StepBase], ...] = tuple(cls for family in FAMILIES for cls in family.STEPS)
REGISTRY: dict[str, type[StepBase]] = {cls.op_name(): cls for cls in STEP_CLASSES}
STEP_OPS = tuple(REGISTRY)

if TYPE_CHECKING:
    Step = StepBase
else:
    Step = Annotated[Union[STEP_CLASSES], Field(discriminator="op")]  # noqa: UP007 - built from the registry


@functools.cache
def _adapter() -> TypeAdapter[Any]:
    return TypeAdapter(Step)


@functools.cache
def step_keys() -> frozenset[str]:
    """Every key any step accepts (for "did you mean" hints)."""
    return frozenset(name for cls in STEP_CLASSES for name in cls.model_fields)


def parse_step_texts(texts: Sequence[str], base_dir: str | os.PathLike[str], first_index: int = 0) -> list[Step]:
    """Steps from JSON or YAML mapping texts (the CLI's ``--step``), validated like a recipe's
    steps with relative host paths taken from ``base_dir`` (the CLI passes the current directory).

    Problems are named ``step[N]...``, counting from ``first_index`` (the steps that come
    before, e.g. a recipe's). Raises RecipeError listing every problem of every text.
    """
    adapter = _adapter()
    context = validation_context(base_dir)
    steps: list[Step] = []
    problems: list[str] = []
    for n, text in enumerate(texts):
        where = f"step[{first_index + n}]"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problems.append(f"{where}: not valid JSON or YAML: {getattr(exc, 'problem', None) or exc}")
            continue
        if not isinstance(data, dict):
            problems.append(f"{where}: expected a mapping such as '{{op: hostname, hostname: web01}}'")
            continue
        try:
            steps.append(adapter.validate_python(data, context=context))
        except ValidationError as exc:
            problems.extend(recipe_errors.problems(exc, data, where, step_keys()))
    if problems:
        n = len(problems)
        raise RecipeError(f"--step: {n} problem{'s' if n != 1 else ''}",
                          "each --step is one customise step, e.g. --step '{op: hostname, hostname: web01}'",
                          problems)
    return steps


def anchor_host_paths(raw: Any, base_dir: str | os.PathLike[str]) -> Any:
    """A raw step mapping with its relative host paths made absolute against ``base_dir``;
    anything that is not a mapping of a known step is returned as it is (validation reports it)."""
    if isinstance(raw, dict) and isinstance(raw.get("op"), str) and raw["op"] in REGISTRY:
        return REGISTRY[raw["op"]].anchor_host_paths(raw, base_dir)
    return raw


def host_file_digests(steps: Iterable[StepBase]) -> dict[str, str]:
    """Absolute path -> sha256 of every host file the steps read (for the customise cache key).

    Raises HostFileError when one cannot be read (it was checked when the recipe was loaded,
    so it changed since)."""
    out: dict[str, str] = {}
    for step in steps:
        for path in step.host_files():
            key = str(path)
            if key in out:
                continue
            try:
                with open(path, "rb") as f:
                    out[key] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as exc:
                raise HostFileError(f"host file {path} cannot be read: {exc.strerror or exc}",
                                    f"step '{step.op}' reads it; it was readable when the recipe was loaded") from exc
    return out


def secrets_of(steps: Iterable[StepBase]) -> Secrets:
    """The secrets the steps carry (password hashes...), to mask in every text that leaves imagekit."""
    return Secrets(v for step in steps for v in step.secrets())
