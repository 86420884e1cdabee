"""The validated field types customise steps are made of.

Each type is an ``Annotated[str, ...]`` whose validator refuses, with a reason a
recipe author understands, every value that cannot work in a guest: relative
guest paths, modes that are not octal, package, unit, user, group, host,
timezone, locale and datasource names with characters no such name has, durations
that are not durations, SSH keys that are private or not one line, password
hashes that are not crypt(3) hashes. So ``imagekit recipes validate`` finds all of
this before a build.

:data:`HostPath` is a file on the host that a step reads. It is resolved when the
step is validated: a relative path is taken relative to ``base_dir`` of the
pydantic validation context (the folder of the recipe file that declared the
step; the current directory for the CLI's ``--step``), and the result is an
absolute, normalised path (symbolic links are kept: an uploaded file keeps its
name). With a ``base_dir`` in the context the file must exist, be a regular file
and be readable. A step built in code without a context resolves against the
current directory and its files are checked when ``customise()`` runs it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ValidationInfo

from imagekit.specs import parse_duration

# Keys of the validation context (``Model.model_validate(data, context=...)``).
BASE_DIR = "base_dir"  # folder relative host paths are resolved against; its presence turns file checks on
OS_TYPE = "os_type"  # the recipe's os.type: a step that does not apply to it is refused
CONFINED = "confined"  # confined mode (untrusted recipes): host files only from inside base_dir

_PKG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._:=~<>/@*-]*$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9@._:\\-]+$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_TZ_RE = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$")
_LOCALE_RE = re.compile(r"^[A-Za-z0-9_.@-]+$")
_DS_RE = re.compile(r"^[A-Za-z0-9]+$")
_CRYPT_RE = re.compile(r"^\$[0-9a-z]+\$[^\s:]+$")


def validation_context(base_dir: str | os.PathLike[str], os_type: str | None = None,
                       confined: bool = False) -> dict[str, Any]:
    """The context recipe and ``--step`` validation pass to pydantic."""
    ctx: dict[str, Any] = {BASE_DIR: Path(base_dir).resolve(), CONFINED: confined}
    if os_type is not None:
        ctx[OS_TYPE] = os_type
    return ctx


# ---------------------------------------------------------------- guest-side values


def _guest_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f"guest path '{v}' must be absolute")
    if "\0" in v or "\n" in v:
        raise ValueError("a guest path cannot contain NUL or newline characters")
    return v


def mode_bits(text: str) -> int:
    """The permission bits of an octal mode string such as ``0644``."""
    try:
        m = int(str(text), 8)
    except ValueError as exc:
        raise ValueError(f"'{text}' is not an octal mode such as 0644") from exc
    if not 0 <= m <= 0o7777:
        raise ValueError(f"'{text}' is not an octal mode such as 0644")
    return m


def _mode_not_number(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        raise ValueError(f"write the mode as a quoted octal string such as '0644' (got the number {v}; "
                         "YAML reads an unquoted 0644 as 420)")
    return v


def _mode(v: str) -> str:
    mode_bits(v)
    return v


def _name_check(regex: re.Pattern[str], what: str, example: str = "") -> Any:
    def check(v: str) -> str:
        if not regex.match(v):
            raise ValueError(f"'{v}' is not {what}" + (f" such as {example}" if example else ""))
        return v

    return check


def _owner(v: str) -> str:
    user, _, group = v.partition(":")
    ok = bool(user or group) and all(not part or part.isdigit() or _USER_RE.match(part) for part in (user, group))
    if not ok:
        raise ValueError(f"'{v}' is not an owner (examples: root, alice:staff, 1000:1000, :adm)")
    return v


def _hostname(v: str) -> str:
    if len(v) > 253 or not all(_HOST_LABEL_RE.match(lbl) for lbl in v.split(".")):
        raise ValueError(f"'{v}' is not a valid host name")
    return v


def _timezone(v: str) -> str:
    if not _TZ_RE.match(v) or ".." in v:
        raise ValueError(f"'{v}' is not a timezone name such as Europe/Paris")
    return v


def _duration(v: str) -> str:
    seconds = parse_duration(v)
    if seconds <= 0:
        raise ValueError(f"'{v}' is not a positive duration (examples: 90s, 30m, 2h)")
    return v


def check_ssh_key(key: str) -> str:
    """Refuse what is not one SSH public key (``TYPE BASE64 [COMMENT]`` on one line)."""
    k = key.strip()
    if "PRIVATE KEY" in k:
        raise ValueError("this is a private key: give the public key (.pub)")
    if "\n" in k or len(k.split()) < 2:
        raise ValueError("an SSH public key is one line: TYPE BASE64 [COMMENT]")
    return key


def check_crypt_hash(value: str, field: str = "hash") -> str:
    if not value.startswith("$"):
        raise ValueError(f"{field} must be a crypt(3) hash such as $6$... or $y$... (never a plain password)")
    if not _CRYPT_RE.match(value):
        raise ValueError(f"{field} is not a crypt(3) hash: no spaces or ':' and at least $ID$... (such as $6$salt$...)")
    return value


def _password_hash(v: str) -> str:
    return check_crypt_hash(v, "password_hash")


GuestPath = Annotated[str, AfterValidator(_guest_path)]
Mode = Annotated[str, BeforeValidator(_mode_not_number), AfterValidator(_mode)]
Owner = Annotated[str, AfterValidator(_owner)]
Duration = Annotated[str, AfterValidator(_duration)]
PackageName = Annotated[str, AfterValidator(_name_check(_PKG_RE, "a package name"))]
UnitName = Annotated[str, AfterValidator(_name_check(_UNIT_RE, "a systemd unit name", "sshd.service"))]
UserName = Annotated[str, AfterValidator(_name_check(_USER_RE, "a valid user name"))]
GroupName = Annotated[str, AfterValidator(_name_check(_USER_RE, "a valid group name"))]
Hostname = Annotated[str, AfterValidator(_hostname)]
Timezone = Annotated[str, AfterValidator(_timezone)]
Locale = Annotated[str, AfterValidator(_name_check(_LOCALE_RE, "a locale name", "en_US.UTF-8"))]
Datasource = Annotated[str, AfterValidator(_name_check(_DS_RE, "a cloud-init datasource name", "OpenStack"))]
SshPublicKey = Annotated[str, AfterValidator(check_ssh_key)]
PasswordHash = Annotated[str, AfterValidator(_password_hash)]


# ---------------------------------------------------------------- host files


class HostPathMarker:
    """Marks a field as a host file a step reads (``StepBase.host_files()`` finds them by it)."""


HOST_PATH = HostPathMarker()


def checks_host_files(info: ValidationInfo) -> bool:
    """Whether this validation checks host files (a ``base_dir`` in the context)."""
    return isinstance(info.context, dict) and info.context.get(BASE_DIR) is not None


def resolve_host_path(value: str, base_dir: str | os.PathLike[str] | None) -> Path:
    """``value`` as an absolute, normalised path: relative to ``base_dir`` (default: the current directory)."""
    p = Path(value)
    if not p.is_absolute():
        p = Path(base_dir if base_dir is not None else os.getcwd()).absolute() / p
    return Path(os.path.normpath(p))


def host_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a host file, or None when it can."""
    if not path.exists():
        return f"host file {path} does not exist"
    if not path.is_file():
        return f"host file {path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"host file {path} is not readable"
    return None


def _host_path(value: str, info: ValidationInfo) -> str:
    if not value:
        raise ValueError("expected the path of a file on this host")
    base = info.context.get(BASE_DIR) if isinstance(info.context, dict) else None
    path = resolve_host_path(value, base)
    if checks_host_files(info):
        problem = host_file_problem(path)
        if problem:
            raise ValueError(problem)
    if base is not None and isinstance(info.context, dict) and info.context.get(CONFINED):
        root = Path(base).resolve()
        real = Path(os.path.realpath(path))
        if real != root and root not in real.parents:
            raise ValueError(f"'{value}' is outside the recipe's folder {root} (confined: host files only from "
                             "the recipe's own folder, symbolic links included)")
    return str(path)


HostPath = Annotated[str, HOST_PATH, AfterValidator(_host_path)]
