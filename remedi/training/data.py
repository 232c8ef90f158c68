"""SFT data: (prompt, answer) records from known hub datasets, local files or the synthetic task; tokenised.

Known datasets carry explicit field maps (the prompt and answer fields of each hub dataset); any other hub
dataset or local ``.jsonl``/``.json``/``.parquet`` file (or a folder holding ``<split>.jsonl``) needs
``--prompt_field`` and ``--answer_field``. A missing split or field is an error listing what exists: never a
silent fallback. A malformed local file (a line that is not a JSON object, no records at all) is an error
naming the file and the line, and a record without a requested field one naming the record and the field.

Sequence layout (LLaDA SFT): ``prompt | answer | end-of-answer | EOS padding``. The prompt is encoded
exactly as at inference (:func:`remedi.model.loading.encode_prompt`: chat template with the generation header
for Instruct models, plain text for Base); the answer ends with <|eot_id|> in chat format, then EOS, and
rows are padded with EOS, which is part of the answer and trained. Over-long rows keep the prompt and
lose the answer's tail; rows whose prompt leaves no room for a single answer token are skipped; both
are counted and reported.

The ``datasets`` package is imported only for hub datasets (the GPU image does not ship it).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

ARITH = "arith"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DatasetSpec:
    """Field map of a known dataset. ``answer`` lists fields joined with ``answer_join``."""

    prompt: str
    answer: tuple[str, ...]
    subsets: tuple[str, ...] = ()  # hub configs; first one is the default
    split: str = "train"
    answer_join: str = "\n\n"


KNOWN: dict[str, DatasetSpec] = {
    # s1K: the reasoning trace then the final attempt; pass --answer_field deepseek_attempt for the attempt only
    "simplescaling/s1K-1.1": DatasetSpec("question", ("deepseek_thinking_trajectory", "deepseek_attempt")),
    "HuggingFaceH4/MATH-500": DatasetSpec("problem", ("solution",), split="test"),
    "openai/gsm8k": DatasetSpec("question", ("answer",), subsets=("main",)),
    "OpenCoder-LLM/opc-sft-stage2": DatasetSpec(
        "instruction", ("output",), subsets=("educational_instruct", "evol_instruct", "mceval_instruct")),
    ARITH: DatasetSpec("question", ("answer",)),  # generated in memory by remedi.tasks.arith
}


@dataclass
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]  # includes the end-of-answer token(s); no padding


@dataclass
class TokenizedData:
    examples: list[Example]
    n_records: int = 0
    n_truncated: int = 0
    n_skipped: int = 0  # n_too_long + n_empty
    n_empty: int = 0  # a prompt or answer field empty or not text (e.g. null in a hub dataset)
    source: str = ""
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.source}: {self.n_records} records -> {len(self.examples)} examples, "
                f"{self.n_truncated} answers truncated to fit, {self.n_skipped} skipped "
                f"({self.n_skipped - self.n_empty} prompt alone too long, {self.n_empty} with an empty or "
                "non-text field)")


# ---------------------------------------------------------------------------------------- raw records
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


def resolve_fields(dataset: str, prompt_field: Optional[str], answer_field: Optional[str]):
    """(prompt field, answer fields, joiner) from the flags or the known map."""
    spec = KNOWN.get(dataset)
    if spec is None and (prompt_field is None or answer_field is None):
        raise ValueError(f"--dataset {dataset} is not a known dataset ({', '.join(KNOWN)}): pass --prompt_field "
                         "and --answer_field (comma-separated fields are joined by a blank line)")
    prompt = prompt_field or spec.prompt
    answer = tuple(answer_field.split(",")) if answer_field else spec.answer
    return prompt, answer, spec.answer_join if spec else "\n\n"


def check_fields(rows: Sequence[dict], prompt: str, answer: Sequence[str], source: str) -> None:
    if not rows:
        raise ValueError(f"{source} holds no records")
    found = sorted(rows[0].keys()) if isinstance(rows[0], dict) else []
    missing = [f for f in (prompt, *answer) if f not in found]
    if missing:
        raise ValueError(f"{source}: field(s) {missing} not found; fields found: {found} "
                         "(choose with --prompt_field / --answer_field)")


# ------------------------------------------------------------------------------------------ tokenising
def tokenize_records(rows: Sequence[dict], tokenizer, *, prompt_field: str, answer_fields: Sequence[str],
                     answer_join: str, seq_len: int, chat: bool, eos_id: int, eot_id: Optional[int],
                     source: str = "") -> TokenizedData:
    """Encode every record as prompt ids + answer ids (with the end-of-answer tokens), fitted to seq_len."""
    from remedi.model.loading import encode_prompt

    out = TokenizedData(examples=[], n_records=len(rows), source=source)
    end = ([eot_id] if chat and eot_id is not None else []) + [eos_id]
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{source}: record {i + 1} is a {type(r).__name__}, not a record object")
        missing = [f for f in (prompt_field, *answer_fields) if f not in r]
        if missing:
            raise ValueError(f"{source}: record {i + 1} has no field {missing[0]!r} (its fields: {sorted(r)}); "
                             "fix the record or choose other fields with --prompt_field / --answer_field")
        q = r[prompt_field]
        parts = [r[f] for f in answer_fields]
        if not isinstance(q, str) or not q.strip() or any(not isinstance(a, str) for a in parts):
            out.n_skipped += 1
            out.n_empty += 1
            continue
        prompt_ids = encode_prompt(tokenizer, q, chat)
        answer_ids = list(tokenizer(answer_join.join(parts), add_special_tokens=False)["input_ids"]) + end
        room = seq_len - len(prompt_ids)
        if room < 1:
            out.n_skipped += 1
            continue
        if len(answer_ids) > room:
            answer_ids = answer_ids[:room]
            out.n_truncated += 1
        out.examples.append(Example(prompt_ids, answer_ids))
    if out.examples:
        lens = sorted(len(e.prompt_ids) + len(e.answer_ids) for e in out.examples)
        out.stats = {"min_len": lens[0], "median_len": lens[len(lens) // 2], "max_len": lens[-1]}
    return out


def collate(examples: Sequence[Example], pad_id: int, length: Optional[int] = None):
    """Right-pad with ``pad_id`` (EOS) to ``length`` (or the longest row); the padding belongs to the answer.

    Returns (input_ids (B, T) long, answer_mask (B, T) bool).
    """
    T = length or max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    answer = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, e in enumerate(examples):
        n_p, n_a = len(e.prompt_ids), len(e.answer_ids)
        if n_p + n_a > T:
            raise ValueError(f"example {b} has {n_p + n_a} tokens > collate length {T}")
        ids[b, :n_p] = torch.tensor(e.prompt_ids)
        ids[b, n_p:n_p + n_a] = torch.tensor(e.answer_ids)
        answer[b, n_p:] = True
    return ids, answer


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of an epoch: global batches of batch_size * world, incomplete tail dropped."""
    order = epoch_order(n, seed, epoch)
    g = batch_size * world
    return [order[s + rank * batch_size: s + (rank + 1) * batch_size] for s in range(0, n - g + 1, g)]
