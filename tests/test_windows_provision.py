"""The provisioning script and cloudbase-init's files.

The configuration files are validated against cloudbase-init's own option definitions (its PyPI
package, a test dependency): ``oslo-config-validator`` with cloudbase-init's and oslo.log's
namespaces, and every plugin and metadata service path against the classes its source defines.
The option table imagekit ships is the one generated from that package. A recipe adding an
unknown option or a misspelt plugin path is refused when it is validated (cloudbase-init would
skip the plugin silently), and cloudbase-init's validator agrees that those are wrong.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagekit import recipe as rec
from imagekit.errors import RecipeError
from imagekit.windows import cbinit, provision
from tests import windows_cbinit
from tests.conftest import ROOT

VALIDATOR = Path(sys.executable).parent / "oslo-config-validator"


def validate(text: str, tmp_path: Path, name: str = "x.conf") -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(text)
    return subprocess.run([str(VALIDATOR), "--namespace", "cloudbaseinit.conf", "--namespace", "oslo.log",
                           "--input-file", str(path)], capture_output=True, text=True, timeout=120)


def test_the_shipped_table_is_cloudbase_inits_own() -> None:
    table = (ROOT / "imagekit/windows/cbinit_table.py").read_text()
    assert table == windows_cbinit.render_table(), "regenerate with: python -m tests.windows_cbinit"


@pytest.mark.skipif(not VALIDATOR.exists(), reason="oslo-config-validator is not installed")
def test_both_files_pass_cloudbase_inits_validator(tmp_path: Path) -> None:
    o = cbinit.CloudbaseInitOptions(username="Administrator", extra={"real_time_clock_utc": "false",
                                                                      "openstack.add_metadata_private_ip_route": "true"})
    plugins = set(windows_cbinit.plugin_classes())
    services = set(windows_cbinit.metadata_service_classes())
    for name, text in (("cloudbase-init.conf", cbinit.service_conf(o)),
                       ("cloudbase-init-unattend.conf", cbinit.unattend_conf(o))):
        res = validate(text, tmp_path, name)
        assert res.returncode == 0, res.stdout + res.stderr
        cp = configparser.ConfigParser(interpolation=None)
        cp.read_string(text)
        d = cp["DEFAULT"]
        assert d["username"] == "Administrator" and d["first_logon_behaviour"] == "no"
        assert d["logging_serial_port_settings"].startswith("COM1,")
        assert d["local_scripts_path"].endswith("LocalScripts\\")
        assert cp["openstack"]["add_metadata_private_ip_route"] == "true"
        assert set(d["plugins"].split(",")) <= plugins, "a plugin path cloudbase-init does not define"
        assert set(d["metadata_services"].split(",")) <= services
    unattended = configparser.ConfigParser(interpolation=None)
    unattended.read_string(cbinit.unattend_conf(o))
    assert unattended["DEFAULT"]["plugins"].split(",") == list(cbinit.UNATTEND_PLUGINS)
    assert unattended["DEFAULT"]["allow_reboot"] == "false"


@pytest.mark.skipif(not VALIDATOR.exists(), reason="oslo-config-validator is not installed")
def test_cloudbase_inits_validator_and_imagekit_refuse_the_same_keys(tmp_path: Path) -> None:
    bad = "[DEFAULT]\nverbose=true\nusernme=Admin\n"
    res = validate(bad, tmp_path)
    assert res.returncode != 0 and "verbose" in res.stderr and "usernme" in res.stderr
    problems = cbinit.problems({"verbose": "true", "usernme": "Admin"})
    assert any("no option 'verbose'" in p for p in problems)
    assert any("'usernme'" in p and "did you mean username" in p for p in problems)


def test_values_are_checked_for_kind_choices_and_class_paths() -> None:
    assert cbinit.problems({"retry_count": "3", "first_logon_behaviour": "always", "ec2.https_allow_insecure": "no"}) \
        == []
    problems = cbinit.problems({"retry_count": "three", "first_logon_behaviour": "sometimes",
                                "inject_user_password": "maybe", "nowhere.key": "1",
                                "plugins": "cloudbaseinit.plugins.common.mtu.MTUPlugn"})
    assert [p.split(":")[0] for p in problems] == ["retry_count", "first_logon_behaviour", "inject_user_password",
                                                   "nowhere.key", "plugins"]
    assert "did you mean cloudbaseinit.plugins.common.mtu.MTUPlugin" in problems[-1]
    with pytest.raises(ValueError, match="verbose"):
        cbinit.service_conf(cbinit.CloudbaseInitOptions(extra={"verbose": "true"}))


def _recipe(tmp_path: Path, cloudbase: str) -> Path:
    text = (ROOT / "recipes/windows-server-2022.yaml").read_text()
    text = text.replace("    user: Admin                   # glance os_admin_user follows (Nova resets this user's "
                        "password)\n", cloudbase)
    path = tmp_path / "w.yaml"
    path.write_text(text)
    return path


def test_recipe_with_unknown_option_or_misspelt_plugin_is_refused(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "    config: {verbose: 'true', real_time_clock_utc: 'false'}\n"
                             "    plugins: [cloudbaseinit.plugins.common.sethostname.SetHostNamePlugin,\n"
                             "              cloudbaseinit.plugins.windows.extendvolumes.ExtendVolumePlugin]\n")
    with pytest.raises(RecipeError) as err:
        rec.load(path)
    problems = err.value.problems
    assert any(p.startswith("build.cloudbase_init.config") and "no option 'verbose'" in p for p in problems), problems
    assert any(p.startswith("build.cloudbase_init.plugins") and "ExtendVolumePlugin" in p
               and "did you mean cloudbaseinit.plugins.windows.extendvolumes.ExtendVolumesPlugin" in p
               for p in problems), problems
    good = _recipe(tmp_path, "    user: Administrator\n    config: {real_time_clock_utc: 'false'}\n")
    r = rec.load(good)
    assert r.build.cloudbase_init.user == "Administrator"  # type: ignore[attr-defined]


def script(**kw: object) -> str:
    opts: dict[str, object] = dict(cloudbase=cbinit.CloudbaseInitOptions(), rdp=True, client=False)
    opts.update(kw)
    return provision.script(provision.ProvisionOptions(**opts))  # type: ignore[arg-type]


def test_script_announces_every_stage_in_order_and_ends_with_sysprep() -> None:
    text = script(user_script=True)
    assert "\n" not in text.replace("\r\n", "")  # CRLF throughout
    order = [text.index(f"Set-Stage '{s}'") for s in provision.STAGES]
    assert order == sorted(order)
    assert f"Send-Serial \"{provision.STAGE_MARKER} $Name\"" in text
    assert f"\"{provision.FAILED_MARKER} \"" in text  # the trap reports any error on COM1
    sysprep = text[text.index("Set-Stage 'sysprep'"):]
    for arg in ("'/generalize'", "'/oobe'", "'/shutdown'", "conf\\Unattend.xml"):
        assert arg in sysprep
    assert "Sysprep.exe" in sysprep and "did not shut the machine down" in sysprep
    assert "pnputil.exe" in text and "'/add-driver'" in text and "'/install'" in text
    assert "qemu-ga-x86_64.msi" in text and "SetSetupComplete.cmd" in text


def test_script_installs_cloudbase_init_with_explicit_properties() -> None:
    text = script(cloudbase=cbinit.CloudbaseInitOptions(username="Administrator", groups=("Administrators", "Users")))
    for prop in ("'USERNAME=\"Administrator\"'", "'USERGROUPS=\"Administrators,Users\"'",
                 "'INJECTMETADATAPASSWORD=TRUE'", "'LOGGINGSERIALPORTNAME=COM1'", "'RUN_SERVICE_AS_LOCAL_SYSTEM=1'"):
        assert prop in text
    assert "cloudbase-init\\cloudbase-init.conf" in text and "cloudbase-init\\cloudbase-init-unattend.conf" in text


def test_script_remote_desktop_user_script_and_desktop_cleanup() -> None:
    on, off = script(rdp=True), script(rdp=False)
    assert "fDenyTSConnections -Value 0" in on and "Enable-NetFirewallRule -Group '@FirewallAPI.dll,-28752'" in on
    assert "fDenyTSConnections -Value 1" in off and "Disable-NetFirewallRule" in off
    assert "Set-Stage 'user-script'" not in script() and "user.ps1" in script(user_script=True)
    assert "$Client = $true" in script(client=True) and "$Client = $false" in script(client=False)
    assert "Remove-AppxPackage" in on  # desktops: per-user packages make sysprep fail
    assert "DefaultPassword" in on and "Panther\\unattend.xml" in on  # no build password left behind


def test_first_logon_command_finds_the_script_on_any_drive() -> None:
    cmd = provision.provision_command()
    assert cmd.startswith("powershell.exe ") and "-ExecutionPolicy Bypass" in cmd
    assert "Get-PSDrive -PSProvider FileSystem" in cmd and "imagekit\\provision.ps1" in cmd


@pytest.mark.skipif(shutil.which("pwsh") is None, reason="PowerShell (pwsh) is not installed to parse the script")
def test_script_parses_in_powershell(tmp_path: Path) -> None:
    path = tmp_path / "provision.ps1"
    path.write_text(script(user_script=True, client=True))
    check = ("$e = $null; [void][System.Management.Automation.Language.Parser]::ParseFile("
             f"'{path}', [ref]$null, [ref]$e); if ($e) {{ $e; exit 1 }}")
    res = subprocess.run(["pwsh", "-NoProfile", "-Command", check], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
