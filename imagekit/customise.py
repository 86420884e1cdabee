"""Offline customisation: apply a recipe's ``customise:`` steps to a disk image.

``customise(image, steps, output=...)`` never touches its input unless asked
(``in_place=True``). It creates a qcow2 copy-on-write overlay over the input
(``qemu-img create -f qcow2 -F FMT -b INPUT``), opens ONE libguestfs session on
the overlay, applies every step in order, and then:

* with ``output``: converts the overlay into ``output`` (written under a
  temporary name in the same directory and renamed when complete; the
  conversion drops the blocks a ``sparsify`` step trimmed);
* with ``in_place``: commits the overlay into the input (``qemu-img commit``).

The overlay is always deleted. When a step fails the run stops with a
:class:`CustomiseError` that names the step (its 0-based index in the list, as
in the recipe), the command it ran and the command's output; the input is
untouched and no output is left behind.

Each step is logged as a :class:`StepResult` (through the ``log`` callback and
the ``imagekit.customise`` logger). Password hashes are never logged: they are
scrubbed from every summary, output and error.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagekit import recipe as rec
from imagekit.errors import ImagekitError, OutputExistsError, UnsafeImageError, UsageError
from imagekit.guest import GuestError, GuestSession, open_image, parse_duration
from imagekit.run import run

log = logging.getLogger("imagekit.customise")

QEMU_IMG_TIMEOUT = 3 * 3600
OUTPUT_TAIL = 30
MASK = "****"
OUTPUT_FORMATS = ("qcow2", "raw")
NETWORK_OPS = frozenset({"install", "uninstall", "run", "script"})

FIRSTBOOT_DIR = "/usr/lib/imagekit/firstboot"
FIRSTBOOT_UNIT = "imagekit-firstboot.service"

_PKG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._:=~<>/@*-]*$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9@._:\\-]+$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_TZ_RE = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$")
_LOCALE_RE = re.compile(r"^[A-Za-z0-9_.@-]+$")
_DS_RE = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class StepResult:
    """What one step did: its index in the step list, its op, a one-line summary, how long it
    took, whether it succeeded, and the output of any command it ran."""

    index: int
    op: str
    summary: str
    duration: float
    ok: bool
    output: str = ""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["duration"] = round(self.duration, 2)
        return d


class CustomiseError(ImagekitError):
    """A step failed (or cannot be done); the input image is untouched."""

    def __init__(self, message: str, hint: str | None = None, *, index: int | None = None, op: str | None = None,
                 command: str | None = None, output: str = "", results: Sequence[StepResult] = ()) -> None:
        super().__init__(message, hint)
        self.index = index
        self.op = op
        self.command = command
        self.output = output
        self.results = list(results)

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d.update(step=self.index, op=self.op, command=self.command, output=self.output,
                 steps=[r.to_dict() for r in self.results])
        return d


@dataclass
class _Failure(Exception):
    """Raised by a step handler: what failed, the command it ran and that command's output."""

    message: str
    command: str | None = None
    output: str = ""
    hint: str | None = None


@dataclass
class _Ctx:
    s: GuestSession
    network: bool
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Done:
    summary: str
    output: str = ""


def _tail(text: str, n: int = OUTPUT_TAIL) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


# ---------------------------------------------------------------- helpers


def _mode(text: str) -> int:
    try:
        m = int(str(text), 8)
    except ValueError as exc:
        raise ValueError(f"'{text}' is not an octal mode such as 0644") from exc
    if not 0 <= m <= 0o7777:
        raise ValueError(f"'{text}' is not an octal mode such as 0644")
    return m


def _abs(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"guest path '{path}' must be absolute")


def _attrs(ctx: _Ctx, path: str, mode: str | None, owner: str | None) -> list[str]:
    out = []
    if mode is not None:
        ctx.s.g.chmod(_mode(mode), path)
        out.append(f"mode {mode}")
    if owner is not None:
        uid, gid = ctx.s.resolve_owner(owner)
        ctx.s.g.chown(uid, gid, path)
        out.append(f"owner {owner}")
    return out


def _parent(ctx: _Ctx, path: str) -> None:
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if not ctx.s.is_dir(parent):
        ctx.s.g.mkdir_p(parent)


def _sh(ctx: _Ctx, script: str, timeout: float, what: str, env: dict[str, str] | None = None) -> str:
    """Run ``script`` in the guest; a non-zero exit raises _Failure with the output."""
    res = ctx.s.run(script, timeout, env=env)
    if res.timed_out:
        raise _Failure(f"{what} did not finish within {timeout:g} s and was stopped", script, res.output,
                       "raise the step's timeout if the command is just slow")
    if res.status != 0:
        raise _Failure(f"{what} exited with status {res.status}", script, res.output)
    return res.output


def _has_any(ctx: _Ctx, *paths: str) -> bool:
    return any(ctx.s.exists(p) for p in paths)


def _systemd(ctx: _Ctx) -> bool:
    return _has_any(ctx, "/usr/bin/systemctl", "/bin/systemctl")


def _debian_like(ctx: _Ctx) -> bool:
    return ctx.s.distro in ("debian", "ubuntu", "linuxmint", "kalilinux") or ctx.s.package_format == "deb"


def _set_shadow(ctx: _Ctx, user: str, hash_: str | None, lock: bool) -> None:
    """Set (or lock) ``user``'s password in /etc/shadow. Only the hash is stored; it is never logged."""
    s = ctx.s
    if not s.is_file("/etc/shadow"):
        raise _Failure("the guest has no /etc/shadow")
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
        raise _Failure(f"user '{user}' has no entry in the guest's /etc/shadow")
    s.write_text("/etc/shadow", "\n".join(lines) + "\n")


