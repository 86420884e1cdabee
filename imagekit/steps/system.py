"""System steps: hostname, timezone, locale, cloud-init, selinux-relabel.

Each writes the guest's own configuration files the way the distribution's tools
would (``/etc/hostname`` and ``/etc/hosts``, the ``/etc/localtime`` link,
``/etc/locale.conf`` and ``/etc/default/locale``, drop-ins in
``/etc/cloud/cloud.cfg.d``). Names are checked when the recipe is validated: host
names per RFC 1123, timezone and locale names, datasource names.

``hostname`` and ``timezone`` also apply to Windows guests (the registry, through
``imagekit.steps.windows``): the computer name (at most 15 characters, checked in a
Windows recipe) and the TCP/IP host name; the time zone named the IANA way, mapped to
Windows' name and set from the guest's own definition of it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator

from imagekit.steps.base import StepBase, StepContext, StepFailure, StepOutcome
from imagekit.steps.fields import OS_TYPE, Datasource, Hostname, Locale, Timezone

LINUX_AND_WINDOWS = frozenset({"linux", "windows"})
NETBIOS_MAX = 15

log = logging.getLogger("imagekit.customise")


class HostnameStep(StepBase):
    """hostname: write /etc/hostname and the 127.0.1.1 line of /etc/hosts (Debian family, or
    when the guest already has such a line)."""

    OS_TYPES = LINUX_AND_WINDOWS

    op: Literal["hostname"]
    hostname: Hostname

    @field_validator("hostname")
    @classmethod
    def _windows_length(cls, v: str, info: ValidationInfo) -> str:
        os_type = info.context.get(OS_TYPE) if isinstance(info.context, dict) else None
        if os_type == "windows" and len(v.split(".")[0]) > NETBIOS_MAX:
            raise ValueError(f"a Windows computer name has at most {NETBIOS_MAX} characters ('{v.split('.')[0]}')")
        return v

    def windows(self, ctx: StepContext) -> StepOutcome:
        from imagekit.steps.windows import set_hostname

        if len(self.hostname.split(".")[0]) > NETBIOS_MAX:
            raise StepFailure(f"a Windows computer name has at most {NETBIOS_MAX} characters")
        return set_hostname(ctx, self.hostname)

    def linux(self, ctx: StepContext) -> StepOutcome:
        s = ctx.session
        name = self.hostname
        short = name.split(".")[0]
        s.write_text("/etc/hostname", name + "\n")
        entry = f"127.0.1.1\t{name}" + (f" {short}" if short != name else "")
        lines = s.read_text_or("/etc/hosts").splitlines()
        found = False
        for i, line in enumerate(lines):
            if line.split() and line.split()[0] == "127.0.1.1":
                lines[i] = entry
                found = True
        if not found and ctx.debian_like():
            lines.append(entry)
            found = True
        if found:
            s.write_text("/etc/hosts", "\n".join(lines) + "\n")
        return StepOutcome(f"hostname {name}" + (" (and /etc/hosts)" if found else ""))


class TimezoneStep(StepBase):
    """timezone: point /etc/localtime at /usr/share/zoneinfo/ZONE (relative symlink, as
    timedatectl does) and write /etc/timezone on Debian-family guests."""

    OS_TYPES = LINUX_AND_WINDOWS

    op: Literal["timezone"]
    timezone: Timezone

    @field_validator("timezone")
    @classmethod
    def _windows_zone(cls, v: str, info: ValidationInfo) -> str:
        os_type = info.context.get(OS_TYPE) if isinstance(info.context, dict) else None
        if os_type == "windows":
            from imagekit.windows.timezones import UnknownTimezone, windows_name

            try:
                windows_name(v)
            except UnknownTimezone as exc:
                raise ValueError(str(exc)) from None
        return v

    def windows(self, ctx: StepContext) -> StepOutcome:
        from imagekit.steps.windows import set_timezone

        return set_timezone(ctx, self.timezone)

    def linux(self, ctx: StepContext) -> StepOutcome:
        s = ctx.session
        zone = self.timezone
        if not s.is_file(f"/usr/share/zoneinfo/{zone}"):
            raise StepFailure(f"timezone '{zone}' is not in the guest's /usr/share/zoneinfo",
                              "check the name (e.g. Europe/Paris, UTC) or install tzdata first")
        if s.exists("/etc/localtime") or s.g.is_symlink("/etc/localtime"):
            s.g.rm_f("/etc/localtime")
        s.g.ln_s(f"../usr/share/zoneinfo/{zone}", "/etc/localtime")
        if ctx.debian_like() or s.exists("/etc/timezone"):
            s.write_text("/etc/timezone", zone + "\n")
        return StepOutcome(f"timezone {zone}")


class LocaleStep(StepBase):
    """locale: set the system locale (LANG) in /etc/locale.conf and, on Debian-family guests,
    /etc/default/locale; when the guest has locale-gen, the locale is also generated."""

    op: Literal["locale"]
    locale: Locale

    def _generate(self, ctx: StepContext) -> tuple[str, str]:
        """locale-gen the locale when the guest can; (note for the summary, output)."""
        s, loc = ctx.session, self.locale
        if loc in ("C", "POSIX", "C.UTF-8", "C.utf8"):
            return "", ""
        if s.is_file("/etc/locale.gen") and ctx.has_any("/usr/sbin/locale-gen", "/sbin/locale-gen"):
            charset = (loc.split(".", 1)[1] if "." in loc else "ISO-8859-1").split("@")[0]
            line = f"{loc} {charset}"
            gen = [ln for ln in s.read_text("/etc/locale.gen").splitlines() if ln.strip().lstrip("#").strip() != line]
            gen.append(line)
            s.write_text("/etc/locale.gen", "\n".join(gen) + "\n")
            return " (generated)", ctx.sh("locale-gen", 600, "locale-gen")
        if ctx.has_any("/usr/bin/localedef"):
            return " (not generated: the guest has no locale-gen; install the locales package)", ""
        return " (not generated: the guest has no locale tools)", ""

    def linux(self, ctx: StepContext) -> StepOutcome:
        s, loc = ctx.session, self.locale
        s.write_text("/etc/locale.conf", f"LANG={loc}\n")
        files = ["/etc/locale.conf"]
        if ctx.debian_like():
            s.write_text("/etc/default/locale", f"LANG={loc}\n")
            files.append("/etc/default/locale")
        note, out = self._generate(ctx)
        return StepOutcome(f"locale {loc} in {', '.join(files)}{note}", out)


class CloudInitStep(StepBase):
    """cloud-init: write the datasource list and extra configuration as drop-ins in
    /etc/cloud/cloud.cfg.d/ (95_imagekit_datasources.cfg, 96_imagekit.cfg: after the distro's 90_*)."""

    op: Literal["cloud-init"]
    datasources: list[Datasource] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)

    def linux(self, ctx: StepContext) -> StepOutcome:
        s = ctx.session
        if not s.is_dir("/etc/cloud"):
            raise StepFailure("cloud-init is not installed in the guest (no /etc/cloud)",
                              "add an install step for cloud-init before this one")
        s.g.mkdir_p("/etc/cloud/cloud.cfg.d")
        written = []
        if self.datasources:
            path = "/etc/cloud/cloud.cfg.d/95_imagekit_datasources.cfg"
            s.write_text(path, "# written by imagekit\ndatasource_list: [ " + ", ".join(self.datasources) + " ]\n")
            s.g.chmod(0o644, path)
            written.append(path)
        if self.config:
            path = "/etc/cloud/cloud.cfg.d/96_imagekit.cfg"
            s.write_text(path, "#cloud-config\n# written by imagekit\n" + yaml.safe_dump(self.config, sort_keys=False))
            s.g.chmod(0o644, path)
            written.append(path)
        if not written:
            return StepOutcome("nothing to configure")
        return StepOutcome(f"cloud-init: wrote {', '.join(written)}")


