"""Where eval items come from: GSM8K, MATH-500, HumanEval, MBPP, a local file, or the embedded model's task.

* datasets: ``openai/gsm8k`` (subset ``main``), ``HuggingFaceH4/MATH-500``, ``openai_humaneval``, ``mbpp``
  (config ``sanitized``), a local ``.jsonl``/``.json`` (or a folder holding ``<split>.jsonl``), and
  ``arith``, the synthetic task of the embedded model; the answer format decides which task module
  (:mod:`remedi.tasks.gsm8k`, :mod:`remedi.tasks.math500`, :mod:`remedi.tasks.code`) reads a row;
* code formats (``humaneval``, ``mbpp``): rows in the hub schemas (see :mod:`remedi.tasks.code`); an item
  keeps its row (prompt, tests, entry point) in ``Item.problem`` so results can be re-executed from the
  results file alone (``--rescore``); prompts: HumanEval's function header as is (plain) or inside a
  "complete this function" request (chat); MBPP's instruction prompt either way; no few-shot;
* deterministic selection (``--start``/``--max_samples``/``--shuffle``) and few-shot exemplars;
* prompts: zero-shot chat (Instruct), few-shot "Question:/Answer:" text (Base), the bare question (arith).

``datasets`` is imported only for hub datasets (the GPU image does not ship it).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from remedi.model.loading import EMBEDDED_MODEL, encode_prompt
from remedi.tasks import code, gsm8k
from remedi.tasks.answer_check import FORMATS as ANSWER_FORMATS
# items and prompts belong to the tasks (re-exported: callers import them from here too)
from remedi.tasks.items import (ARITH, CODE_CHAT_INSTRUCTION, CODE_FORMATS, TASKS, Item,  # noqa: F401
                                build_prompt, code_rows_to_items, is_code, rows_to_items)
from remedi.tasks.records import hub_records, infer_format, read_records

ARITH_DATA_DIR = EMBEDDED_MODEL / "data"
HUB_SUBSETS = {gsm8k.HUB_ID: gsm8k.HUB_SUBSET}
FORMATS = (*ANSWER_FORMATS, *CODE_FORMATS)
CODE_HUB_IDS = {"openai_humaneval": "humaneval", "openai/openai_humaneval": "humaneval", "mbpp": "mbpp",
                "google-research-datasets/mbpp": "mbpp"}
CODE_HUB_SUBSETS = {"mbpp": "sanitized"}


@dataclass(frozen=True)
class ItemSource:
    """Where eval items come from (:func:`resolve_dataset`) and which answer format reads them."""

    kind: str  # "hub" | "file" | "arith"
    name: str  # hub id, or the file path
    fmt: str
    subset: Optional[str] = None
    split: str = "test"


def _local_file(path: Path, split: str) -> Optional[Path]:
    if path.is_file():
        return path
    if path.is_dir():
        for ext in (".jsonl", ".json"):
            if (path / f"{split}{ext}").is_file():
                return path / f"{split}{ext}"
        raise FileNotFoundError(f"--dataset {path} is a folder without {split}.jsonl or {split}.json "
                                f"(--split {split}); found {sorted(p.name for p in path.iterdir())[:10]}")
    return None


def _first_row(path: Path) -> dict:
    """The first record of a .jsonl (one line read); {} for .json files. Empty or malformed: an error."""
    if path.suffix == ".json":
        return {}
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    if not first.strip():
        raise ValueError(f"--dataset {path} is empty (or starts with a blank line); expected one JSON object per "
                         "line with question/answer (gsm8k) or problem/answer (math) fields")
    try:
        row = json.loads(first)
    except json.JSONDecodeError as e:
        raise ValueError(f"--dataset {path}: line 1 is not valid JSON ({e.msg}); expected one JSON object per "
                         "line") from None
    if not isinstance(row, dict):
        raise ValueError(f"--dataset {path}: line 1 is a JSON {type(row).__name__}, not an object")
    return row


def resolve_dataset(dataset: Optional[str], subset: Optional[str] = None, split: str = "test",
                    fmt: Optional[str] = None) -> ItemSource:
    """Decide where items come from and which answer format applies (cheap: reads at most one line)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dataset in (None, "", ARITH):
        path = ARITH_DATA_DIR / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"the arithmetic task's {split} split {path} does not exist (the embedded model "
                                    "is not built yet?); pass --dataset openai/gsm8k or a local .jsonl")
        return ItemSource(ARITH, str(path), fmt or "gsm8k", None, split)
    local = _local_file(Path(dataset).expanduser(), split)
    if local is not None:
        row = _first_row(local)
        arith = local.resolve().parent == ARITH_DATA_DIR.resolve() or str(row.get("id", "")).startswith("arith-")
        kind = ARITH if arith else "file"
        guessed = fmt or infer_format(str(local), row)
        if guessed is None:
            raise ValueError(f"cannot tell the answer format of {local}: pass --format gsm8k, math, humaneval "
                             "or mbpp")
        return ItemSource(kind, str(local), guessed, None, split)
    if dataset in CODE_HUB_IDS:
        guessed = fmt or CODE_HUB_IDS[dataset]
        return ItemSource("hub", dataset, guessed, subset or CODE_HUB_SUBSETS.get(dataset), split)
    if dataset.count("/") != 1 or dataset.startswith((".", "/")) or dataset.endswith((".json", ".jsonl")):
        raise FileNotFoundError(f"--dataset {dataset!r} is neither an existing file/folder nor a hub id "
                                "like openai/gsm8k, HuggingFaceH4/MATH-500, openai_humaneval or mbpp")
    guessed = fmt or infer_format(dataset)
    if guessed is None:
        raise ValueError(f"cannot tell the answer format of {dataset}: pass --format gsm8k, math, humaneval or mbpp")
    subset = subset or HUB_SUBSETS.get(dataset) or (CODE_HUB_SUBSETS.get("mbpp") if guessed == "mbpp" else None)
    return ItemSource("hub", dataset, guessed, subset, split)


