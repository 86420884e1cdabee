"""File steps: write, append, upload, mkdir, chmod, chown, delete.

Guest paths are absolute; modes are octal strings (``'0644'``); owners are
``user``, ``user:group``, ``:group`` or numeric ids, names looked up in the guest's
own passwd/group when the step runs. ``upload`` reads one host file (``src``,
relative to the recipe's folder).

``write``, ``upload``, ``mkdir`` and ``delete`` also apply to Windows guests: paths are
on ``C:`` written the POSIX way (``/Windows/Temp/x.txt``) and matched case-insensitively;
``mode`` and ``owner`` do not exist there (NTFS has ACLs) and are refused.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import ValidationInfo, field_validator, model_validator

from imagekit.specs import StrictBool
from imagekit.steps.base import StepBase, StepContext, StepFailure, StepOutcome
from imagekit.steps.fields import OS_TYPE, GuestPath, HostPath, Mode, Owner, mode_bits

LINUX_AND_WINDOWS = frozenset({"linux", "windows"})
_NO_ATTRS = "mode and owner do not apply to Windows guests (NTFS permissions are ACLs)"


def _no_unix_attrs(step: Any, info: ValidationInfo) -> Any:
    """Refuse mode/owner in a Windows recipe (validation context ``os_type``)."""
    os_type = info.context.get(OS_TYPE) if isinstance(info.context, dict) else None
    if os_type == "windows" and (getattr(step, "mode", None) is not None or getattr(step, "owner", None) is not None):
        raise ValueError(_NO_ATTRS)
    return step


def _windows_path(ctx: StepContext, step: Any, path: str) -> str:
    """The real guest path on a Windows guest (mode/owner refused: steps built in code are not validated)."""
    from imagekit.steps.windows import real_path

    if getattr(step, "mode", None) is not None or getattr(step, "owner", None) is not None:
        raise StepFailure(_NO_ATTRS)
    return real_path(ctx, path)


def _attrs(ctx: StepContext, path: str, mode: str | None, owner: str | None) -> list[str]:
    """Apply ``mode`` and ``owner`` to a guest path; the words that say what was done."""
    out = []
    if mode is not None:
        ctx.g.chmod(mode_bits(mode), path)
        out.append(f"mode {mode}")
    if owner is not None:
        uid, gid = ctx.session.resolve_owner(owner)
        ctx.g.chown(uid, gid, path)
        out.append(f"owner {owner}")
    return out


def _with(extra: list[str]) -> str:
    return f" ({', '.join(extra)})" if extra else ""


def _parent(ctx: StepContext, path: str) -> None:
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if not ctx.session.is_dir(parent):
        ctx.g.mkdir_p(parent)


class WriteStep(StepBase):
    """write: create or replace a file with ``content`` (parent directories are created),
    then apply ``mode`` (octal) and ``owner`` (user[:group], names from the guest)."""

    OS_TYPES = LINUX_AND_WINDOWS

    op: Literal["write"]
    path: GuestPath
    content: str
    mode: Mode | None = None
    owner: Owner | None = None

    _windows_attrs = model_validator(mode="after")(_no_unix_attrs)

    def linux(self, ctx: StepContext) -> StepOutcome:
        _parent(ctx, self.path)
        data = self.content.encode()
        ctx.session.write_text(self.path, data)
        extra = _attrs(ctx, self.path, self.mode, self.owner)
        return StepOutcome(f"wrote {len(data)} bytes to {self.path}{_with(extra)}")

    def windows(self, ctx: StepContext) -> StepOutcome:
        path = _windows_path(ctx, self, self.path)
        _parent(ctx, path)
        data = self.content.encode()
        ctx.session.write_text(path, data)
        return StepOutcome(f"wrote {len(data)} bytes to {path}")


class AppendStep(StepBase):
    """append: add ``content`` to the end of a file as is (the file is created if missing)."""

    op: Literal["append"]
    path: GuestPath
    content: str

    def linux(self, ctx: StepContext) -> StepOutcome:
        _parent(ctx, self.path)
        data = self.content.encode()
        ctx.g.write_append(self.path, data)
        return StepOutcome(f"appended {len(data)} bytes to {self.path}")


class UploadStep(StepBase):
    """upload: copy a host file into the guest as ``dest`` or, when ``dest`` is a directory (or
    ends with ``/``), into it under its own name; then apply ``mode`` and ``owner``."""

    OS_TYPES = LINUX_AND_WINDOWS

    op: Literal["upload"]
    src: HostPath
    dest: GuestPath
    mode: Mode | None = None
    owner: Owner | None = None

    _windows_attrs = model_validator(mode="after")(_no_unix_attrs)

    def windows(self, ctx: StepContext) -> StepOutcome:
        return self._upload(ctx, _windows_path(ctx, self, self.dest) + ("/" if self.dest.endswith("/") else ""))

    def linux(self, ctx: StepContext) -> StepOutcome:
        return self._upload(ctx, self.dest)

    def _upload(self, ctx: StepContext, dest: str) -> StepOutcome:
        s = ctx.session
        if dest.endswith("/") and not s.is_dir(dest):
            ctx.g.mkdir_p(dest)
        if s.is_dir(dest):
            dest = f"{dest.rstrip('/')}/{os.path.basename(self.src)}"
        else:
            _parent(ctx, dest)
        size = os.path.getsize(self.src)
        ctx.g.upload(self.src, dest)
        extra = _attrs(ctx, dest, self.mode, self.owner)
        return StepOutcome(f"uploaded {self.src} ({size} bytes) to {dest}{_with(extra)}")


class MkdirStep(StepBase):
    """mkdir: create a directory and its parents, then apply ``mode`` and ``owner``."""

    OS_TYPES = LINUX_AND_WINDOWS

    op: Literal["mkdir"]
    path: GuestPath
    mode: Mode | None = None
    owner: Owner | None = None

    _windows_attrs = model_validator(mode="after")(_no_unix_attrs)

    def linux(self, ctx: StepContext) -> StepOutcome:
        ctx.g.mkdir_p(self.path)
        extra = _attrs(ctx, self.path, self.mode, self.owner)
        return StepOutcome(f"created {self.path}{_with(extra)}")

    def windows(self, ctx: StepContext) -> StepOutcome:
        path = _windows_path(ctx, self, self.path)
        ctx.g.mkdir_p(path)
        return StepOutcome(f"created {path}")


class ChmodStep(StepBase):
    """chmod: set the permission bits of a guest path (octal)."""

    op: Literal["chmod"]
    path: GuestPath
    mode: Mode

    def linux(self, ctx: StepContext) -> StepOutcome:
        if not ctx.session.exists(self.path):
            raise StepFailure(f"{self.path} does not exist in the guest")
        ctx.g.chmod(mode_bits(self.mode), self.path)
        return StepOutcome(f"{self.path}: mode {self.mode}")


class ChownStep(StepBase):
    """chown: set the owner of a guest path; names are looked up in the guest's passwd/group."""

    op: Literal["chown"]
    path: GuestPath
    owner: Owner

    def linux(self, ctx: StepContext) -> StepOutcome:
        if not ctx.session.exists(self.path):
            raise StepFailure(f"{self.path} does not exist in the guest")
        uid, gid = ctx.session.resolve_owner(self.owner)
        ctx.g.chown(uid, gid, self.path)
        return StepOutcome(f"{self.path}: owner {self.owner} ({uid}:{gid})")