class SelinuxRelabelStep(StepBase):
    """selinux-relabel: on an SELinux guest, relabel every file now with setfiles (the guest's
    file_contexts); if that is not possible, create /.autorelabel so the guest relabels at the
    next boot. Other guests: nothing to do. Put it after the steps that write files."""

    op: Literal["selinux-relabel"]

    def linux(self, ctx: StepContext) -> StepOutcome:
        s = ctx.session
        cfg = s.read_text_or("/etc/selinux/config")
        values = dict(ln.split("=", 1) for ln in cfg.splitlines() if "=" in ln and not ln.lstrip().startswith("#"))
        mode = values.get("SELINUX", "").strip()
        if not cfg or mode == "disabled":
            return StepOutcome("not an SELinux guest: nothing to relabel")
        policy = values.get("SELINUXTYPE", "targeted").strip() or "targeted"
        spec = f"/etc/selinux/{policy}/contexts/files/file_contexts"
        if s.is_file(spec):
            try:
                s.g.selinux_relabel(spec, "/", force=True)
                return StepOutcome(f"relabelled all files with setfiles ({policy} policy)")
            except RuntimeError as exc:
                log.info("setfiles failed (%s): falling back to /.autorelabel", exc)
        s.g.touch("/.autorelabel")
        return StepOutcome("created /.autorelabel (the guest relabels at its next boot)")


STEPS: tuple[type[StepBase], ...] = (HostnameStep, TimezoneStep, LocaleStep, CloudInitStep, SelinuxRelabelStep)
