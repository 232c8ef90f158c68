"""Benchmark and training rows: where they are read from, and which task reads them (one format inference).

The task modules (:mod:`remedi.tasks.gsm8k`, :mod:`~remedi.tasks.math500`, :mod:`~remedi.tasks.arith`,
:mod:`~remedi.tasks.code`) own prompting and checking; this module owns the rows they start from, shared by
evaluation, SFT and RL (none of which reads rows another way):

* :func:`read_records`: a local ``.jsonl``/``.json``/``.parquet`` file, malformed input named by file and line;
* :func:`hub_records`: one split of a hub dataset (``datasets`` imported only then);
* :func:`load_records`: a known hub dataset (:data:`KNOWN`: its fields, subsets and default split), a local
  file or folder of ``<split>.<suffix>`` files, or the arithmetic task generated in memory;
* :func:`infer_format`: the answer format of rows, from their fields, else from the dataset's name.

Nothing here imports torch or a model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ARITH = "arith"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
ANSWER_FORMATS = ("gsm8k", "math")
CODE_FORMATS = ("humaneval", "mbpp")


@dataclass(frozen=True)
class KnownDataset:
    """Field map of a known dataset. ``answer`` lists fields joined with ``answer_join``."""

    prompt: str
    answer: tuple[str, ...]
    subsets: tuple[str, ...] = ()  # hub configs; first one is the default
    split: str = "train"
    answer_join: str = "\n\n"


KNOWN: dict[str, KnownDataset] = {
    # s1K: the reasoning trace then the final attempt; pass --answer_field deepseek_attempt for the attempt only
    "simplescaling/s1K-1.1": KnownDataset("question", ("deepseek_thinking_trajectory", "deepseek_attempt")),
    "HuggingFaceH4/MATH-500": KnownDataset("problem", ("solution",), split="test"),
    "openai/gsm8k": KnownDataset("question", ("answer",), subsets=("main",)),
    "OpenCoder-LLM/opc-sft-stage2": KnownDataset(
        "instruction", ("output",), subsets=("educational_instruct", "evol_instruct", "mceval_instruct")),
    ARITH: KnownDataset("question", ("answer",)),  # generated in memory by remedi.tasks.arith
}


def read_records(path: Path) -> list[dict]:
    """Records (JSON objects) of a local .jsonl, .json (a list, or an object holding one list) or .parquet file.

    Raises naming the file and line (or list index) of anything that is not an object, and for a file with
    no records at all: training on nothing would otherwise fail later with a message about step counts.
    """
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON line ({e})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: a JSON {type(row).__name__}, not a record object "
                                     '({"question": ..., "answer": ...}); fix or remove that line')
                rows.append(row)
    elif path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if isinstance(obj, dict):
            lists = [k for k, v in obj.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a list of records (or an object with exactly one list), "
                                 f"found keys {sorted(obj)}")
            obj = obj[lists[0]]
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        bad = next((i for i, r in enumerate(obj) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"{path}: element {bad} of the record list is a JSON {type(obj[bad]).__name__}, "
                             "not a record object")
        rows = obj
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
        rows = pq.read_table(str(path)).to_pylist()
    else:
        raise ValueError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    if not rows:
        raise ValueError(f"{path} holds no records (the file is empty); point --dataset at a file with one "
                         "record per line")
    return rows


def _local_split(path: Path, split: Optional[str]) -> tuple[Path, str]:
    """A file is its own (single) split; a folder holds ``<split>.<suffix>`` files."""
    if path.is_file():
        if split not in (None, path.stem):
            raise ValueError(f"--split {split!r} given, but --dataset {path} is a single file (split "
                             f"{path.stem!r}); pass the folder holding <split>.jsonl files to choose a split")
        return path, path.stem
    found = sorted({p.stem for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES})
    want = split or "train"
    for suf in LOCAL_SUFFIXES:
        if (path / f"{want}{suf}").is_file():
            return path / f"{want}{suf}", want
    raise ValueError(f"--split {want!r} not found in {path}; splits found there: {found or 'none'}")


def _arith_records(split: str, n: int, seed: int) -> list[dict]:
    from remedi.tasks import arith
    if split not in ("train", "validation", "test"):
        raise ValueError(f"--split {split!r} not found for --dataset arith; splits: train, validation, test")
    sizes = {"train": n, "validation": min(n, 500), "test": min(n, 500)}
    return arith.make_splits(sizes["train"], sizes["validation"], sizes["test"], seed=seed)[split]


def hub_records(name: str, subset: Optional[str], split: str) -> list[dict]:
    """Rows of a hub dataset split; a missing split is an error listing the ones that exist."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"--dataset {name} is a hub dataset and needs the `datasets` package; install it, or "
                          "download the data and pass a local .jsonl/.json/.parquet file") from e
    try:
        splits = datasets.get_dataset_split_names(name, subset)
    except Exception as e:
        raise ValueError(f"could not read the splits of hub dataset {name!r}"
                         f"{f' (subset {subset!r})' if subset else ''}: {type(e).__name__}: {e}") from e
    if split not in splits:
        raise ValueError(f"--split {split!r} not found in {name}{f' ({subset})' if subset else ''}; "
                         f"available: {splits}")
    return list(datasets.load_dataset(name, subset, split=split))


def load_records(dataset: str, split: Optional[str] = None, subset: Optional[str] = None,
                 arith_n: int = 20000, seed: int = 0) -> tuple[list[dict], str]:
    """Raw records and a description of where they came from."""
    spec = KNOWN.get(dataset)
    if dataset == ARITH:
        split = split or "train"
        return _arith_records(split, arith_n, seed), f"arith[{split}] (generated, seed {seed})"
    p = Path(dataset).expanduser()
    if p.exists():
        f, s = _local_split(p, split)
        return read_records(f), f"{f}"
    if p.suffix in LOCAL_SUFFIXES:
        raise FileNotFoundError(f"--dataset {dataset}: no such file")
    split = split or (spec.split if spec else "train")
    subsets = (subset.split(",") if subset else list(spec.subsets[:1]) if spec and spec.subsets else [None])
    if spec and spec.subsets:
        bad = [s for s in subsets if s not in spec.subsets]
        if bad:
            raise ValueError(f"--subset {','.join(bad)} is not a subset of {dataset}; known: {list(spec.subsets)}")
    rows: list[dict] = []
    for s in subsets:
        rows += hub_records(dataset, s, split)
    return rows, f"{dataset}{'/' + ','.join(subsets) if subsets != [None] else ''}[{split}]"


def format_from_fields(row: dict) -> Optional[str]:
    """The answer format a row's fields name (HumanEval, MBPP, MATH, GSM8K schemas); None when unclear."""
    if "entry_point" in row and "test" in row:
        return "humaneval"
    if "test_list" in row:
        return "mbpp"
    if "problem" in row:
        return "math"
    if "question" in row and "answer" in row:
        return "gsm8k"
    return None


def format_from_name(name: str) -> Optional[str]:
    """The answer format a dataset's name or path names (``gsm``/``arith`` -> gsm8k, ``math`` -> math, ...)."""
    low = name.lower()
    if "humaneval" in low:
        return "humaneval"
    if "mbpp" in low:
        return "mbpp"
    if "gsm" in low or ARITH in low:
        return "gsm8k"
    if "math" in low:
        return "math"
    return None


def infer_format(name: str, row: Optional[dict] = None) -> Optional[str]:
    """The one format inference: the first row's fields when given and telling, else the dataset's name."""
    return (format_from_fields(row) if row else None) or format_from_name(name)
