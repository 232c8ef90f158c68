"""The package's layering (issue 19): no import runs up a floor and none closes a cycle, checked with
scripts/import_map.py -- and that checker does catch a planted upward import, a lazy cycle and an unplaced
module in a tiny fake package; README names the floors in their order."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_map", ROOT / "scripts" / "import_map.py")
import_map = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_map)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake ``remedi`` package under tmp_path: {relative path: source}, with every __init__.py it needs."""
    root = tmp_path / "remedi"
    for rel, text in files.items():
        path = root / rel
        for folder in (root, *[root / p for p in Path(rel).parents if p != Path(".")]):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "__init__.py").touch()
        path.write_text(text)
    return root


def test_the_package_has_no_upward_import_and_no_cycle():
    assert import_map.ROOT == ROOT / "remedi"
    assert import_map.problems() == []


def test_every_floor_of_the_package_is_placed():
    floors = {import_map.floor_of(m) for m in import_map.module_graph()}
    assert floors <= set(import_map.LEVEL), floors - set(import_map.LEVEL)


def test_a_clean_fake_package_passes(tmp_path):
    root = _package(tmp_path, {
        "model/a.py": "import torch\n",
        "decoding/b.py": "from remedi.model import a\nfrom remedi.model.a import torch\nimport remedi.model\n",
        "decoding/c.py": "from . import b\n",
    })
    graph = import_map.module_graph(root)
    assert graph["remedi.decoding.b"] == {"remedi.model", "remedi.model.a"}
    assert graph["remedi.decoding.c"] == {"remedi.decoding.b"}
    assert import_map.problems(root=root) == []


def test_the_checker_catches_an_upward_import(tmp_path):
    root = _package(tmp_path, {
        "model/a.py": "def f():\n    from remedi.decoding.b import g  # lazy: still a dependency\n    return g\n",
        "decoding/b.py": "def g():\n    return 1\n",
    })
    assert import_map.problems(root=root) == ["up: remedi.model.a -> remedi.decoding.b"]


def test_the_checker_catches_a_cycle_but_not_a_type_checking_import(tmp_path):
    root = _package(tmp_path, {
        "decoding/b.py": "from remedi.decoding.c import h\n",
        "decoding/c.py": "def h():\n    from remedi.decoding import b\n    return b\n",
        "decoding/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from remedi.training import e\n",
        "training/e.py": "from remedi.decoding import d\n",
    })
    assert import_map.problems(root=root) == ["cycle: remedi.decoding.b <-> remedi.decoding.c"]


def test_the_checker_names_a_module_on_no_floor(tmp_path):
    root = _package(tmp_path, {"attic/x.py": "from remedi.model import a\n", "model/a.py": ""})
    assert import_map.problems(root=root) == ["remedi.attic: floor 'attic' is not in FLOORS",
                                              "remedi.attic.x: floor 'attic' is not in FLOORS"]


def test_readme_names_the_floors_in_order():
    floors = " → ".join(", ".join(f"`{n}`" for n in names) for names in import_map.FLOORS[:-1]) + " → scripts"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert floors in readme, f"README's 'How the code is organised' should say the arrows run: {floors}"