def load_items(spec: ItemSource) -> list[Item]:
    if is_code(spec.fmt):  # remedi.tasks.code reads and checks the rows (hub or local)
        rows = code.load_code_rows(spec.name, spec.fmt, spec.split, spec.subset)
        return code_rows_to_items(rows, spec.fmt, spec.name)
    if spec.kind == "hub":
        rows, src = hub_records(spec.name, spec.subset, spec.split), f"{spec.name} ({spec.subset}, {spec.split})"
    else:
        rows, src = read_records(Path(spec.name)), spec.name
    return rows_to_items(rows, spec.fmt, spec.split, src)


def fewshot_source(spec: ItemSource, fewshot_file: Optional[str]) -> ItemSource:
    """Where few-shot exemplars come from: --fewshot_file, else the train split of the same dataset."""
    if is_code(spec.fmt):
        raise ValueError(f"--fewshot is not supported for --format {spec.fmt} (code prompts are zero-shot)")
    if fewshot_file:
        return resolve_dataset(fewshot_file, split="train", fmt=spec.fmt)
    if spec.kind == "hub":
        return ItemSource("hub", spec.name, spec.fmt, spec.subset, "train")
    sibling = Path(spec.name).with_name("train.jsonl")
    if sibling.is_file() and sibling.resolve() != Path(spec.name).resolve():
        return ItemSource(spec.kind, str(sibling), spec.fmt, None, "train")
    raise ValueError(f"--fewshot needs exemplars: {spec.name} has no train.jsonl beside it; pass --fewshot_file")


def fewshot_exemplars(items: Sequence[Item], n: int, exclude_ids: Iterable[str] = ()) -> list[Item]:
    """The first ``n`` items with a worked solution (fixed for every question, as in lm-eval)."""
    skip = set(exclude_ids)
    out = [it for it in items if it.solution and it.id not in skip][:n]
    if len(out) < n:
        raise ValueError(f"--fewshot {n}: only {len(out)} exemplars with a worked solution are available")
    return out


def select_items(items: Sequence[Item], start: int = 0, max_samples: Optional[int] = None,
                 shuffle: bool = False, seed: int = 0) -> tuple[list[Item], str]:
    """Deterministic selection: (optionally seed-shuffled) split order, then ``[start, start+max_samples)``.

    Returns the items and a note (empty unless ``max_samples`` overshoots the split).
    """
    if start < 0:
        raise ValueError(f"--start {start} must be >= 0")
    order = list(items)
    if shuffle:
        random.Random(f"eval-order:{seed}").shuffle(order)
    if start >= len(order):
        raise ValueError(f"--start {start} is past the end of the split ({len(order)} items)")
    end = len(order) if max_samples is None or max_samples < 0 else start + max_samples
    note = ""
    if end > len(order):
        note = (f"--max_samples {max_samples} from --start {start} exceeds the split ({len(order)} items); "
                f"running the {len(order) - start} that exist")
        end = len(order)
    return order[start:end], note



def prompt_style(spec: ItemSource, chat: bool) -> str:
    """plain | chat for real datasets; arith | arith_chat (the bare question as the user message) for arith."""
    if spec.kind == ARITH:
        return "arith_chat" if chat else ARITH
    return "chat" if chat else "plain"


def encode(tokenizer, text: str, style: str) -> tuple[list[int], str]:
    """Token ids and the exact text the model sees (chat template applied when style is chat)."""
    chat = style.endswith("chat")
    ids = encode_prompt(tokenizer, text, chat=chat)
    shown = text
    if chat:
        shown = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False)
    return ids, shown

