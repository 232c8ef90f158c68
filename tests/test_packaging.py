"""Packaging: console commands, the embedded model as package data, declared dependencies in one place."""
import importlib
import os
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (3.10: the checks here are skipped)

from remedi import cli
from remedi.model.loading import EMBEDDED_MODEL

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_console_commands_run_each_scripts_main():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == set(cli.SCRIPTS) | {"remedi-harness"}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    for name, module in cli.SCRIPTS.items():
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file() and "def main(" in \
            (ROOT / (module.replace(".", "/") + ".py")).read_text()


def test_console_command_bad_input_is_one_error_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["remedi-eval", "--model_name", str(tmp_path / "no_such_model")])
    with pytest.raises(SystemExit) as e:
        cli.eval_main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_model" in err.splitlines()[0]


def test_embedded_model_is_package_data_and_the_checkout_path_links_to_it():
    pkg = ROOT / "remedi"
    assert EMBEDDED_MODEL.parent.parent == pkg.resolve() and (EMBEDDED_MODEL / "model.safetensors").is_file()
    link = ROOT / "checkpoints" / "remedi-tiny-gsm"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))  # relative: survives a moved clone
    assert link.resolve() == EMBEDDED_MODEL.resolve()
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["remedi"]
    shipped = {p.relative_to(pkg).as_posix() for g in globs for p in pkg.glob(g) if p.is_file()}
    needed = {p.relative_to(pkg).as_posix() for p in EMBEDDED_MODEL.rglob("*") if p.is_file()}
    assert needed <= shipped and "embedded/remedi-tiny-gsm/data/test.jsonl" in needed


def _reqs(lines):
    return {re.split(r"[<>=\[;]", r.replace(" ", ""), maxsplit=1)[0].lower().replace("_", "-"): r.replace(" ", "")
            for r in lines if r.strip() and not r.lstrip().startswith(("#", "-r"))}


def test_requirements_file_declares_what_pyproject_declares():
    """requirements-train.txt and [project] dependencies carry the same bounds (CI tests pyproject's floors)."""
    assert _reqs((ROOT / "requirements-train.txt").read_text().splitlines()) == _reqs(PYPROJECT["project"]["dependencies"])
    deps = _reqs(PYPROJECT["project"]["dependencies"])
    assert deps["peft"] == "peft>=0.18.1"  # older peft cannot wrap the native model (LLaDAConfig has no .get)
    assert {"huggingface-hub", "pyarrow", "cma"} <= set(deps) and "[" not in deps["math-verify"]
