"""Builder ``dib``: drive diskimage-builder's ``disk-image-create`` for a recipe.

The recipe's elements and environment, imagekit's shipped elements on
``ELEMENTS_PATH`` (after ``IMAGEKIT_ELEMENTS_PATH``, whose elements override them), a raw output (imagekit's convert step writes the final
format). The build log is streamed to a file and to a phase callback. On a
kernel without device-mapper, partition mapping goes through
``imagekit.partloop`` (see there). Whatever happens (failure, Ctrl-C,
timeout, SIGTERM/SIGHUP), the build runs in an ``imagekit.workdir.WorkDir``: its
processes carry the folder's tag, and before returning they are ended, mounts
under the folder unmounted, loop devices on its files detached and the folder
removed. After a SIGKILL the next ``imagekit build`` does the same
(``workdir.reap_stale``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from imagekit import host, partloop, paths
from imagekit import run as runner
from imagekit.builders.base import BaseImage, BuildContext, BuildSpec, ToolVersions, recipe_inputs, tree_digest
from imagekit.errors import ImagekitError, ToolFailed, ToolNotFound
from imagekit.workdir import WorkDir, work_root

if TYPE_CHECKING:  # imagekit.recipe imports this module's model (through the builder registry)
    from imagekit.recipe import Recipe

log = logging.getLogger("imagekit.dib")

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
_PHASE_RE = re.compile(r"Running hooks from \S*/([a-z0-9-]+\.d)\b|^.*?Running install-packages|Build completed|"
                       r"Converting image using qemu-img|Image file .* created")


class DibError(ImagekitError):
    pass


@dataclass(frozen=True)
class DibResult:
    path: Path
    log_path: Path
    elements: tuple[str, ...]
    seconds: float
    partition_mapping: str  # "device-mapper" or "partloop"
    versions: dict[str, str] = field(default_factory=dict)


def disk_image_create() -> str:
    """The disk-image-create of imagekit's own environment (venv) or PATH."""
    cand = Path(sys.executable).parent / "disk-image-create"
    if cand.exists():
        return str(cand)
    found = shutil.which("disk-image-create")
    if not found:
        raise ToolNotFound("disk-image-create (diskimage-builder) was not found", "run 'make setup'")
    return found


def element_paths(extra: list[Path] | None = None) -> list[Path]:
    """``ELEMENTS_PATH``: ``extra``, ``IMAGEKIT_ELEMENTS_PATH``, then imagekit's shipped elements."""
    return paths.element_dirs(extra)


def _shim_dir(work: Path) -> Path:
    """kpartx/dmsetup stand-ins (and, as root, a sudo that keeps PATH) for kernels without device-mapper."""
    d = work / "shims"
    d.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    for tool in ("kpartx", "dmsetup"):
        f = d / tool
        f.write_text(f'#!/bin/sh\nexec "{py}" -m imagekit.partloop {tool} "$@"\n')
        f.chmod(0o755)
    sudo = d / "sudo"
    sudo.write_text(
        "#!/bin/sh\n"
        "# imagekit: already root; run the command with this PATH (sudo's secure_path would hide the\n"
        "# partition stand-ins next to this file).\n"
        "while [ $# -gt 0 ]; do\n"
        '  case "$1" in\n'
        "    -u|-g|-C|-D|-h|-p|-r|-t|-T|-U) shift 2 ;;\n"
        "    --) shift; break ;;\n"
        "    -*) shift ;;\n"
        "    *) break ;;\n"
        "  esac\n"
        "done\n"
        'exec "$@"\n'
    )
    sudo.chmod(0o755)
    return d