def _install_keys(ctx: _Ctx, user: str, keys: Sequence[str]) -> int:
    """Append SSH public keys to the user's ~/.ssh/authorized_keys (0700 dir, 0600 file, owned by the user)."""
    s, g = ctx.s, ctx.s.g
    acct = s.accounts().get(user)
    if acct is None:
        raise _Failure(f"user '{user}' does not exist in the guest", hint="create it first with a 'user' step")
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


def _check_key(key: str) -> None:
    k = key.strip()
    if "\n" in k or len(k.split()) < 2:
        raise ValueError("an SSH public key is one line: TYPE BASE64 [COMMENT]")
    if "PRIVATE KEY" in k:
        raise ValueError("this is a private key: give the public key (.pub)")


# ---------------------------------------------------------------- steps


def step_write(ctx: _Ctx, st: rec.WriteStep) -> _Done:
    """write: create or replace a file with ``content`` (parent directories are created),
    then apply ``mode`` (octal) and ``owner`` (user[:group], names from the guest)."""
    _parent(ctx, st.path)
    data = st.content.encode()
    ctx.s.write_text(st.path, data)
    extra = _attrs(ctx, st.path, st.mode, st.owner)
    return _Done(f"wrote {len(data)} bytes to {st.path}" + (f" ({', '.join(extra)})" if extra else ""))


def step_append(ctx: _Ctx, st: rec.AppendStep) -> _Done:
    """append: add ``content`` to the end of a file as is (the file is created if missing)."""
    _parent(ctx, st.path)
    ctx.s.g.write_append(st.path, st.content.encode())
    return _Done(f"appended {len(st.content.encode())} bytes to {st.path}")


def step_upload(ctx: _Ctx, st: rec.UploadStep) -> _Done:
    """upload: copy a host file into the guest as ``dest`` or, when ``dest`` is a directory (or
    ends with ``/``), into it under its own name; then apply ``mode`` and ``owner``."""
    dest = st.dest
    if dest.endswith("/") and not ctx.s.is_dir(dest):
        ctx.s.g.mkdir_p(dest)
    if ctx.s.is_dir(dest):
        dest = f"{dest.rstrip('/')}/{os.path.basename(st.src)}"
    else:
        _parent(ctx, dest)
    ctx.s.g.upload(st.src, dest)
    extra = _attrs(ctx, dest, st.mode, st.owner)
    size = os.path.getsize(st.src)
    return _Done(f"uploaded {st.src} ({size} bytes) to {dest}" + (f" ({', '.join(extra)})" if extra else ""))


def step_mkdir(ctx: _Ctx, st: rec.MkdirStep) -> _Done:
    """mkdir: create a directory and its parents, then apply ``mode`` and ``owner``."""
    ctx.s.g.mkdir_p(st.path)
    extra = _attrs(ctx, st.path, st.mode, st.owner)
    return _Done(f"created {st.path}" + (f" ({', '.join(extra)})" if extra else ""))


def step_chmod(ctx: _Ctx, st: rec.ChmodStep) -> _Done:
    """chmod: set the permission bits of a guest path (octal)."""
    if not ctx.s.exists(st.path):
        raise _Failure(f"{st.path} does not exist in the guest")
    ctx.s.g.chmod(_mode(st.mode), st.path)
    return _Done(f"{st.path}: mode {st.mode}")


def step_chown(ctx: _Ctx, st: rec.ChownStep) -> _Done:
    """chown: set the owner of a guest path; names are looked up in the guest's passwd/group."""
    if not ctx.s.exists(st.path):
        raise _Failure(f"{st.path} does not exist in the guest")
    uid, gid = ctx.s.resolve_owner(st.owner)
    ctx.s.g.chown(uid, gid, st.path)
    return _Done(f"{st.path}: owner {st.owner} ({uid}:{gid})")


def step_delete(ctx: _Ctx, st: rec.DeleteStep) -> _Done:
    """delete: remove a file, a symlink or an empty directory (a whole tree with
    ``recursive: true``). Glob patterns are expanded in the guest; a missing path is not an error."""
    s = ctx.s
    paths = list(s.g.glob_expand(st.path)) if any(c in st.path for c in "*?[") else [st.path]
    removed = []
    for p in paths:
        if p.rstrip("/") == "":
            raise _Failure("refusing to delete the guest's root directory")
        if not s.exists(p) and not s.g.is_symlink(p):
            continue
        if st.recursive:
            s.g.rm_rf(p)
        elif s.g.is_dir(p, followsymlinks=False):
            if s.g.ls(p):
                raise _Failure(f"{p} is a directory that is not empty", hint="add recursive: true to delete a tree")
            s.g.rmdir(p)
        else:
            s.g.rm(p)
        removed.append(p)
    if not removed:
        return _Done(f"{st.path}: nothing to delete")
    return _Done(f"deleted {', '.join(removed)}")


def step_run(ctx: _Ctx, st: rec.RunStep) -> _Done:
    """run: run a shell command inside the guest (chroot; /bin/sh -c) with a timeout; its output is kept."""
    out = _sh(ctx, st.command, parse_duration(st.timeout), "the command")
    return _Done(f"ran: {_one_line(st.command)}", out)


