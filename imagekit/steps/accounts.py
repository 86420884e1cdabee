"""Account steps: root-password, user, ssh-key.

Passwords are only ever given as crypt(3) hashes (``$6$...``, ``$y$...``), never in
plain text; the hashes are the steps' secrets (``secrets()``): they are written to
the guest's /etc/shadow and masked in every log line, message and output. SSH keys
are public keys, one line each; ``ssh-key`` can read its key from a host
``key_file`` (relative to the recipe's folder), checked when the recipe is loaded.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationInfo, model_validator

from imagekit.specs import StrictBool
from imagekit.steps.base import StepBase, StepContext, StepFailure, StepOutcome
from imagekit.steps.fields import (
    GroupName,
    GuestPath,
    HostPath,
    PasswordHash,
    SshPublicKey,
    UserName,
    check_crypt_hash,
    check_ssh_key,
    checks_host_files,
)

if TYPE_CHECKING:
    from typing import Self


def set_shadow(ctx: StepContext, user: str, hash_: str | None, lock: bool) -> None:
    """Set (or lock) ``user``'s password in /etc/shadow. Only the hash is stored; it is never logged."""
    s = ctx.session
    if not s.is_file("/etc/shadow"):
        raise StepFailure("the guest has no /etc/shadow")
    lines = s.read_text("/etc/shadow").splitlines()
    days = str(int(time.time() // 86400))
    for i, line in enumerate(lines):
        f = line.split(":")
        if f[0] != user or len(f) < 2:
            continue
        while len(f) < 9:
            f.append("")
        if hash_ is not None:
            f[1] = hash_
        if lock and not f[1].startswith("!"):
            f[1] = "!" + f[1]
        f[2] = days
        lines[i] = ":".join(f)
        break
    else:
        raise StepFailure(f"user '{user}' has no entry in the guest's /etc/shadow")
    s.write_text("/etc/shadow", "\n".join(lines) + "\n")


def install_keys(ctx: StepContext, user: str, keys: Sequence[str]) -> int:
    """Append SSH public keys to the user's ~/.ssh/authorized_keys (0700 dir, 0600 file, owned by the user)."""
    s, g = ctx.session, ctx.g
    acct = s.accounts().get(user)
    if acct is None:
        raise StepFailure(f"user '{user}' does not exist in the guest", "create it first with a 'user' step")
    ssh_dir = f"{acct.home.rstrip('/')}/.ssh"
    auth = f"{ssh_dir}/authorized_keys"
    if not s.is_dir(ssh_dir):
        g.mkdir_p(ssh_dir)
    g.chmod(0o700, ssh_dir)
    g.chown(acct.uid, acct.gid, ssh_dir)
    existing = s.read_text_or(auth)
    present = {ln.strip() for ln in existing.splitlines()}
    added = [k.strip() for k in keys if k.strip() not in present]
    if added:
        text = existing if not existing or existing.endswith("\n") else existing + "\n"
        s.write_text(auth, text + "".join(k + "\n" for k in added))
    elif not s.exists(auth):
        s.write_text(auth, "")
    g.chmod(0o600, auth)
    g.chown(acct.uid, acct.gid, auth)
    return len(added)


class RootPasswordStep(StepBase):
    """root-password: set root's password to a crypt(3) hash in /etc/shadow, or lock it.
    The hash is never logged or shown."""

    op: Literal["root-password"]
    hash: str | None = None
    locked: StrictBool = False

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.hash is None) == (not self.locked):
            raise ValueError("give a crypt(3) hash, or locked: true (plain-text passwords are not accepted)")
        if self.hash is not None:
            check_crypt_hash(self.hash)
        return self

    def secrets(self) -> tuple[str, ...]:
        return (self.hash,) if self.hash else ()

    def linux(self, ctx: StepContext) -> StepOutcome:
        set_shadow(ctx, "root", self.hash, self.locked)
        return StepOutcome("root password locked" if self.locked else "root password set (hash not shown)")


class UserStep(StepBase):
    """user: create a user (or update an existing one) with ``useradd``/``usermod`` in the guest: home
    directory, shell, supplementary groups (created when missing), an optional password hash
    (never logged), SSH authorized keys and, with ``sudo: true``, passwordless sudo through
    /etc/sudoers.d."""

    op: Literal["user"]
    name: UserName
    groups: list[GroupName] = Field(default_factory=list)
    shell: GuestPath = "/bin/bash"
    password_hash: PasswordHash | None = None
    ssh_keys: list[SshPublicKey] = Field(default_factory=list)
    sudo: StrictBool = False

    def secrets(self) -> tuple[str, ...]:
        return (self.password_hash,) if self.password_hash else ()

    def _account(self, ctx: StepContext) -> tuple[str, str]:
        """useradd/usermod (and groupadd for missing groups); the summary and the command's output."""
        s, q = ctx.session, shlex.quote
        have = s.groups()
        new_groups = [grp for grp in self.groups if grp not in have]
        parts = [f"groupadd {q(grp)}" for grp in new_groups]
        exists = self.name in s.accounts()
        parts.append(f"{'usermod' if exists else 'useradd -m'} -s {q(self.shell)} {q(self.name)}")
        if self.groups:
            parts.append(f"usermod -a -G {q(','.join(self.groups))} {q(self.name)}")
        out = ctx.sh(" && ".join(parts), 300, "useradd")
        said = ("updated" if exists else "created") + f" user {self.name} (shell {self.shell})"
        if self.groups:
            said += f"; groups {', '.join(self.groups)}" + (f" (created {', '.join(new_groups)})" if new_groups else "")
        return said, out

    def _sudo(self, ctx: StepContext) -> None:
        s = ctx.session
        if not s.exists("/etc/sudoers"):
            raise StepFailure("sudo: true, but sudo is not installed in the guest", "add an install step for sudo first")
        if not s.is_dir("/etc/sudoers.d"):
            s.g.mkdir_mode("/etc/sudoers.d", 0o750)
        path = f"/etc/sudoers.d/90-imagekit-{self.name}"
        s.write_text(path, f"{self.name} ALL=(ALL) NOPASSWD:ALL\n")
        s.g.chmod(0o440, path)
        s.g.chown(0, 0, path)

    def linux(self, ctx: StepContext) -> StepOutcome:
        summary, out = self._account(ctx)
        said = [summary]
        if self.password_hash is not None:
            set_shadow(ctx, self.name, self.password_hash, False)
            said.append("password set (hash not shown)")
        if self.ssh_keys:
            n = install_keys(ctx, self.name, self.ssh_keys)
            said.append(f"{n} SSH key(s) added")
        if self.sudo:
            self._sudo(ctx)
            said.append("passwordless sudo")
        return StepOutcome("; ".join(said), out)


class SshKeyStep(StepBase):
    """ssh-key: add an SSH public key (``key``, or ``key_file`` on the host) to a user's
    ~/.ssh/authorized_keys with mode 0700/0600 and the user's ownership."""

    op: Literal["ssh-key"]
    user: UserName = "root"
    key: SshPublicKey | None = None
    key_file: HostPath | None = None

    @model_validator(mode="after")
    def _one(self, info: ValidationInfo) -> Self:
        if (self.key is None) == (self.key_file is None):
            raise ValueError("give exactly one of key or key_file")
        if self.key_file is not None and checks_host_files(info):
            try:
                check_ssh_key(Path(self.key_file).read_text())
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"key_file {self.key_file} cannot be read: {exc}") from exc
            except ValueError as exc:
                raise ValueError(f"key_file {self.key_file}: {exc}") from exc
        return self

    def linux(self, ctx: StepContext) -> StepOutcome:
        key = self.key if self.key is not None else Path(self.key_file or "").read_text().strip()
        try:
            check_ssh_key(key)
        except ValueError as exc:
            raise StepFailure(f"key_file {self.key_file}: {exc}") from exc
        n = install_keys(ctx, self.user, [key])
        return StepOutcome(f"SSH key {'added for' if n else 'already present for'} {self.user}")


STEPS: tuple[type[StepBase], ...] = (RootPasswordStep, UserStep, SshKeyStep)
