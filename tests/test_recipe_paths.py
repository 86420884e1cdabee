"""Where recipes and elements are found: IMAGEKIT_RECIPE_PATH, then ./recipes, then
~/.config/imagekit/recipes, then the shipped ones (each recipe's origin shown by ``recipes list``);
``recipes new NAME --from R`` writes a starting recipe and never overwrites or hides one; the
shipped diskimage-builder elements are on ELEMENTS_PATH after the user's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagekit import paths
from imagekit import recipe as rec
from imagekit.builders.dib import element_paths
from tests.conftest import ROOT


def write(folder: Path, name: str, description: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.yaml"
    p.write_text(f"extends: debian-12\nname: {name}\ndescription: {description}\n")
    return p


@pytest.fixture
def layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's world: a working folder with recipes/, a config folder, and IMAGEKIT_RECIPE_PATH;
    the same name in several of them."""
    work = tmp_path / "work"
    write(work / "recipes", "mine", "from ./recipes")
    write(work / "recipes", "both", "from ./recipes")
    write(work / "recipes", "centos7", "a local centos7 that hides the shipped one")
    write(tmp_path / "config" / "imagekit" / "recipes", "both", "from the config folder")
    write(tmp_path / "config" / "imagekit" / "recipes", "user-only", "from the config folder")
    write(tmp_path / "env1", "both", "from IMAGEKIT_RECIPE_PATH")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("IMAGEKIT_RECIPE_PATH", f"{tmp_path / 'env1'}:{tmp_path / 'missing'}")
    monkeypatch.chdir(work)
    return tmp_path


def test_search_order_and_origins(layers: Path) -> None:
    dirs = paths.recipe_dirs()
    assert [d.origin for d in dirs] == ["env", "env", "./recipes", "user", "shipped"]
    assert dirs[-1].path == ROOT / "recipes"  # in a checkout: its top-level recipes/
    found = {r.name: r for r in rec.list_recipes()}
    assert found["both"].origin == "env" and found["both"].data["description"] == "from IMAGEKIT_RECIPE_PATH"
    assert found["mine"].origin == "./recipes" and found["user-only"].origin == "user"
    assert found["centos7"].origin == "./recipes"  # first match wins, shipped ones too
    assert found["debian-12"].origin == "shipped" and found["linux-base"].origin == "shipped"
    assert rec.load("both").description == "from IMAGEKIT_RECIPE_PATH"
    assert rec.load("user-only").build.method == "dib"  # extends the shipped debian-12


def test_recipes_list_shows_origins(layers: Path, imagekit) -> None:
    rows = {r["name"]: r for r in imagekit("--json", "recipes", "list", cwd=str(layers / "work")).json()["recipes"]}
    assert (rows["both"]["origin"], rows["mine"]["origin"], rows["user-only"]["origin"],
            rows["ubuntu-24.04"]["origin"]) == ("env", "./recipes", "user", "shipped")
    assert rows["mine"]["path"] == "recipes/mine.yaml"
    text = imagekit("recipes", "list", cwd=str(layers / "work")).out
    line = next(x for x in text.splitlines() if x.startswith("user-only "))
    assert line.split()[:3] == ["user-only", "dib", "user"]


def test_in_the_checkout_its_recipes_are_the_shipped_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # ./recipes is the shipped folder itself: listed once, first, as shipped
    assert [(d.path.resolve(), d.origin) for d in paths.recipe_dirs()] == [
        (ROOT / "recipes", "shipped"), ((paths.config_dir() / "recipes").resolve(), "user")]
    assert {r.origin for r in rec.list_recipes()} == {"shipped"}


def test_recipes_new_writes_a_starting_recipe(tmp_path: Path, imagekit) -> None:
    made = imagekit("--json", "recipes", "new", "web", "--from", "debian-12", cwd=str(tmp_path))
    assert made.code == 0, made.err
    doc = made.json()
    assert doc["path"] == "recipes/web.yaml" and doc["found_by_name"] is True
    assert doc["extends"] == "debian-12" and doc["extends_origin"] == "shipped"
    text = (tmp_path / "recipes" / "web.yaml").read_text()
    assert "extends: debian-12\nname: web\n" in text and "# customise+:" in text
    shown = imagekit("recipes", "show", "web", "--json", cwd=str(tmp_path)).json()
    debian = imagekit("recipes", "show", "debian-12", "--json").json()
    assert shown["name"] == "web" and shown["build"] == debian["build"] and shown["customise"] == debian["customise"]
    human = imagekit("recipes", "new", "api", "--from", "web", "--dir", "elsewhere", cwd=str(tmp_path))
    assert human.code == 0 and "imagekit build elsewhere/api.yaml" in human.out  # not in the search path
    assert "extends: web" in (tmp_path / "elsewhere" / "api.yaml").read_text()


@pytest.mark.parametrize(("args", "code", "message"), [
    (["web", "--from", "debian-12"], 1, "recipes/web.yaml already exists; it was not changed"),
    (["centos7", "--from", "debian-12"], 2, "a recipe named 'centos7' already exists"),
    (["web2", "--from", "debian12"], 2, "no recipe named 'debian12'"),
    (["web2", "--from", "linux-base"], 2, "'linux-base' is abstract"),
    (["Web", "--from", "debian-12"], 2, "'Web' is not a recipe name"),
    (["../up", "--from", "debian-12"], 2, "'../up' is not a recipe name"),
    (["web2"], 2, "Missing option '--from'"),
])
def test_recipes_new_refuses(tmp_path: Path, imagekit, args: list[str], code: int, message: str) -> None:
    existing = tmp_path / "recipes" / "web.yaml"
    existing.parent.mkdir()
    existing.write_text("# mine, hand-written\n")
    r = imagekit("--json", "recipes", "new", *args, cwd=str(tmp_path))
    assert r.code == code, r.err
    assert message in r.err and json.loads(r.out)["ok"] is False
    assert existing.read_text() == "# mine, hand-written\n"
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == ["web.yaml"]  # nothing else, no temporary
    assert not (tmp_path / "up.yaml").exists()


def test_recipes_new_from_an_invalid_recipe_writes_nothing(tmp_path: Path, imagekit) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "broken.yaml").write_text("name: broken\ndescription: x\nos: {type: bsd}\n")
    r = imagekit("recipes", "new", "fixed", "--from", "broken", cwd=str(tmp_path))
    assert r.code == 2 and "does not validate" in r.err and "os.type" in r.err
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == ["broken.yaml"]


def test_elements_user_first_then_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "elements"
    (mine / "my-element").mkdir(parents=True)
    monkeypatch.setenv("IMAGEKIT_ELEMENTS_PATH", str(mine))
    got = element_paths([tmp_path / "extra"])
    assert got == [tmp_path / "extra", mine, ROOT / "elements"]  # earlier folders override later ones in DIB
    assert (got[-1] / "imagekit-openstack" / "element-deps").is_file()
    monkeypatch.setenv("IMAGEKIT_ELEMENTS_PATH", str(ROOT / "elements"))
    assert element_paths() == [ROOT / "elements"]  # each folder once
