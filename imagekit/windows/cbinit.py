"""cloudbase-init's two configuration files, and the check of every option a recipe adds.

cloudbase-init runs twice in an image's life: during the ``specialize`` pass of the
first boot in the cloud (``cloudbase-init-unattend.conf``: only MTU, host name and
volume extension, no reboot) and then as a service at every boot
(``cloudbase-init.conf``: user, password, SSH keys, network, user data, local scripts).
Both files are written here with explicit values for what matters to an OpenStack image:
the user (``os_admin_user`` must name it), no forced password change at first log-on,
logging to COM1 (the instance's console log), the config drive and the metadata service.

A recipe may add options (``cloudbase_init.config``: ``key`` for ``[DEFAULT]``,
``group.key`` otherwise) and replace the plugin list; :func:`problems` checks them
against cloudbase-init's own definitions (``cbinit_table``, generated from its PyPI
package): an unknown key, a value of the wrong kind, a value outside the option's
choices or a misspelt plugin or metadata service path is refused when the recipe is
validated (cloudbase-init itself skips a plugin it cannot import, silently).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from imagekit.windows.cbinit_table import CHOICES, METADATA_SERVICES, OPTIONS, PLUGINS, USER_DATA_PLUGINS

INSTALL_DIR = "C:\\Program Files\\Cloudbase Solutions\\Cloudbase-Init"
LOCAL_SCRIPTS = INSTALL_DIR + "\\LocalScripts"
SERIAL = "COM1,115200,N,8"

_P = "cloudbaseinit.plugins."
_M = "cloudbaseinit.metadata.services."
SERVICE_PLUGINS: tuple[str, ...] = (
    _P + "windows.createuser.CreateUserPlugin",
    _P + "common.setuserpassword.SetUserPasswordPlugin",
    _P + "common.mtu.MTUPlugin",
    _P + "common.sethostname.SetHostNamePlugin",
    _P + "common.networkconfig.NetworkConfigPlugin",
    _P + "windows.ntpclient.NTPClientPlugin",
    _P + "common.sshpublickeys.SetUserSSHPublicKeysPlugin",
    _P + "windows.extendvolumes.ExtendVolumesPlugin",
    _P + "windows.licensing.WindowsLicensingPlugin",
    _P + "common.userdata.UserDataPlugin",
    _P + "common.localscripts.LocalScriptsPlugin",
)
UNATTEND_PLUGINS: tuple[str, ...] = (
    _P + "common.mtu.MTUPlugin",
    _P + "common.sethostname.SetHostNamePlugin",
    _P + "windows.extendvolumes.ExtendVolumesPlugin",
)
METADATA: tuple[str, ...] = (_M + "configdrive.ConfigDriveService", _M + "httpservice.HttpService")
_CLASS_LISTS = {"plugins": PLUGINS, "metadata_services": METADATA_SERVICES, "user_data_plugins": USER_DATA_PLUGINS}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class CloudbaseInitOptions:
    """What imagekit writes in both files (``extra``: the recipe's options, checked by :func:`problems`)."""

    username: str = "Admin"
    groups: tuple[str, ...] = ("Administrators",)
    plugins: tuple[str, ...] = SERVICE_PLUGINS
    metadata_services: tuple[str, ...] = METADATA
    extra: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- checks


def _split(key: str) -> tuple[str, str]:
    group, dot, name = key.rpartition(".")
    return (group if dot else "DEFAULT"), name


def _kind_problem(kind: str, value: str) -> str | None:
    v = value.strip()
    if kind == "bool" and v.lower() not in _TRUE + _FALSE:
        return f"'{value}' is not true or false"
    if kind == "int":
        try:
            int(v)
        except ValueError:
            return f"'{value}' is not an integer"
    if kind == "float":
        try:
            float(v)
        except ValueError:
            return f"'{value}' is not a number"
    return None


def class_problems(key: str, paths: Iterable[str]) -> list[str]:
    """Plugin or metadata service paths that cloudbase-init does not define (it would skip them silently)."""
    known = _CLASS_LISTS[key]
    out = []
    for p in paths:
        if p not in known:
            close = difflib.get_close_matches(p, sorted(known), n=1, cutoff=0.8)
            out.append(f"{key}: '{p}' is not a cloudbase-init class" + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def problems(options: Mapping[str, str]) -> list[str]:
    """Everything wrong with cloudbase-init options given as ``key`` / ``group.key`` -> value text."""
    out: list[str] = []
    for key, raw in options.items():
        group, name = _split(key)
        known = OPTIONS.get(group)
        if known is None:
            out.append(f"{key}: cloudbase-init has no option group '{group}' (groups: {', '.join(sorted(OPTIONS))})")
            continue
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            out.append(f"{key}: cloudbase-init has no option '{name}' in [{group}]"
                       + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        value = str(raw)
        bad = _kind_problem(known[name], value)
        if bad:
            out.append(f"{key}: {bad}")
        choices = CHOICES.get(f"{group}.{name}")
        if choices and value not in choices:
            out.append(f"{key}: '{value}' is not one of {', '.join(choices)}")
        if group == "DEFAULT" and name in _CLASS_LISTS:
            out.extend(class_problems(name, [p.strip() for p in value.split(",") if p.strip()]))
    return out


# ---------------------------------------------------------------- the files


def _ini(sections: Mapping[str, Mapping[str, str]]) -> str:
    lines: list[str] = ["# written by imagekit"]
    for group, values in sections.items():
        lines.append(f"[{group}]")
        # oslo.config substitutes $name in values: a literal $ is written $$
        lines.extend(f"{k}={v.replace('$', '$$')}" for k, v in values.items())
        lines.append("")
    return "\r\n".join(lines)


def _common(o: CloudbaseInitOptions, log_file: str) -> dict[str, str]:
    return {
        "username": o.username,
        "groups": ",".join(o.groups),
        "inject_user_password": "true",
        "first_logon_behaviour": "no",
        "bsdtar_path": INSTALL_DIR + "\\bin\\bsdtar.exe",
        "mtools_path": INSTALL_DIR + "\\bin\\",
        "debug": "true",
        "log_dir": INSTALL_DIR + "\\log\\",
        "log_file": log_file,
        "default_log_levels": "comtypes=INFO,suds=INFO,iso8601=WARN,requests=WARN",
        "logging_serial_port_settings": SERIAL,
        "mtu_use_dhcp_config": "true",
        "ntp_use_dhcp_config": "true",
        "local_scripts_path": LOCAL_SCRIPTS + "\\",
        "check_latest_version": "false",
        "metadata_services": ",".join(o.metadata_services),
    }


def _sections(base: dict[str, str], extra: Mapping[str, str]) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {"DEFAULT": base, "config_drive": {
        "types": "vfat,iso", "locations": "cdrom,hdd,partition"}}
    for key, value in extra.items():
        group, name = _split(key)
        sections.setdefault(group, {})[name] = str(value)
    return sections


def _checked(sections: Mapping[str, Mapping[str, str]], what: str) -> str:
    flat = {(k if g == "DEFAULT" else f"{g}.{k}"): v for g, vals in sections.items() for k, v in vals.items()}
    bad = problems(flat)
    if bad:
        raise ValueError(f"{what}: " + "; ".join(bad))
    return _ini(sections)


def service_conf(o: CloudbaseInitOptions) -> str:
    """``cloudbase-init.conf``: the service that runs at every boot."""
    base = _common(o, "cloudbase-init.log")
    base["plugins"] = ",".join(o.plugins)
    return _checked(_sections(base, o.extra), "cloudbase-init.conf")


def unattend_conf(o: CloudbaseInitOptions) -> str:
    """``cloudbase-init-unattend.conf``: the run during ``specialize`` (MTU, host name, volumes; no reboot)."""
    base = _common(o, "cloudbase-init-unattend.log")
    base.update(plugins=",".join(UNATTEND_PLUGINS), allow_reboot="false", stop_service_on_exit="false")
    return _checked(_sections(base, {k: v for k, v in o.extra.items() if _split(k)[1] != "plugins"}),
                    "cloudbase-init-unattend.conf")