def step_script(ctx: _Ctx, st: rec.ScriptStep) -> _Done:
    """script: run a script (inline ``content`` or a host ``file``) inside the guest. A script with a
    ``#!`` line runs with that interpreter, others with /bin/sh."""
    content = st.content if st.content is not None else Path(st.file or "").read_text()
    timeout = parse_duration(st.timeout)
    what = f"script {st.file}" if st.file else "the script"
    if content.startswith("#!"):
        g = ctx.s.g
        path = f"/tmp/imagekit-script-{os.getpid()}-{int(time.monotonic() * 1000)}"
        ctx.s.write_text(path, content)
        g.chmod(0o755, path)
        try:
            out = _sh(ctx, shlex.quote(path), timeout, what)
        finally:
            if g.exists(path):
                g.rm_f(path)
    else:
        out = _sh(ctx, content, timeout, what)
    return _Done(f"ran {what} ({len(content.splitlines())} lines)", out)


_APT = ("apt-get -q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
        "-o APT::Get::Fix-Broken=true")


def _pkg_commands(ctx: _Ctx, install: bool, pkgs: Sequence[str]) -> str:
    pm = ctx.s.package_management
    names = " ".join(shlex.quote(p) for p in pkgs)
    if pm == "apt":
        if install:
            update = "" if ctx.state.get("apt-updated") else f"{_APT} update && "
            return f"{update}{_APT} install {names} && apt-get clean"
        return f"{_APT} remove {names}"
    if pm in ("dnf", "yum", "tdnf"):
        return f"{pm} -y {'install' if install else 'remove'} {names}"
    if pm == "zypper":
        return f"zypper -n {'install -l' if install else 'remove'} {names}"
    if pm == "apk":
        return f"apk {'add' if install else 'del'} {names}"
    if pm == "pacman":
        return f"pacman --noconfirm {'-Sy' if install else '-R'} {names}"
    raise _Failure(f"the guest's package manager ({pm}) is not supported",
                   hint="supported: apt, dnf, yum, zypper, apk, pacman; or use a 'run' step")


PKG_TIMEOUT = 3600.0


def step_install(ctx: _Ctx, st: rec.InstallStep) -> _Done:
    """install: install packages with the guest's own package manager (apt-get with
    DEBIAN_FRONTEND=noninteractive after an ``apt-get update``, dnf/yum, zypper, ...). Needs the
    appliance network; libguestfs puts a resolv.conf in the guest while the command runs."""
    if not ctx.network:
        raise _Failure("installing packages needs the network", hint="do not use --no-network for this recipe")
    cmd = _pkg_commands(ctx, True, st.packages)
    out = _sh(ctx, cmd, PKG_TIMEOUT, "the package install", env={"DEBIAN_FRONTEND": "noninteractive"})
    ctx.state["apt-updated"] = True
    return _Done(f"installed {', '.join(st.packages)} with {ctx.s.package_management}", out)


def step_uninstall(ctx: _Ctx, st: rec.UninstallStep) -> _Done:
    """uninstall: remove packages with the guest's package manager."""
    cmd = _pkg_commands(ctx, False, st.packages)
    out = _sh(ctx, cmd, PKG_TIMEOUT, "the package removal", env={"DEBIAN_FRONTEND": "noninteractive"})
    return _Done(f"removed {', '.join(st.packages)} with {ctx.s.package_management}", out)


def step_services(ctx: _Ctx, st: rec.ServicesStep) -> _Done:
    """services: enable, disable and mask systemd units with the guest's own ``systemctl``
    (which works offline in a chroot: it only creates and removes the symlinks)."""
    if not _systemd(ctx):
        raise _Failure("the guest has no systemctl (not a systemd guest)", hint="use a 'run' step for other init systems")
    parts = []
    for verb, units in (("enable", st.enable), ("disable", st.disable), ("mask", st.mask)):
        if units:
            parts.append(f"systemctl {verb} {' '.join(shlex.quote(u) for u in units)}")
    if not parts:
        return _Done("no services to change")
    script = " && ".join(parts)
    out = _sh(ctx, script, 300, "systemctl")
    said = [f"{v} {', '.join(u)}" for v, u in (("enabled", st.enable), ("disabled", st.disable),
                                                  ("masked", st.mask)) if u]
    return _Done("; ".join(said), out)


def step_root_password(ctx: _Ctx, st: rec.RootPasswordStep) -> _Done:
    """root-password: set root's password to a crypt(3) hash in /etc/shadow, or lock it.
    The hash is never logged or shown."""
    _set_shadow(ctx, "root", st.hash, st.locked)
    return _Done("root password locked" if st.locked else "root password set (hash not shown)")


def step_user(ctx: _Ctx, st: rec.UserStep) -> _Done:
    """user: create a user (or update an existing one) with ``useradd``/``usermod`` in the guest: home
    directory, shell, supplementary groups (created when missing), an optional password hash
    (never logged), SSH authorized keys and, with ``sudo: true``, passwordless sudo through
    /etc/sudoers.d."""
    s = ctx.s
    q = shlex.quote
    parts = []
    have = s.groups()
    new_groups = [grp for grp in st.groups if grp not in have]
    for grp in new_groups:
        parts.append(f"groupadd {q(grp)}")
    exists = st.name in s.accounts()
    if exists:
        parts.append(f"usermod -s {q(st.shell)} {q(st.name)}")
    else:
        parts.append(f"useradd -m -s {q(st.shell)} {q(st.name)}")
    if st.groups:
        parts.append(f"usermod -a -G {q(','.join(st.groups))} {q(st.name)}")
    out = _sh(ctx, " && ".join(parts), 300, "useradd")
    said = [("updated" if exists else "created") + f" user {st.name} (shell {st.shell})"]
    if st.groups:
        said.append(f"groups {', '.join(st.groups)}" + (f" (created {', '.join(new_groups)})" if new_groups else ""))
    if st.password_hash is not None:
        _set_shadow(ctx, st.name, st.password_hash, False)
        said.append("password set (hash not shown)")
    if st.ssh_keys:
        n = _install_keys(ctx, st.name, st.ssh_keys)
        said.append(f"{n} SSH key(s) added")
    if st.sudo:
        if not s.exists("/etc/sudoers"):
            raise _Failure("sudo: true, but sudo is not installed in the guest", hint="add an install step for sudo first")
        if not s.is_dir("/etc/sudoers.d"):
            s.g.mkdir_mode("/etc/sudoers.d", 0o750)
        path = f"/etc/sudoers.d/90-imagekit-{st.name}"
        s.write_text(path, f"{st.name} ALL=(ALL) NOPASSWD:ALL\n")
        s.g.chmod(0o440, path)
        s.g.chown(0, 0, path)
        said.append("passwordless sudo")
    return _Done("; ".join(said), out)