class DeleteStep(StepBase):
    """delete: remove a file, a symlink or an empty directory (a whole tree with
    ``recursive: true``). Glob patterns are expanded in the guest; a missing path is not an error."""

    OS_TYPES = LINUX_AND_WINDOWS

    op: Literal["delete"]
    path: GuestPath
    recursive: StrictBool = False

    @field_validator("path")
    @classmethod
    def _not_root(cls, v: str) -> str:
        if v.rstrip("/") == "":
            raise ValueError("refusing to delete the guest's root directory")
        return v

    def windows(self, ctx: StepContext) -> StepOutcome:
        return self._delete(ctx, _windows_path(ctx, self, self.path))

    def linux(self, ctx: StepContext) -> StepOutcome:
        return self._delete(ctx, self.path)

    def _delete(self, ctx: StepContext, pattern: str) -> StepOutcome:
        s, g = ctx.session, ctx.g
        paths = list(g.glob_expand(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        removed = []
        for p in paths:
            if not s.exists(p) and not g.is_symlink(p):
                continue
            if self.recursive:
                g.rm_rf(p)
            elif g.is_dir(p, followsymlinks=False):
                if g.ls(p):
                    raise StepFailure(f"{p} is a directory that is not empty", "add recursive: true to delete a tree")
                g.rmdir(p)
            else:
                g.rm(p)
            removed.append(p)
        if not removed:
            return StepOutcome(f"{self.path}: nothing to delete")
        return StepOutcome(f"deleted {', '.join(removed)}")


STEPS: tuple[type[StepBase], ...] = (WriteStep, AppendStep, UploadStep, MkdirStep, ChmodStep, ChownStep, DeleteStep)
