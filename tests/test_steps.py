"""Customise steps as recipe models: every check a step makes is done when the recipe is
loaded (so ``imagekit recipes validate`` finds it, before anything is built), each problem
named with the step's path; host files resolve against the recipe's folder, whatever the
current directory; the registry is consistent. No appliance is launched here."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from imagekit import recipe, recipe_errors
from imagekit.errors import RecipeError
from imagekit.steps import (
    FAMILIES,
    REGISTRY,
    STEP_CLASSES,
    Step,
    StepBase,
    host_file_digests,
    parse_step_texts,
    secrets_of,
)

HEAD = """\
name: tiny
description: a small test recipe
os: {type: linux, distro: debian, version: "12"}
build: {method: dib, elements: [vm]}
disk_size: 2G
"""
WINDOWS_HEAD = """\
name: win
description: a windows recipe
os: {type: windows, distro: windows, version: "2022"}
build:
  method: windows
  image_name: W
  install_media: {url: http://127.0.0.1/w.iso, trust: first-use}
  virtio_drivers: {url: http://127.0.0.1/v.iso, trust: first-use}
  cloudbase_init: {url: http://127.0.0.1/c.msi, trust: first-use}
disk_size: 20G
"""
HASH = "$6$imagekitTest$Wq3Jv8hT0d1PqZ8yqk2rV4mQdK0cPj9bWq2n6sE1bZ5aY7xO8uI3tR4eW5qP6oL7kJ8hG9fD0sA1zX2cV3bN4m"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKc0WnYdtYgrJ0U6M5bvOj2DqsyX4ErUeGxQiRcbeyRb alice@laptop"


def write_recipe(folder: Path, steps: str, head: str = HEAD, name: str = "r") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.yaml"
    p.write_text(head + "customise:\n" + textwrap.indent(textwrap.dedent(steps), "  "))
    return p


def problems_of(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe.load(path)
    assert info.value.exit_code == 2
    return info.value.problems or [info.value.message]


# ---------------------------------------------------------------- the three cases, through the CLI


@pytest.mark.parametrize(("step", "expected"), [
    ('{op: hostname, hostname: "a b"}', "customise[1].hostname: 'a b' is not a valid host name"),
    ("{op: run, command: 'true', timeout: forever}", "customise[1].timeout: 'forever' is not a duration"),
    ('{op: install, packages: ["x;y"]}', "customise[1].packages[0]: 'x;y' is not a package name"),
], ids=["hostname", "timeout", "package"])
def test_recipes_validate_refuses_bad_steps_before_any_build(imagekit, tmp_path: Path, step: str,
                                                              expected: str) -> None:
    path = write_recipe(tmp_path, f"- {{op: timezone, timezone: UTC}}\n- {step}\n")
    cache = tmp_path / "cache"
    r = imagekit("recipes", "validate", str(path), env={"IMAGEKIT_CACHE_DIR": str(cache)})
    assert r.code == 2, r.out + r.err
    assert expected in r.out, r.out
    assert r.err.startswith("error: 1 of 1 recipe invalid")
    assert not cache.exists() or not any(cache.rglob("*.qcow2")), "nothing is built by validation"
    j = imagekit("--json", "recipes", "validate", str(path), env={"IMAGEKIT_CACHE_DIR": str(cache)})
    assert j.code == 2
    first = json.loads(j.out[: j.out.index("\n}\n") + 3])  # the report (the error document follows it)
    assert any(expected in p for p in first["results"][0]["problems"])


# ---------------------------------------------------------------- every step's own checks


CASES = [
    ("relative guest path", "{op: write, path: etc/motd, content: x}", "customise[0].path: guest path 'etc/motd' must be absolute"),
    ("mode not octal", "{op: chmod, path: /etc/x, mode: '999'}", "customise[0].mode: '999' is not an octal mode"),
    ("mode too large", "{op: mkdir, path: /x, mode: '77777'}", "customise[0].mode: '77777' is not an octal mode"),
    ("unquoted mode", "{op: chmod, path: /etc/x, mode: 0644}", "customise[0].mode: write the mode as a quoted octal"),
    ("bad owner", "{op: chown, path: /etc/x, owner: 'al ice'}", "customise[0].owner: 'al ice' is not an owner"),
    ("owner of write", "{op: write, path: /x, content: x, owner: 'a:b:c'}", "customise[0].owner: 'a:b:c' is not an owner"),
    ("delete the root", "{op: delete, path: /}", "customise[0].path: refusing to delete the guest's root directory"),
    ("upload to a relative dest", "{op: upload, src: /etc/hostname, dest: opt/}", "customise[0].dest: guest path 'opt/' must be absolute"),
    ("duration without unit", "{op: run, command: 'true', timeout: '10x'}", "customise[0].timeout: '10x' is not a duration"),
    ("zero timeout", "{op: script, content: 'true', timeout: 0s}", "customise[0].timeout: '0s' is not a positive duration"),
    ("script neither file nor content", "{op: script}", "customise[0]: give exactly one of file or content"),
    ("firstboot both", "{op: firstboot, command: a, script: b}", "customise[0]: give exactly one of command or script"),
    ("package with a space", "{op: uninstall, packages: [vim, 'a b']}", "customise[0].packages[1]: 'a b' is not a package name"),
    ("no packages", "{op: install, packages: []}", "customise[0].packages: must not be empty"),
    ("unit name", "{op: services, enable: ['ssh;reboot']}", "customise[0].enable[0]: 'ssh;reboot' is not a systemd unit name"),
    ("masked unit name", "{op: services, mask: ['a b']}", "customise[0].mask[0]: 'a b' is not a systemd unit name"),
    ("user name", "{op: user, name: Alice}", "customise[0].name: 'Alice' is not a valid user name"),
    ("group name", "{op: user, name: alice, groups: ['wheel group']}", "customise[0].groups[0]: 'wheel group' is not a valid group name"),
    ("plain password", "{op: user, name: alice, password_hash: hunter2}", "customise[0].password_hash: password_hash must be a crypt(3) hash"),
    ("hash with a colon", "{op: root-password, hash: '$6$salt:x$abc'}", "customise[0]: hash is not a crypt(3) hash"),
    ("relative shell", "{op: user, name: alice, shell: bash}", "customise[0].shell: guest path 'bash' must be absolute"),
    ("private key", "{op: user, name: alice, ssh_keys: ['-----BEGIN OPENSSH PRIVATE KEY----- abc']}", "customise[0].ssh_keys[0]: this is a private key"),
    ("key of one word", "{op: ssh-key, key: ssh-ed25519}", "customise[0].key: an SSH public key is one line"),
    ("ssh-key user", "{op: ssh-key, user: 'bad user', key: '" + KEY + "'}", "customise[0].user: 'bad user' is not a valid user name"),
    ("ssh-key neither", "{op: ssh-key, user: root}", "customise[0]: give exactly one of key or key_file"),
    ("host name label", "{op: hostname, hostname: -web}", "customise[0].hostname: '-web' is not a valid host name"),
    ("host name too long", "{op: hostname, hostname: " + ".".join(["a" * 60] * 5) + "}", "is not a valid host name"),
    ("timezone", "{op: timezone, timezone: ../../etc/passwd}", "customise[0].timezone: '../../etc/passwd' is not a timezone name"),
    ("locale", "{op: locale, locale: 'en US'}", "customise[0].locale: 'en US' is not a locale name"),
    ("datasource", "{op: cloud-init, datasources: [OpenStack, 'Config Drive']}", "customise[0].datasources[1]: 'Config Drive' is not a cloud-init datasource name"),
    ("sysprep operation", "{op: sysprep, operations: [logs, everything]}", "customise[0].operations[1]: expected one of"),
]


@pytest.mark.parametrize(("label", "step", "expected"), CASES, ids=[c[0] for c in CASES])
def test_step_validation(tmp_path: Path, label: str, step: str, expected: str) -> None:
    problems = problems_of(write_recipe(tmp_path, f"- {step}\n"))
    assert any(expected in p for p in problems), f"{label}: {expected!r} not in {problems}"


def test_every_bad_step_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(write_recipe(tmp_path, """\
        - {op: hostname, hostname: "a b"}
        - {op: run, command: x, timeout: forever}
        - {op: install, packages: ["x;y"]}
        - {op: upload, src: files/missing, dest: /opt/}
        """))
    assert [p.split(":")[0] for p in problems] == ["customise[0].hostname", "customise[1].timeout",
                                                   "customise[2].packages[0]", "customise[3].src"], problems


def test_good_steps_pass(tmp_path: Path) -> None:
    r = recipe.load(write_recipe(tmp_path, f"""\
        - {{op: write, path: /etc/x, content: x, mode: '0640', owner: 'alice:adm'}}
        - {{op: chown, path: /srv, owner: ':1000'}}
        - {{op: root-password, hash: '{HASH}'}}
        - {{op: user, name: alice, groups: [adm], password_hash: '{HASH}', ssh_keys: ['{KEY}']}}
        - {{op: run, command: 'true', timeout: 1h30m}}
        - {{op: hostname, hostname: web01.example.org}}
        - {{op: timezone, timezone: America/Argentina/Buenos_Aires}}
        - {{op: locale, locale: de_DE.UTF-8@euro}}
        - {{op: services, enable: [getty@ttyS0.service]}}
        - {{op: install, packages: ['python3>=3.9', 'lib+foo', 'pkg:amd64']}}
        """))
    assert [s.op for s in r.customise][:3] == ["write", "chown", "root-password"]
    assert r.customise[4].timeout == "1h30m"  # type: ignore[attr-defined]


def test_step_that_does_not_apply_to_the_recipes_os(tmp_path: Path) -> None:
    # hostname has a Windows effect since issue 13: locale is still Linux-only
    problems = problems_of(write_recipe(tmp_path, "- {op: locale, locale: de_DE.UTF-8}\n- {op: sysprep}\n",
                                        head=WINDOWS_HEAD))
    assert "customise[0]: step 'locale' does not apply to windows guests (it applies to: linux)" in problems
    assert any(p.startswith("customise[1]: step 'sysprep' does not apply to windows guests") for p in problems)


def test_tag_equal_to_a_field_name_is_not_doubled() -> None:
    data = {"customise": [{"op": "hostname", "hostname": "a b"}]}
    assert recipe_errors.format_loc(("customise", 0, "hostname", "hostname"), data) == "customise[0].hostname"
    assert recipe_errors.format_loc(("hostname", "hostname"), data["customise"][0], "step[3]") == "step[3].hostname"
    build = {"build": {"method": "cloud-image", "base": {"url": "x"}}}
    assert recipe_errors.format_loc(("build", "cloud-image", "base", "sha256"), build) == "build.base.sha256"


# ---------------------------------------------------------------- host files


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "recipes" / "web"
    (folder / "files").mkdir(parents=True)
    (folder / "files" / "motd").write_text("welcome\n")
    (folder / "files" / "setup.sh").write_text("#!/bin/sh\necho hi\n")
    (folder / "files" / "key.pub").write_text(KEY + "\n")
    write_recipe(folder, """\
        - {op: upload, src: files/motd, dest: /etc/motd}
        - {op: script, file: ./files/../files/setup.sh}
        - {op: ssh-key, key_file: files/key.pub}
        """)
    return folder


def test_host_files_resolve_against_the_recipe_folder_from_any_cwd(recipe_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [str(recipe_dir / "files" / n) for n in ("motd", "setup.sh", "key.pub")]
    seen = []
    for cwd, ref in ((recipe_dir, "r.yaml"), (tmp_path, "recipes/web/r.yaml"), (Path("/"), str(recipe_dir / "r.yaml")),
                     (recipe_dir / "files", "../r.yaml")):
        monkeypatch.chdir(cwd)
        r = recipe.load(ref)
        seen.append([str(p) for s in r.customise for p in s.host_files()])
    assert seen == [expected] * 4
    assert r.customise[0].src == expected[0]  # type: ignore[attr-defined]


def test_missing_host_file_is_a_validation_error_with_the_path(recipe_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    (recipe_dir / "files" / "motd").unlink()
    (recipe_dir / "files" / "key.pub").write_text("ssh-ed25519\n")
    monkeypatch.chdir(tmp_path)
    problems = problems_of(recipe_dir / "r.yaml")
    assert f"customise[0].src: host file {recipe_dir}/files/motd does not exist" in problems
    assert any(p.startswith(f"customise[2]: key_file {recipe_dir}/files/key.pub: an SSH public key is one line")
               for p in problems), problems


def test_unreadable_or_non_file_host_file(recipe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    motd = recipe_dir / "files" / "motd"
    motd.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make access() answer as it would for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(motd) else real(p, mode, **kw))
    (recipe_dir / "files" / "setup.sh").unlink()
    (recipe_dir / "files" / "setup.sh").mkdir()
    problems = problems_of(recipe_dir / "r.yaml")
    assert f"customise[0].src: host file {motd} is not readable" in problems
    assert f"customise[1].file: host file {recipe_dir}/files/setup.sh is not a regular file" in problems


def test_host_file_digests_follow_the_content(recipe_dir: Path) -> None:
    steps = recipe.load(recipe_dir / "r.yaml").customise
    first = host_file_digests(steps)
    assert sorted(first) == sorted(str(recipe_dir / "files" / n) for n in ("motd", "setup.sh", "key.pub"))
    assert all(len(v) == 64 for v in first.values())
    assert host_file_digests(steps) == first
    (recipe_dir / "files" / "motd").write_text("welcome, changed\n")
    second = host_file_digests(recipe.load(recipe_dir / "r.yaml").customise)
    assert second[str(recipe_dir / "files" / "motd")] != first[str(recipe_dir / "files" / "motd")]
    assert {k: v for k, v in second.items() if not k.endswith("motd")} == \
        {k: v for k, v in first.items() if not k.endswith("motd")}


def test_inherited_steps_keep_the_folder_of_the_file_that_declared_them(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base, child = tmp_path / "base", tmp_path / "child"
    for folder, name in ((base, "a"), (child, "b")):
        (folder / "files").mkdir(parents=True)
        (folder / "files" / name).write_text(name)
    write_recipe(base, "- {op: upload, src: files/a, dest: /opt/}\n", head=HEAD.replace("name: tiny", "abstract: true"),
                 name="parent")
    (child / "c.yaml").write_text("extends: parent\nname: c\ncustomise+:\n  - {op: upload, src: files/b, dest: /opt/}\n")
    monkeypatch.setenv("IMAGEKIT_RECIPE_PATH", str(base))
    monkeypatch.chdir(tmp_path)
    r = recipe.load(child / "c.yaml")
    assert [s.host_files() for s in r.customise] == [(base / "files" / "a",), (child / "files" / "b",)]


# ---------------------------------------------------------------- --step texts


def test_parse_step_texts_resolves_against_the_given_folder(tmp_path: Path) -> None:
    (tmp_path / "payload").write_text("x")
    steps = parse_step_texts(['{"op": "upload", "src": "payload", "dest": "/opt/"}', "{op: hostname, hostname: w}"],
                             tmp_path)
    assert steps[0].host_files() == (tmp_path / "payload",) and steps[1].op == "hostname"


def test_parse_step_texts_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        parse_step_texts(["{op: upload, src: nope, dest: /opt/}", "{op: hostname, hostname: 'a b'}", "[1, 2]",
                          "{op: hostname", "{op: frobnicate}", "{op: mkdir, path: /x, mdoe: '0755'}"], tmp_path,
                         first_index=2)
    err = info.value
    assert err.exit_code == 2 and err.message == "--step: 6 problems"
    assert err.problems[0] == f"step[2].src: host file {tmp_path}/nope does not exist"
    assert err.problems[1] == "step[3].hostname: 'a b' is not a valid host name"
    assert err.problems[2].startswith("step[4]: expected a mapping")
    assert err.problems[3].startswith("step[5]: not valid JSON or YAML")
    assert err.problems[4].startswith("step[6]: unknown value 'frobnicate'")
    assert err.problems[5] == "step[7].mdoe: unknown key (did you mean 'mode'?)"


# ---------------------------------------------------------------- the registry and what steps carry


def test_registry_is_consistent() -> None:
    assert len(REGISTRY) == len(STEP_CLASSES) == 27  # 24 + the Windows family (registry, firstboot-powershell, rdp)
    for family in FAMILIES:
        for cls in family.STEPS:
            assert cls.__module__ == family.__name__
    for op, cls in REGISTRY.items():
        assert cls.op_name() == op
        assert (cls.__doc__ or "").startswith(f"{op}: "), f"{cls.__name__}: the docstring says what the step does"
        assert cls.NETWORK in ("no", "optional", "required")
        assert cls.OS_TYPES and cls.OS_TYPES <= {"linux", "windows"}
        for os_type in ("linux", "windows"):
            overridden = getattr(cls, os_type) is not getattr(StepBase, os_type)
            assert overridden == (os_type in cls.OS_TYPES), f"{op}: {os_type}() and OS_TYPES disagree"
    adapter = TypeAdapter(Step)
    assert type(adapter.validate_python({"op": "sparsify"})).__name__ == "SparsifyStep"


def test_network_needs() -> None:
    needs = {op: cls.NETWORK for op, cls in REGISTRY.items() if cls.NETWORK != "no"}
    assert needs == {"run": "optional", "script": "optional", "install": "required", "uninstall": "optional"}


def test_secrets_of_steps() -> None:
    steps = TypeAdapter(list[Step]).validate_python([
        {"op": "root-password", "hash": HASH}, {"op": "user", "name": "bob", "password_hash": HASH + "x"},
        {"op": "root-password", "locked": True}, {"op": "hostname", "hostname": "h"}])
    secrets = secrets_of(steps)
    assert sorted(secrets.values()) == sorted([HASH, HASH + "x"])
    assert secrets.scrub(f"usermod -p '{HASH}x' bob") == "usermod -p '****' bob"