def step_ssh_key(ctx: _Ctx, st: rec.SshKeyStep) -> _Done:
    """ssh-key: add an SSH public key (``key``, or ``key_file`` on the host) to a user's
    ~/.ssh/authorized_keys with mode 0700/0600 and the user's ownership."""
    key = st.key if st.key is not None else Path(st.key_file or "").read_text().strip()
    n = _install_keys(ctx, st.user, [key])
    return _Done(f"SSH key {'added for' if n else 'already present for'} {st.user}")


def step_hostname(ctx: _Ctx, st: rec.HostnameStep) -> _Done:
    """hostname: write /etc/hostname and the 127.0.1.1 line of /etc/hosts (Debian family, or
    when the guest already has such a line)."""
    s = ctx.s
    name = st.hostname
    short = name.split(".")[0]
    s.write_text("/etc/hostname", name + "\n")
    hosts = s.read_text_or("/etc/hosts")
    entry = f"127.0.1.1\t{name}" + (f" {short}" if short != name else "")
    lines = hosts.splitlines()
    found = False
    for i, line in enumerate(lines):
        if line.split() and line.split()[0] == "127.0.1.1":
            lines[i] = entry
            found = True
    if not found and _debian_like(ctx):
        lines.append(entry)
        found = True
    if found:
        s.write_text("/etc/hosts", "\n".join(lines) + "\n")
    return _Done(f"hostname {name}" + (" (and /etc/hosts)" if found else ""))


def step_timezone(ctx: _Ctx, st: rec.TimezoneStep) -> _Done:
    """timezone: point /etc/localtime at /usr/share/zoneinfo/ZONE (relative symlink, as
    timedatectl does) and write /etc/timezone on Debian-family guests."""
    s = ctx.s
    zone = st.timezone
    if not s.is_file(f"/usr/share/zoneinfo/{zone}"):
        raise _Failure(f"timezone '{zone}' is not in the guest's /usr/share/zoneinfo",
                       hint="check the name (e.g. Europe/Paris, UTC) or install tzdata first")
    if s.exists("/etc/localtime") or s.g.is_symlink("/etc/localtime"):
        s.g.rm_f("/etc/localtime")
    s.g.ln_s(f"../usr/share/zoneinfo/{zone}", "/etc/localtime")
    if _debian_like(ctx) or s.exists("/etc/timezone"):
        s.write_text("/etc/timezone", zone + "\n")
    return _Done(f"timezone {zone}")


def step_locale(ctx: _Ctx, st: rec.LocaleStep) -> _Done:
    """locale: set the system locale (LANG) in /etc/locale.conf and, on Debian-family guests,
    /etc/default/locale; when the guest has locale-gen, the locale is also generated."""
    s = ctx.s
    loc = st.locale
    s.write_text("/etc/locale.conf", f"LANG={loc}\n")
    files = ["/etc/locale.conf"]
    if _debian_like(ctx):
        s.write_text("/etc/default/locale", f"LANG={loc}\n")
        files.append("/etc/default/locale")
    out = ""
    note = ""
    builtin = loc in ("C", "POSIX", "C.UTF-8", "C.utf8")
    if not builtin:
        if s.is_file("/etc/locale.gen") and _has_any(ctx, "/usr/sbin/locale-gen", "/sbin/locale-gen"):
            charset = loc.split(".", 1)[1] if "." in loc else "ISO-8859-1"
            charset = charset.split("@")[0]
            line = f"{loc} {charset}"
            gen = s.read_text("/etc/locale.gen").splitlines()
            gen = [ln for ln in gen if ln.strip().lstrip("#").strip() != line]
            gen.append(line)
            s.write_text("/etc/locale.gen", "\n".join(gen) + "\n")
            out = _sh(ctx, "locale-gen", 600, "locale-gen")
            note = " (generated)"
        elif _has_any(ctx, "/usr/bin/localedef"):
            note = " (not generated: the guest has no locale-gen; install the locales package)"
        else:
            note = " (not generated: the guest has no locale tools)"
    return _Done(f"locale {loc} in {', '.join(files)}{note}", out)


def step_cloud_init(ctx: _Ctx, st: rec.CloudInitStep) -> _Done:
    """cloud-init: write the datasource list and extra configuration as drop-ins in
    /etc/cloud/cloud.cfg.d/ (95_imagekit_datasources.cfg, 96_imagekit.cfg: after the distro's 90_*)."""
    s = ctx.s
    if not s.is_dir("/etc/cloud"):
        raise _Failure("cloud-init is not installed in the guest (no /etc/cloud)",
                       hint="add an install step for cloud-init before this one")
    s.g.mkdir_p("/etc/cloud/cloud.cfg.d")
    written = []
    if st.datasources:
        path = "/etc/cloud/cloud.cfg.d/95_imagekit_datasources.cfg"
        s.write_text(path, "# written by imagekit\ndatasource_list: [ " + ", ".join(st.datasources) + " ]\n")
        s.g.chmod(0o644, path)
        written.append(path)
    if st.config:
        path = "/etc/cloud/cloud.cfg.d/96_imagekit.cfg"
        s.write_text(path, "#cloud-config\n# written by imagekit\n" + yaml.safe_dump(st.config, sort_keys=False))
        s.g.chmod(0o644, path)
        written.append(path)
    if not written:
        return _Done("nothing to configure")
    return _Done(f"cloud-init: wrote {', '.join(written)}")


