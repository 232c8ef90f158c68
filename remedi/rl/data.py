"""Remask-RL prompts: (id, prompt ids, gold answer, format) from the task modules' rows.

Records come from :func:`remedi.tasks.records.load_records` (hub datasets, local files, the embedded
model's arithmetic task generated in memory); the question and final answer of each are read by the task
modules as in evaluation (:func:`remedi.tasks.items.rows_to_items`); the prompt text is built as the
evaluation builds it (:func:`remedi.tasks.items.build_prompt`: the bare question for the arithmetic
task, the task instruction in a chat turn for Instruct models, "Question: ... Answer:" for Base models),
so RL trains on the prompts the model is evaluated on. Generated arithmetic problems whose question
appears in the embedded model's held-out files (data/validation.jsonl, data/test.jsonl) are dropped.
"""
from __future__ import annotations

import logging
from typing import Optional

from remedi.model.loading import EMBEDDED_MODEL, default_chat, encode_prompt
from remedi.rl.rewards import RLItem
from remedi.tasks.items import build_prompt, rows_to_items
from remedi.tasks.records import infer_format, load_records, read_records

log = logging.getLogger(__name__)

HELD_OUT_SPLITS = ("validation", "test")


def answer_format(dataset: str, rows: list) -> str:
    """gsm8k or math for RL's rewards, by :func:`remedi.tasks.records.infer_format` (the first row's fields,
    else the dataset's name); a code dataset or an unclear one is an error naming --format."""
    fmt = infer_format(dataset, rows[0] if rows else None)
    if fmt not in ("gsm8k", "math"):
        raise ValueError(f"cannot tell the answer format of --dataset {dataset}"
                         f"{f' (it looks like {fmt}, which RL does not reward)' if fmt else ''}: pass --format "
                         "gsm8k or --format math")
    return fmt


def _held_out_questions() -> set:
    out: set = set()
    for split in HELD_OUT_SPLITS:
        f = EMBEDDED_MODEL / "data" / f"{split}.jsonl"
        if f.is_file():
            out |= {r["question"] for r in read_records(f)}
    return out


def load_items(rargs, tokenizer, model_name: str, seed: int, max_prompt_len: Optional[int] = None
               ) -> tuple[list[RLItem], str]:
    """The training prompts (before any weight loads) and a description of the source.

    Prompts longer than ``max_prompt_len`` tokens (max_sequence_length - gen_length) are dropped and
    counted; an empty result is an error.
    """
    rows, source = load_records(rargs.dataset, rargs.split, rargs.subset, arith_n=rargs.arith_n, seed=seed)
    fmt = rargs.format or answer_format(rargs.dataset, rows)
    items = rows_to_items(rows, fmt, rargs.split or "train", source)
    arith = rargs.dataset == "arith" or all(it.id.startswith("arith-") for it in items[:1])
    if rargs.dataset == "arith":
        held = _held_out_questions()
        before = len(items)
        items = [it for it in items if it.question not in held]
        if before != len(items):
            log.info("dropped %d generated problems that are in the embedded model's held-out files",
                     before - len(items))
    if rargs.max_examples:
        items = items[: rargs.max_examples]
    chat = {"chat": True, "plain": False}.get(rargs.prompt_format)
    if chat is None:
        chat = default_chat(model_name)
    style = ("arith_chat" if chat else "arith") if arith else ("chat" if chat else "plain")
    out, too_long = [], 0
    for it in items:
        ids = encode_prompt(tokenizer, build_prompt(it.question, fmt, style), chat)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            too_long += 1
            continue
        out.append(RLItem(it.id, tuple(ids), it.gold, fmt))
    if too_long:
        log.warning("%d prompts longer than %s tokens (max_sequence_length - gen_length) were dropped", too_long,
                    max_prompt_len)
    if not out:
        hint = (f": --gen_length leaves {max(max_prompt_len, 0)} tokens of the model's max_sequence_length for the "
                "prompt; lower --gen_length" if too_long == len(items) and max_prompt_len is not None else "")
        raise ValueError(f"{source}: no usable prompts (of {len(items)}; {too_long} too long){hint}")
    return out, f"{source}, answers checked in {fmt} format, {style} prompts"
