"""SFT data: (prompt, answer) records from known hub datasets, local files or the synthetic task; tokenised.

The records are read by :mod:`remedi.tasks.records` (re-exported here: ``load_records``, ``read_records``,
``hub_records``, ``KNOWN``). Known datasets carry explicit field maps (the prompt and answer fields of each hub dataset); any other hub
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

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

# the rows themselves (files, hub splits, the arithmetic task, known datasets' fields) belong to the tasks
from remedi.tasks.records import (ARITH, KNOWN, LOCAL_SUFFIXES, KnownDataset, hub_records,  # noqa: F401
                                  load_records, read_records)

log = logging.getLogger(__name__)


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
    dropped: list = field(default_factory=list)  # (record number from 1, why) of every skipped record

    def summary(self) -> str:
        return (f"{self.source}: {self.n_records} records -> {len(self.examples)} examples, "
                f"{self.n_truncated} answers truncated to fit, {self.n_skipped} skipped "
                f"({self.n_skipped - self.n_empty} prompt alone too long, {self.n_empty} with an empty or "
                f"non-text field){self.dropped_note()}")

    def dropped_note(self, limit: int = 5) -> str:
        """'; dropped: record 3 (prompt of 47,000,000 characters ...), ...' naming the first ``limit``."""
        if not self.dropped:
            return ""
        shown = ", ".join(f"record {i} ({why})" for i, why in self.dropped[:limit])
        more = f" and {len(self.dropped) - limit} more" if len(self.dropped) > limit else ""
        return f"; dropped: {shown}{more}"


def max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` spells (>= 1): text of n characters has at least
    n / max_token_chars tokens, which bounds a row's length before it is tokenised."""
    vocab = tokenizer.get_vocab()
    return max(1, max((len(t) for t in vocab), default=1))


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
    # text longer than this cannot fit seq_len tokens (each token spells at most max_token_chars characters):
    # such a prompt is dropped and such an answer cut before tokenising, so a 47 MB record costs nothing
    char_cap = (seq_len + 16) * max_token_chars(tokenizer)
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
            out.dropped.append((i + 1, "an empty or non-text field"))
            continue
        if len(q) > char_cap:
            out.n_skipped += 1
            out.dropped.append((i + 1, f"prompt of {len(q):,} characters, longer than --seq_len {seq_len} tokens"))
            continue
        prompt_ids = encode_prompt(tokenizer, q, chat)
        room = seq_len - len(prompt_ids)
        if room < 1:
            out.n_skipped += 1
            out.dropped.append((i + 1, f"prompt of {len(prompt_ids)} tokens leaves no room in --seq_len {seq_len}"))
            continue
        # the cut leaves >= 16 tokens past the seq_len ones kept: the kept tokens are those of the whole text
        answer_ids = list(tokenizer(answer_join.join(parts)[:char_cap], add_special_tokens=False)["input_ids"]) + end
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
