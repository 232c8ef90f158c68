"""Row sources of the shipped lm-eval tasks (``custom_dataset: !function sources.<name>`` in their YAMLs):
absolute paths, so the tasks work from any working directory and from an installed wheel."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _json_split(path: Path):
    import datasets

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the embedded model is not built yet?)")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def arith_test(**_):
    """The embedded model's held-out arithmetic problems (GSM8K format), as lm-eval's ``test`` split."""
    from remedi.model.loading import EMBEDDED_MODEL

    return _json_split(EMBEDDED_MODEL / "data" / "test.jsonl")


def arith_mc(**_):
    """The 12 multiple-choice items of ``remedi_arith_mc`` (see its YAML)."""
    return _json_split(HERE / "remedi_arith_mc.jsonl")
