"""The CLI contract: version, --json everywhere, exit codes, error/hint format, no tracebacks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT


def test_version(imagekit) -> None:
    r = imagekit("--version")
    assert r.code == 0 and r.out.startswith("imagekit, version ")


def test_module_and_console_script_agree(imagekit) -> None:
    script = Path(sys.executable).parent / "imagekit"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True).stdout
    assert out == imagekit("--version").out


def test_recipes_list_text_and_json(imagekit) -> None:
    text = imagekit("recipes", "list")
    assert text.code == 0
    names = [line.split()[0] for line in text.out.splitlines()]
    assert {"centos7", "debian-12", "ubuntu-24.04", "ubuntu-22.04", "windows-server-2022"} <= set(names)
    assert "linux-base" not in names  # abstract recipes are not listed as buildable
    rows = imagekit("--json", "recipes", "list").json()["recipes"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["ubuntu-22.04"]["method"] == "cloud-image" and by_name["linux-base"]["abstract"] is True


def test_recipes_show_yaml_and_json(imagekit) -> None:
    r = imagekit("recipes", "show", "debian-12")
    assert r.code == 0 and "method: dib" in r.out and "name: debian-12" in r.out
    data = imagekit("recipes", "show", "ubuntu-22.04", "--json").json()
    assert data["build"]["base"]["url"].endswith("ubuntu-22.04-server-cloudimg-amd64.img")
    assert len(data["digest"]) == 64


def test_validate_all_shipped(imagekit) -> None:
    r = imagekit("--json", "recipes", "validate")
    assert r.code == 0, r.err
    data = r.json()
    assert data["ok"] and len(data["results"]) == 8  # 5 + windows-server-2019, windows-11, windows-10 (issue 13)


def test_validate_invalid_exits_2_with_every_problem(imagekit, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad\nos: {type: bsd}\ncustomise: [{op: install, packages: vim}]\n")
    r = imagekit("recipes", "validate", str(bad))
    assert r.code == 2
    assert "os.type: expected one of 'linux' or 'windows', got 'bsd'" in r.out
    assert "customise[0].packages: expected a list, got 'vim'" in r.out
    assert r.err.startswith("error: 1 of 1 recipe invalid") and "hint:" in r.err
    assert "Traceback" not in r.err
    j = imagekit("--json", "recipes", "validate", str(bad))
    assert j.code == 2
    first = json.loads(j.out[: j.out.index("\n}\n") + 3])
    assert first["ok"] is False and first["results"][0]["problems"]


def test_unknown_recipe_is_exit_2_with_hint(imagekit) -> None:
    r = imagekit("recipes", "show", "debian12")
    assert r.code == 2
    assert r.err.splitlines()[0] == "error: no recipe named 'debian12'"
    assert r.err.splitlines()[1] == "hint: did you mean debian-12?"
    j = imagekit("--json", "recipes", "show", "debian12")
    assert j.code == 2 and j.json()["error"]["message"] == "no recipe named 'debian12'"


def test_bad_usage_is_exit_2(imagekit) -> None:
    assert imagekit("no-such-command").code == 2
    assert imagekit("recipes", "show").code == 2
    assert imagekit("--accel", "xen", "recipes", "list").code == 2


def test_bad_accel_env_is_usage_error(imagekit) -> None:
    r = imagekit("doctor", "--no-appliance", env={"IMAGEKIT_ACCEL": "xen"})
    assert r.code == 2 and "unknown accelerator 'xen'" in r.err


def test_debug_shows_traceback(imagekit) -> None:
    r = imagekit("--debug", "recipes", "show", "nope")
    assert r.code == 2 and "Traceback" in r.err


def test_interrupt_exits_130(tmp_path: Path) -> None:
    """SIGINT during a command ends with 130 and no traceback."""
    code = (
        "import sys, time, click\n"
        "from imagekit import cli\n"
        "@cli.cli.command()\n"
        "def sleepy():\n"
        "    print('ready', flush=True); time.sleep(30)\n"
        "cli.main(['sleepy'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