FIRSTBOOT_RUNNER = f"""#!/bin/sh -
# imagekit firstboot: run each script in {FIRSTBOOT_DIR}/scripts once, in
# name order, at the first boot; output goes to /var/log/imagekit-firstboot.log.
d={FIRSTBOOT_DIR}
log=/var/log/imagekit-firstboot.log
mkdir -p "$d/scripts-done"
for f in "$d"/scripts/*; do
    [ -f "$f" ] || continue
    echo "=== $(date -u) running $f" >>"$log"
    "$f" >>"$log" 2>&1
    echo "=== $f: exit status $?" >>"$log"
    mv -f "$f" "$d/scripts-done/"
done
"""

FIRSTBOOT_SERVICE = f"""[Unit]
Description=imagekit firstboot scripts
After=network.target network-online.target
Wants=network-online.target
ConditionPathExistsGlob={FIRSTBOOT_DIR}/scripts/*

[Service]
Type=oneshot
ExecStart={FIRSTBOOT_DIR}/firstboot.sh
RemainAfterExit=yes
TimeoutSec=0
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


def step_firstboot(ctx: _Ctx, st: rec.FirstbootStep) -> _Done:
    """firstboot: install a command or script to run once at the first boot, like virt-customize:
    scripts in /usr/lib/imagekit/firstboot/scripts/NNNN-imagekit run in order by a systemd oneshot
    unit (imagekit-firstboot.service, enabled in multi-user.target) and are moved aside once run."""
    s, g = ctx.s, ctx.s.g
    if not _systemd(ctx):
        raise _Failure("firstboot needs a systemd guest (no systemctl found)")
    scripts = f"{FIRSTBOOT_DIR}/scripts"
    g.mkdir_p(scripts)
    s.write_text(f"{FIRSTBOOT_DIR}/firstboot.sh", FIRSTBOOT_RUNNER)
    g.chmod(0o755, f"{FIRSTBOOT_DIR}/firstboot.sh")
    unit = f"/etc/systemd/system/{FIRSTBOOT_UNIT}"
    s.write_text(unit, FIRSTBOOT_SERVICE)
    g.chmod(0o644, unit)
    wants = "/etc/systemd/system/multi-user.target.wants"
    g.mkdir_p(wants)
    link = f"{wants}/{FIRSTBOOT_UNIT}"
    if not g.is_symlink(link):
        g.ln_sf(unit, link)
    n = len(g.ls(scripts)) + 1
    done_dir = f"{FIRSTBOOT_DIR}/scripts-done"
    if s.is_dir(done_dir):
        n += len(g.ls(done_dir))
    body = st.script if st.script is not None else st.command or ""
    if not body.startswith("#!"):
        body = "#!/bin/sh\n" + body
    if not body.endswith("\n"):
        body += "\n"
    path = f"{scripts}/{n:04d}-imagekit"
    s.write_text(path, body)
    g.chmod(0o755, path)
    return _Done(f"firstboot script {path} (run by {FIRSTBOOT_UNIT})")


def step_selinux_relabel(ctx: _Ctx, st: rec.SelinuxRelabelStep) -> _Done:
    """selinux-relabel: on an SELinux guest, relabel every file now with setfiles (the guest's
    file_contexts); if that is not possible, create /.autorelabel so the guest relabels at the
    next boot. Other guests: nothing to do. Put it after the steps that write files."""
    s = ctx.s
    cfg = s.read_text_or("/etc/selinux/config")
    values = dict(ln.split("=", 1) for ln in cfg.splitlines() if "=" in ln and not ln.lstrip().startswith("#"))
    mode = values.get("SELINUX", "").strip()
    if not cfg or mode == "disabled":
        return _Done("not an SELinux guest: nothing to relabel")
    policy = values.get("SELINUXTYPE", "targeted").strip() or "targeted"
    spec = f"/etc/selinux/{policy}/contexts/files/file_contexts"
    if s.is_file(spec):
        try:
            s.g.selinux_relabel(spec, "/", force=True)
            return _Done(f"relabelled all files with setfiles ({policy} policy)")
        except RuntimeError as exc:
            log.info("setfiles failed (%s): falling back to /.autorelabel", exc)
    s.g.touch("/.autorelabel")
    return _Done("created /.autorelabel (the guest relabels at its next boot)")


def step_grow_root(ctx: _Ctx, st: rec.GrowRootStep) -> _Done:
    """grow-root: grow the root filesystem to the end of the disk like cloud-utils' growpart:
    move the GPT backup header to the end (GPT), extend the root's partition (it must be the
    last one), then resize2fs (ext2/3/4, after e2fsck -f), xfs_growfs or btrfs resize. A root on
    LVM grows its PV and LV first."""
    s, g = ctx.s, ctx.s.g
    root_dev = dict(s.mounts).get("/")
    if root_dev is None:
        raise _Failure("the guest's root filesystem is not mounted")
    lv = None
    part = root_dev
    if g.is_lv(root_dev):
        lv = root_dev
        vgname = g.lvm_canonical_lv_name(lv).split("/")[2]
        uuids = set(g.vgpvuuids(vgname))
        pvs = [p for p in g.pvs_full() if p["pv_uuid"] in uuids]
        if len(pvs) != 1:
            raise _Failure(f"the root LV's volume group {vgname} has {len(pvs)} PVs: growing it is not supported")
        part = g.canonical_device_name(pvs[0]["pv_name"])
    try:
        dev = g.part_to_dev(part)
        num = g.part_to_partnum(part)
    except RuntimeError as exc:
        raise _Failure(f"the root filesystem is on {part}, which is not a partition: cannot grow it") from exc
    ptype = g.part_get_parttype(dev)
    if ptype == "msdos" and num > 4:
        raise _Failure("the root filesystem is on a logical partition: growing it is not supported")
    parts = g.part_list(dev)
    last = max(parts, key=lambda p: p["part_end"])
    if last["part_num"] != num:
        raise _Failure(f"{part} is not the last partition on {dev}: it cannot be grown in place")
    ss = g.blockdev_getss(dev)
    total = g.blockdev_getsize64(dev) // ss
    reserve = 34 if ptype == "gpt" else 0
    align = max(1, (1 << 20) // ss)
    new_end = ((total - reserve) // align) * align - 1
    old_end = last["part_end"] // ss
    old_size = last["part_size"]
    if new_end - old_end < align:
        return _Done(f"{part} already fills {dev}: nothing to grow")
    vfs = g.vfs_type(root_dev)
    s.unmount_all()
    try:
        if ptype == "gpt":
            g.part_expand_gpt(dev)
        g.part_resize(dev, num, new_end)
        if lv is not None:
            g.pvresize(part)
            g.lvresize_free(lv, 100)
        if vfs.startswith("ext"):
            g.e2fsck(root_dev, correct=True)
            g.resize2fs(root_dev)
    finally:
        s.remount()
    if vfs == "xfs":
        g.xfs_growfs("/")
    elif vfs == "btrfs":
        g.btrfs_filesystem_resize("/")
    elif not vfs.startswith("ext"):
        raise _Failure(f"the partition was grown but the {vfs} filesystem cannot be resized here")
    new_size = (new_end + 1) * ss - last["part_start"]
    return _Done(f"grew {part} from {old_size >> 20} MiB to {new_size >> 20} MiB and resized its {vfs} filesystem")


_SYSPREP_GLOBS: dict[str, tuple[str, ...]] = {
    "ssh-hostkeys": ("/etc/ssh/ssh_host_*",),
    "bash-history": ("/root/.bash_history", "/home/*/.bash_history"),
    "cloud-init-state": ("/var/lib/cloud/*", "/var/log/cloud-init.log", "/var/log/cloud-init-output.log",
                         "/run/cloud-init/*"),
    "net-persistent-rules": ("/etc/udev/rules.d/70-persistent-net.rules",
                             "/etc/udev/rules.d/75-persistent-net-generator.rules"),
    "package-cache": ("/var/cache/apt/archives/*.deb", "/var/cache/apt/archives/partial/*", "/var/cache/apt/*.bin",
                      "/var/cache/dnf/*", "/var/cache/yum/*", "/var/cache/zypp/packages/*", "/var/cache/apk/*"),
    "tmp-files": ("/tmp/*", "/tmp/.[!.]*", "/var/tmp/*", "/var/tmp/.[!.]*"),
    "dhcp-leases": ("/var/lib/dhcp/*", "/var/lib/dhclient/*", "/var/lib/dhcpcd/*", "/var/lib/NetworkManager/*.lease",
                    "/var/lib/NetworkManager/dhclient-*", "/var/lib/systemd/network/*.lease"),
}


def _sysprep_logs(ctx: _Ctx) -> list[str]:
    """Rotated logs and journals are deleted, live logs truncated (their owners and modes stay)."""
    g = ctx.s.g
    done: list[str] = []
    if not ctx.s.is_dir("/var/log"):
        return done
    for path in g.find("/var/log"):
        full = f"/var/log/{path}"
        if not g.is_file(full, followsymlinks=False):
            continue
        name = os.path.basename(full)
        if full.startswith("/var/log/journal/") or re.search(r"(\.\d+|\.gz|\.xz|\.bz2|\.old|-\d{8})$", name):
            g.rm(full)
            done.append(full)
        elif g.filesize(full) > 0:
            g.truncate(full)
            done.append(full)
    return done


def step_sysprep(ctx: _Ctx, st: rec.SysprepStep) -> _Done:
    """sysprep: make the image generic, like virt-sysprep: machine-id (emptied, so systemd makes a new
    one), SSH host keys (regenerated at boot by cloud-init or sshd-keygen), logs, bash history,
    cloud-init state, persistent net rules, package cache, temporary files and DHCP leases."""
    s, g = ctx.s, ctx.s.g
    report = []
    for op in st.operations:
        touched: list[str] = []
        if op == "machine-id":
            if s.is_file("/etc/machine-id"):
                s.g.truncate("/etc/machine-id")
                touched.append("/etc/machine-id")
            if s.is_file("/var/lib/dbus/machine-id") and not g.is_symlink("/var/lib/dbus/machine-id"):
                g.rm("/var/lib/dbus/machine-id")
                touched.append("/var/lib/dbus/machine-id")
        elif op == "logs":
            touched = _sysprep_logs(ctx)
        else:
            for pattern in _SYSPREP_GLOBS[op]:
                for p in g.glob_expand(pattern):
                    p = p.rstrip("/")
                    if p.endswith("/.") or p.endswith("/.."):
                        continue
                    g.rm_rf(p)
                    touched.append(p)
        report.append(f"{op}: {len(touched)}")
        if touched:
            log.debug("sysprep %s: %s", op, ", ".join(touched))
    return _Done("sysprep " + ", ".join(report))


def step_sparsify(ctx: _Ctx, st: rec.SparsifyStep) -> _Done:
    """sparsify: fstrim every mounted filesystem, so the free space is discarded in the overlay
    and left out when the image is converted to its output."""
    done = []
    for mp, _dev in ctx.s.mounts:
        try:
            ctx.s.g.fstrim(mp)
            done.append(mp)
        except RuntimeError as exc:
            log.info("fstrim %s: %s", mp, exc)
    ctx.state["sparsified"] = True
    return _Done(f"trimmed free space on {', '.join(done) or 'no filesystem'}")


_HANDLERS: dict[str, Callable[[_Ctx, Any], _Done]] = {
    "write": step_write, "append": step_append, "upload": step_upload, "mkdir": step_mkdir,
    "chmod": step_chmod, "chown": step_chown, "delete": step_delete, "run": step_run,
    "script": step_script, "install": step_install, "uninstall": step_uninstall,
    "services": step_services, "root-password": step_root_password, "user": step_user,
    "ssh-key": step_ssh_key, "hostname": step_hostname, "timezone": step_timezone,
    "locale": step_locale, "cloud-init": step_cloud_init, "firstboot": step_firstboot,
    "selinux-relabel": step_selinux_relabel, "grow-root": step_grow_root, "sysprep": step_sysprep,
    "sparsify": step_sparsify,
}

STEP_OPS = tuple(_HANDLERS)


def _one_line(text: str, n: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= n else line[: n - 3] + "..."


# ---------------------------------------------------------------- checks before launching


def _preflight_one(step: Any) -> None:
    """Problems that can be found without the guest (raises ValueError with the reason)."""
    op = step.op
    for attr in ("path", "dest"):
        v = getattr(step, attr, None)
        if isinstance(v, str):
            _abs(v)
    mode = getattr(step, "mode", None)
    if isinstance(mode, str):
        _mode(mode)
    if op == "upload":
        if not os.path.isfile(step.src):
            raise ValueError(f"upload source {step.src} does not exist on this host (or is not a file)")
        if not os.access(step.src, os.R_OK):
            raise ValueError(f"upload source {step.src} is not readable")
    elif op in ("run", "script"):
        parse_duration(step.timeout)
        if op == "script" and step.file is not None and not os.path.isfile(step.file):
            raise ValueError(f"script file {step.file} does not exist on this host")
    elif op in ("install", "uninstall"):
        bad = [p for p in step.packages if not _PKG_RE.match(p)]
        if bad:
            raise ValueError(f"not a package name: {', '.join(bad)}")
    elif op == "services":
        bad = [u for u in (*step.enable, *step.disable, *step.mask) if not _UNIT_RE.match(u)]
        if bad:
            raise ValueError(f"not a systemd unit name: {', '.join(bad)}")
    elif op == "user":
        if not _USER_RE.match(step.name):
            raise ValueError(f"'{step.name}' is not a valid user name")
        bad = [g for g in step.groups if not _USER_RE.match(g)]
        if bad:
            raise ValueError(f"not a group name: {', '.join(bad)}")
        if step.password_hash is not None and not step.password_hash.startswith("$"):
            raise ValueError("password_hash must be a crypt(3) hash such as $6$... (never a plain password)")
        for k in step.ssh_keys:
            _check_key(k)
        _abs(step.shell)
    elif op == "ssh-key":
        if step.key_file is not None:
            if not os.path.isfile(step.key_file):
                raise ValueError(f"key file {step.key_file} does not exist on this host")
            _check_key(Path(step.key_file).read_text())
        else:
            _check_key(step.key or "")
        if not _USER_RE.match(step.user):
            raise ValueError(f"'{step.user}' is not a valid user name")
    elif op == "hostname":
        name = step.hostname
        if len(name) > 253 or not all(_HOST_LABEL_RE.match(lbl) for lbl in name.split(".")):
            raise ValueError(f"'{name}' is not a valid host name")
    elif op == "timezone":
        if not _TZ_RE.match(step.timezone) or ".." in step.timezone:
            raise ValueError(f"'{step.timezone}' is not a timezone name such as Europe/Paris")
    elif op == "locale":
        if not _LOCALE_RE.match(step.locale):
            raise ValueError(f"'{step.locale}' is not a locale name such as en_US.UTF-8")
    elif op == "cloud-init":
        bad = [d for d in step.datasources if not _DS_RE.match(d)]
        if bad:
            raise ValueError(f"not a cloud-init datasource name: {', '.join(bad)}")
    elif op not in _HANDLERS:
        raise ValueError(f"unknown step '{op}'")


def _secrets(steps: Sequence[Any]) -> list[str]:
    out = []
    for st in steps:
        for attr in ("hash", "password_hash"):
            v = getattr(st, attr, None)
            if isinstance(v, str) and v:
                out.append(v)
    return out


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        text = text.replace(s, MASK)
    return text


# ---------------------------------------------------------------- the run


def detect_format(path: str | os.PathLike[str]) -> str:
    """The qemu format name of an image, from its content (imagekit's detector, never the name)."""
    from imagekit.formats.detect import detect

    det = detect(path)
    if det.qemu_format not in ("qcow2", "raw"):
        raise UsageError(f"{path} is a {det.format} image: customise works on qcow2 and raw images",
                         "convert it to qcow2 first ('qemu-img convert -O qcow2')")
    return det.qemu_format


def ensure_safe(path: str | os.PathLike[str], fmt: str) -> None:
    """Refuse an input that is not safe to give QEMU (backing files, polyglots, wrong format)."""
    from imagekit.check import check

    verdict = check(path, declared=fmt, deep=False)
    if not verdict.ok:
        reasons = "; ".join(f.message for f in verdict.findings if f.severity == "reject")
        raise UnsafeImageError(f"{path} failed the safety check: {reasons}",
                               "run 'imagekit check' on it for details", verdict=verdict)


def customise(
    image: str | os.PathLike[str],
    steps: Sequence[Any],
    *,
    in_place: bool = False,
    output: str | os.PathLike[str] | None = None,
    output_format: str = "qcow2",
    fmt: str | None = None,
    network: bool = True,
    overwrite: bool = False,
    accel: str | None = None,
    log: Callable[[StepResult], None] | None = None,
    after: Callable[[GuestSession], None] | None = None,
) -> list[StepResult]:
    """Apply ``steps`` (recipe Step models) in order to ``image``; return one StepResult per step.

    Exactly one of ``output`` (a new image, ``output_format`` qcow2 or raw) and
    ``in_place`` must be given. ``fmt`` is the input's format (detected from its
    content when None). ``network`` gives package installs and commands the
    appliance's network. Raises CustomiseError when a step fails (input
    untouched, nothing written), UsageError for impossible requests,
    UnsafeImageError for an input QEMU must not open, GuestError when the
    appliance cannot start or the guest cannot be inspected. ``after`` is called with the
    still-open session once every step succeeded (e.g. ``sbom.guest_info`` for an inventory
    without launching the appliance a second time).
    """
    callback = log
    src = Path(image)
    if not src.is_file():
        raise UsageError(f"{src} does not exist or is not a file")
    if in_place == (output is not None):
        raise UsageError("give either an output image or in_place=True (--in-place)",
                         "the input is never changed unless --in-place is given")
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"output format '{output_format}' is not supported", f"use one of {', '.join(OUTPUT_FORMATS)}")
    dest = Path(output) if output is not None else None
    if dest is not None:
        if dest.resolve() == src.resolve():
            raise UsageError("the output is the input", "use --in-place to change the input itself")
        if dest.exists() and not overwrite:
            raise OutputExistsError(f"{dest} already exists", "remove it or choose another output name")
        if not dest.parent.is_dir():
            raise UsageError(f"the output directory {dest.parent} does not exist")
    if fmt is None:
        fmt = detect_format(src)
    ensure_safe(src, fmt)

    secrets = _secrets(steps)
    for i, st in enumerate(steps):
        try:
            _preflight_one(st)
        except ValueError as exc:
            raise CustomiseError(f"step {i} ({st.op}) cannot be done: {exc}", index=i, op=st.op) from exc
        if st.op == "install" and not network:
            raise CustomiseError(f"step {i} (install) needs the network, but network access is off",
                                 "drop --no-network to install packages", index=i, op=st.op)

    workdir = dest.parent if dest is not None else src.parent
    tag = f"{os.getpid()}-{int(time.time())}"
    overlay = workdir / f".{src.name}.imagekit-{tag}.overlay.qcow2"
    partial = dest.with_name(f".{dest.name}.imagekit-{tag}.partial") if dest is not None else None
    results: list[StepResult] = []
    use_net = network and any(st.op in NETWORK_OPS for st in steps)
    try:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(src.resolve()), str(overlay)],
            timeout=120)
        with open_image(overlay, readonly=False, fmt="qcow2", network=use_net, accel=accel) as session:
            ctx = _Ctx(session, use_net)
            for i, st in enumerate(steps):
                results.append(_apply(ctx, i, st, secrets, results, callback))
            if after is not None:
                after(session)
        if dest is not None and partial is not None:
            run(["qemu-img", "convert", "-f", "qcow2", "-O", output_format, str(overlay), str(partial)],
                timeout=QEMU_IMG_TIMEOUT)
            os.replace(partial, dest)
        else:
            run(["qemu-img", "commit", "-q", "-f", "qcow2", str(overlay)], timeout=QEMU_IMG_TIMEOUT)
    finally:
        for p in (overlay, partial):
            if p is not None:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
    return results


