"""The one secret scrubber: values that must never appear in logs, messages or outputs.

A :class:`Secrets` set holds secret *values* (passwords, tokens, password hashes,
application credential secrets). ``scrub(text)`` replaces every occurrence of
each value with ``****``, longest first (so a secret that contains another is
masked whole). Values shorter than ``MIN_LENGTH`` are ignored: masking ``"a"``
would destroy every message while protecting nothing.

Everything that carries secrets (a recipe step's password hash, a cloud's auth
section, a command line's arguments) hands them to a ``Secrets`` and every text
that leaves imagekit (log lines, error messages, tool output, JSON documents) goes
through ``scrub``.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MASK = "****"
MIN_LENGTH = 3
# Keys of a mapping (clouds.yaml auth sections, environments) whose values are secret.
SECRET_KEY_WORDS = ("password", "secret", "token", "credential", "passphrase", "private_key")


class Secrets:
    """A set of secret values and the scrubber over them."""

    def __init__(self, values: Iterable[str | None] = ()) -> None:
        self._values: set[str] = set()
        self.add(*values)

    def add(self, *values: str | None) -> Secrets:
        for v in values:
            if isinstance(v, str) and len(v) >= MIN_LENGTH:
                self._values.add(v)
        return self

    def add_mapping(self, mapping: Mapping[str, Any]) -> Secrets:
        """Add the values of keys that name secrets (``password``, ``token``, ...), recursively."""
        for key, value in mapping.items():
            if isinstance(value, Mapping):
                self.add_mapping(value)
            elif isinstance(value, str) and is_secret_key(str(key)):
                self.add(value)
        return self

    def merged(self, other: Secrets | Iterable[str]) -> Secrets:
        out = Secrets(self._values)
        out.add(*(other.values() if isinstance(other, Secrets) else other))
        return out

    def values(self) -> list[str]:
        return sorted(self._values, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def scrub(self, text: str) -> str:
        for v in self.values():
            if v in text:
                text = text.replace(v, MASK)
        return text

    def scrub_opt(self, text: str | None) -> str | None:
        return None if text is None else self.scrub(text)

    def scrub_argv(self, argv: Sequence[str]) -> str:
        """A command line as a shell would show it, with every secret masked."""
        return shlex.join(self.scrub(str(a)) for a in argv)

    def scrub_data(self, data: Any) -> Any:
        """A JSON-like structure with every string scrubbed (keys kept)."""
        if isinstance(data, str):
            return self.scrub(data)
        if isinstance(data, Mapping):
            return {k: self.scrub_data(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return [self.scrub_data(v) for v in data]
        return data


def is_secret_key(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in SECRET_KEY_WORDS)


def scrub(text: str, secrets: Secrets | Iterable[str]) -> str:
    """``text`` with every secret value masked (a convenience over :class:`Secrets`)."""
    s = secrets if isinstance(secrets, Secrets) else Secrets(secrets)
    return s.scrub(text)
