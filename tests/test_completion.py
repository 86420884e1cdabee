"""Shell completion (click's ``_IMAGEKIT_COMPLETE``): the scripts for bash, zsh and fish are
produced, and the shells themselves (bash, fish) complete a subcommand, a recipe name and a
choice through them; zsh's side of the protocol is checked as the script calls it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """PATH with an ``imagekit`` that runs this checkout's code (what the scripts call on TAB)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "imagekit"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m imagekit "$@"\n')
    exe.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))


def script(shell: str, env: dict[str, str]) -> str:
    proc = subprocess.run(["imagekit"], env={**env, "_IMAGEKIT_COMPLETE": f"{shell}_source"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bash_completes_commands_recipes_and_choices(shell_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "imagekit.bash"
    source.write_text(script("bash", shell_env))
    probe = f"""
source {source}
complete -p imagekit
ask() {{ COMPREPLY=(); COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); _imagekit_completion imagekit; echo "${{COMPREPLY[*]}}"; }}
ask imagekit bui
ask imagekit build deb
ask imagekit recipes show ubu
ask imagekit recipes show linux
ask imagekit recipes ''
ask imagekit --accel ''
"""
    proc = subprocess.run(["bash", "-c", probe], env=shell_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "complete -o nosort -F _imagekit_completion imagekit"
    assert lines[1:] == ["build", "debian-12", "ubuntu-22.04 ubuntu-24.04",
                         "",  # linux-base is abstract: not offered
                         "list new show validate", "auto kvm tcg"], proc.stdout


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed (make setup installs it)")
def test_fish_completes_commands_and_recipes(shell_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "imagekit.fish"
    source.write_text(script("fish", shell_env))
    probe = (f"source {source}; complete -C 'imagekit bui'; echo SEP; complete -C 'imagekit build deb'; echo SEP; "
             "complete -C 'imagekit customise disk.qcow2 --recipe ubuntu-2'")
    proc = subprocess.run(["fish", "--no-config", "-c", probe], env=shell_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    groups = [[line.split("\t")[0] for line in g.strip().splitlines()] for g in proc.stdout.split("SEP\n")]
    assert groups == [["build"], ["debian-12"], ["ubuntu-22.04", "ubuntu-24.04"]], proc.stdout
    assert "debian-12\tDebian 12" in proc.stdout  # with the recipe's description


def test_zsh_script_and_protocol(shell_env: dict[str, str]) -> None:
    text = script("zsh", shell_env)
    assert text.startswith("#compdef imagekit") and "_IMAGEKIT_COMPLETE=zsh_complete imagekit" in text
    # what the script runs on TAB: type, value, description triples
    proc = subprocess.run(["imagekit"], env={**shell_env, "_IMAGEKIT_COMPLETE": "zsh_complete",
                                             "COMP_WORDS": "imagekit recipes validate cen", "COMP_CWORD": "3"},
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines()[:3] == ["plain", "centos7", "CentOS 7.9 (2009) GenericCloud image with vault "
                                                                "repositories"], proc.stdout


def test_paths_complete_as_files(shell_env: dict[str, str]) -> None:
    proc = subprocess.run(["imagekit"], env={**shell_env, "_IMAGEKIT_COMPLETE": "bash_complete",
                                             "COMP_WORDS": "imagekit build ./my", "COMP_CWORD": "2"},
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["file,./my"]  # the shell completes file names itself