def _apply(ctx: _Ctx, i: int, st: Any, secrets: list[str], done: list[StepResult],
           callback: Callable[[StepResult], None] | None) -> StepResult:
    op = st.op
    handler = _HANDLERS[op]
    log.info("step %d (%s) ...", i, op)
    start = time.monotonic()
    failure: _Failure | None = None
    try:
        res = handler(ctx, st)
    except _Failure as f:
        failure = f
    except GuestError as exc:
        failure = _Failure(exc.message, hint=exc.hint)
    except RuntimeError as exc:  # a libguestfs call failed
        failure = _Failure(str(exc).strip().splitlines()[0] if str(exc).strip() else "libguestfs call failed")
    except OSError as exc:  # reading a host file
        failure = _Failure(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    duration = time.monotonic() - start
    if failure is not None:
        output = _scrub(failure.output, secrets)
        command = _scrub(failure.command, secrets) if failure.command else None
        message = _scrub(failure.message, secrets)
        result = StepResult(i, op, f"FAILED: {message}", duration, False, output)
        log.error("step %d (%s) failed after %.1f s: %s", i, op, duration, message)
        if callback is not None:
            callback(result)
        text = f"step {i} ({op}) failed: {message}"
        if command:
            text += f"\ncommand: {_one_line(command, 200)}"
        if output.strip():
            text += f"\noutput (last lines):\n{_tail(output)}"
        raise CustomiseError(text, failure.hint or "the input image was not changed", index=i, op=op,
                             command=command, output=output, results=[*done, result])
    result = StepResult(i, op, _scrub(res.summary, secrets), duration, True, _scrub(res.output, secrets))
    log.info("step %d (%s) done in %.1f s: %s", i, op, duration, result.summary)
    if callback is not None:
        callback(result)
    return result
