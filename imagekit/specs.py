"""Shared pieces of the recipe models: the strict model base, sizes, durations and downloads.

Recipes (``imagekit.recipe``), customise steps (``imagekit.steps``) and build methods
(``imagekit.builders``) all declare their part of a recipe as pydantic models built on
:class:`SpecModel` (unknown keys refused, frozen). This module imports nothing else of
imagekit, so every kind of unit can use it without import cycles.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Strict, field_validator, model_validator

_HEX_RE = re.compile(r"^[0-9a-f]+$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]


def parse_size(value: object) -> int:
    """Bytes from ``10G``, ``512M``, ``64K``, ``10GiB`` or a plain integer (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10G")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("size must be positive")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as 10G")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a size (examples: 10G, 512M, 64K)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}[m.group(2).lower()]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ValueError("size must be positive")
    return n


def format_size(n: int) -> str:
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``2h`` or ``1h30m``."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip().lower()
    if not s:
        raise ValueError("empty duration")
    try:
        return float(s)
    except ValueError:
        pass
    total, num = 0.0, ""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    for ch in s:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
        elif ch != " ":
            raise ValueError(f"'{text}' is not a duration (examples: 90s, 30m, 2h)")
    if num:
        raise ValueError(f"'{text}' is not a duration: '{num}' has no unit (s, m, h)")
    return total


class SpecModel(BaseModel):
    """The base of every recipe model: unknown keys are refused, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True, populate_by_name=True)


_Model = SpecModel  # the name recipe.py used


# ---------------------------------------------------------------- sources


class Source(SpecModel):
    """A file to download: a pinned digest, an upstream checksum file, or trust on first use."""

    url: str
    sha256: str | None = None
    sha512: str | None = None
    checksum_url: str | None = None
    trust: Literal["pinned", "first-use"] = "pinned"

    @field_validator("url", "checksum_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(https?|file)://", v):
            raise ValueError(f"'{v}' is not an http(s):// or file:// URL")
        return v

    @field_validator("sha256", "sha512")
    @classmethod
    def _hex(cls, v: str | None, info: Any) -> str | None:
        if v is None:
            return v
        v = v.lower()
        want = 64 if info.field_name == "sha256" else 128
        if len(v) != want or not _HEX_RE.match(v):
            raise ValueError(f"expected {want} hexadecimal digits")
        return v

    @model_validator(mode="after")
    def _verifiable(self) -> Source:
        pins = [x for x in (self.sha256, self.sha512, self.checksum_url) if x]
        if self.trust == "pinned" and not pins:
            raise ValueError(
                "no way to verify the download: give sha256, sha512 or checksum_url "
                "(or trust: first-use to record the digest of the first download)"
            )
        return self
