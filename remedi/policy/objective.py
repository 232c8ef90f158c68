"""What the derivative-free stage maximises: greedy accuracy of the exact sampler with a residual UPS.

Training problems are drawn fresh from the arithmetic generator (:mod:`remedi.tasks.arith`) for every
generation of the search, from a stream named by (seed, generation) and never containing a test-split
question, so every candidate of a generation is scored on the same problems (common random numbers) and a
resumed search sees the same problems again. Decoding is the evaluated decision itself: the ``ups`` source
of the sampler, greedy tokens, through :class:`remedi.session.Session` (per-item random streams), many
problems per forward batch. Items and prompts come from the task modules (:mod:`remedi.tasks.items`), the
prompt ids from the model's one encoder (:func:`remedi.model.loading.encode_prompt`), as the eval builds them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from remedi.model.loading import EMBEDDED_MODEL, encode_prompt
from remedi.tasks import arith
from remedi.tasks.answer_check import check
from remedi.tasks.items import ARITH, Item, build_prompt, rows_to_items
from remedi.tasks.records import read_records


def held_out_questions() -> set[str]:
    """The embedded model's held-out question texts (never used for training)."""
    return {row["question"] for row in read_records(EMBEDDED_MODEL / "data" / "test.jsonl")}


def train_problems(n: int, seed: int, generation: int, exclude: Sequence[str] = ()) -> list[Item]:
    """``n`` fresh arithmetic problems for one generation (ids ``search-<seed>-<gen>-<i>``)."""
    rng = random.Random(f"policy-search:{seed}:{generation}")
    banned, seen, rows = set(exclude), set(), []
    while len(rows) < n:
        item = arith.generate_problem(rng, rng.choice((1, 2, 3, 4)))
        if item["question"] in banned or item["question"] in seen:
            continue
        seen.add(item["question"])
        rows.append({"id": f"search-{seed}-{generation}-{len(rows):05d}", **item})
    return rows_to_items(rows, "gsm8k", "train", "the arithmetic generator")


@dataclass
class GreedyObjective:
    """Accuracy of ``session``'s model with its residual policy set to given linear weights."""

    session: object  # remedi.session.Session, loaded, whose model carries a ResidualUPS as ups_policy
    steps: int
    batch_size: int = 512

    def encode(self, items: Sequence[Item]) -> list[list[int]]:
        style = "arith_chat" if self.session.chat else ARITH  # the arithmetic task's prompt style
        return [encode_prompt(self.session.tokenizer, build_prompt(it.question, "gsm8k", style), self.session.chat)
                for it in items]

    def correct(self, items: Sequence[Item], prompts: Sequence[list[int]], source: str = "ups") -> list[bool]:
        """Per-item verdicts of one decoding pass (batched)."""
        out = []
        for i in range(0, len(items), self.batch_size):
            batch = items[i:i + self.batch_size]
            gens = self.session.generate(prompts[i:i + self.batch_size], source, [it.id for it in batch], self.steps)
            for it, g in zip(batch, gens):
                text = self.session.tokenizer.decode(g.tokens, skip_special_tokens=True)
                out.append(bool(check(text, it.gold, "gsm8k").correct))
        return out

    def accuracy(self, weights: Optional[Sequence[float]], items, prompts) -> float:
        """Accuracy with the policy set to the search point ``weights``: its linear weights and bias, then hide_theta
        when it has a hide threshold (:meth:`~remedi.model.residual.ResidualUPS.set_search_point`; None: as it is)."""
        if weights is not None:
            self.session.model.ups_policy.set_search_point(torch.as_tensor(weights, dtype=torch.float64))
        ok = self.correct(items, prompts)
        return sum(ok) / max(len(ok), 1)