def build(recipe: Recipe, out: Path, *, workdir: Path | None = None, log_path: Path | None = None,
          phase: Callable[[str], None] | None = None, timeout: float = 3 * 3600,
          extra_elements: list[Path] | None = None) -> DibResult:
    """Build the recipe's DIB image as a raw disk at ``out`` (written under a temporary name)."""
    spec = recipe.build
    if not isinstance(spec, DibBuild):
        raise DibError(f"recipe {recipe.name} does not use the dib build method")
    dic = disk_image_create()
    runner.which("qemu-img")
    use_partloop = not host.has_device_mapper()
    if use_partloop and os.geteuid() != 0:
        raise DibError("this kernel has no device-mapper, and building without it needs root",
                       "run the build as root (loop devices are attached at partition offsets)")
    if not use_partloop or os.geteuid() != 0:
        runner.which("sudo", "install the 'sudo' package: diskimage-builder calls sudo even as root")
    wd = WorkDir("dib-", base=workdir or work_root())
    work = wd.path
    log_path = log_path or out.with_suffix(".dib.log")
    tmp_out = work / "image"
    env = {k: v for k, v in spec.env.items()}
    env["ELEMENTS_PATH"] = os.pathsep.join(str(p) for p in element_paths(extra_elements))
    env["TMP_DIR"] = str(work)
    env["DIB_SHOW_IMAGE_USAGE"] = "0"
    env["IMAGEKIT_RECIPE"] = recipe.name
    env.update(wd.env())  # every process of the build carries it: found and ended even after a SIGKILL
    env.setdefault("DIB_IMAGE_CACHE", str(Path.home() / ".cache" / "image-create"))
    path_dirs = [str(Path(sys.executable).parent)]
    if use_partloop:
        env[partloop.STATE_ENV] = str(work / "partloop")
        if os.geteuid() == 0:
            path_dirs.insert(0, str(_shim_dir(work)))
    env["PATH"] = os.pathsep.join(path_dirs + os.environ.get("PATH", "").split(os.pathsep))
    size = spec.image_size or recipe.disk_size
    size_gib = max(1.0, recipe.disk_bytes / (1 << 30)) if spec.image_size is None else None
    argv = [dic, "-a", ARCH[recipe.os.arch], "-t", "raw", "-o", str(tmp_out),
            "--image-size", f"{size_gib:g}" if size_gib is not None else str(size)]
    if spec.packages:
        argv += ["-p", ",".join(spec.packages)]
    argv += list(spec.elements)
    start = time.monotonic()
    log.info("diskimage-builder: elements %s, partition mapping %s", " ".join(spec.elements),
             "partloop (no device-mapper)" if use_partloop else "device-mapper")
    ok = False
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", errors="replace") as logf:
        def on_line(line: str) -> None:
            logf.write(line + "\n")
            m = _PHASE_RE.search(line)
            if m and phase is not None:
                phase(m.group(1) or m.group(0).strip()[:60])

        try:
            runner.run(argv, timeout=timeout, env=env, on_output=on_line, merge_stderr=True)
            produced = Path(str(tmp_out) + ".raw")
            if not produced.exists():
                raise DibError(f"disk-image-create finished but {produced.name} is missing", f"see {log_path}")
            tmp_final = out.with_name(f".{out.name}.part")
            shutil.move(str(produced), tmp_final)
            os.replace(tmp_final, out)
            ok = True
        except ToolFailed as exc:
            tail = "\n".join(exc.output.splitlines()[-25:])
            raise DibError(f"diskimage-builder failed (exit {exc.returncode}):\n{tail}",
                           f"the whole log is in {log_path}") from exc
        finally:
            report = wd.cleanup()
            if report.problems:
                log.warning("clean-up after diskimage-builder: %s", report.summary())
            if not ok:
                Path(out.with_name(f".{out.name}.part")).unlink(missing_ok=True)
    versions = {"diskimage-builder": _dib_version()}
    return DibResult(out, log_path, tuple(spec.elements), round(time.monotonic() - start, 1),
                     "partloop" if use_partloop else "device-mapper", versions)


def _dib_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("diskimage-builder")
    except Exception:  # noqa: BLE001 - version is informative only
        return "unknown"


# ---------------------------------------------------------------- the recipe model and the builder


class DibBuild(BuildSpec):
    method: Literal["dib"]
    elements: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    packages: list[str] = Field(default_factory=list)
    image_size: str | None = None

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not re.match(r"^[A-Z_][A-Z0-9_]*$", k)]
        if bad:
            raise ValueError(f"environment variable names must be UPPER_CASE: {', '.join(bad)}")
        return v


@dataclass(frozen=True)
class DibFacts:
    seconds: float
    partition_mapping: str  # "device-mapper" or "partloop"
    versions: dict[str, str]
    log: str  # the build log's file name, next to the image


class DibBuilder:
    """diskimage-builder as a build method: a raw image from the recipe's elements."""

    method = "dib"
    model = DibBuild
    facts = DibFacts

    def check_recipe(self, recipe: Recipe) -> None:
        return None

    def cache_inputs(self, recipe: Recipe, tools: ToolVersions) -> dict[str, Any]:
        return {**recipe_inputs(recipe),
                "elements": [tree_digest(p) for p in element_paths()],  # their content, not where they are
                "tools": {"diskimage-builder": tools.diskimage_builder, "qemu-img": tools.qemu_img}}

    def build(self, recipe: Recipe, out: Path, ctx: BuildContext) -> BaseImage[DibFacts]:
        spec = recipe.build
        if not isinstance(spec, DibBuild):
            raise DibError(f"recipe {recipe.name} does not use the dib build method")
        # dib.build() runs diskimage-builder in its own WorkDir and always cleans it up (mounts,
        # loop devices, processes); a folder left by a SIGKILL is found by workdir.reap_stale().
        ctx.add_rollback(lambda: out.unlink(missing_ok=True), f"remove the partial image {out}")
        ctx.phase(f"diskimage-builder: {' '.join(spec.elements)}")
        log_path = out.with_name("dib.log")
        res = build(recipe, out, log_path=log_path, phase=lambda p: ctx.phase(f"diskimage-builder {p}"))
        facts = DibFacts(res.seconds, res.partition_mapping, dict(res.versions), log_path.name)
        return BaseImage(path=out, format="raw", virtual_size=out.stat().st_size, facts=facts,
                         elements=tuple(spec.elements))
