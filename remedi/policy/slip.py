"""The gold-free slip oracle (a ceiling check): entropy order, but the result digits of a false ``a op b = c``
in the proposed block go to the bottom of the ranking.

It asks whether hiding a detected arithmetic slip helps at all: if the same digits come back when the
schedule forces them visible, a position-only policy cannot fix slips and a token action is needed. It plugs
in where a residual UPS does (``model.ups_policy``, decoded with the ``ups`` source); it has no weights and is
never saved. The check is per row in Python (one host read of the block's tokens per step, then a regex over
the rows that need it): an experiment, not a decoder, so it runs on the eager decoder only (``host_sync``).
"""
from __future__ import annotations

import re
from fractions import Fraction

import torch

from remedi.model.scores import position_scores

EQUATION = re.compile(r"(\d+)\s*([-+*/x×])\s*(\d+)\s*=\s*(\d+)")
BOTTOM = 1e6  # subtracted from a flagged position's entropy score: below every unflagged one


def equation_is_true(a: str, op: str, b: str, c: str) -> bool:
    x, y, z = int(a), int(b), int(c)
    if op == "+":
        return x + y == z
    if op == "-":
        return x - y == z
    if op in "*x×":
        return x * y == z
    return y != 0 and Fraction(x, y) == z


def false_result_positions(pieces: list[str]) -> list[int]:
    """Positions (indices into ``pieces``, one decoded token each) holding result digits of false equations."""
    owner, text = [], ""
    for i, p in enumerate(pieces):
        text += p
        owner += [i] * len(p)
    out = set()
    for m in EQUATION.finditer(text):
        if not equation_is_true(*m.groups()):
            out.update(owner[j] for j in range(m.start(4), m.end(4)))
    return sorted(out)


class SlipOracle(torch.nn.Module):
    """Entropy with false equations' result digits ranked last (see the module docstring)."""

    def __init__(self, tokenizer, vocab_size: int):
        super().__init__()
        n = len(tokenizer)
        self.pieces = [tokenizer.decode([i]) if i < n else "" for i in range(vocab_size)]
        self.flagged = 0  # positions sent to the bottom so far (for the report)
        self.register_buffer("eq_ids", torch.tensor([i for i, p in enumerate(self.pieces) if "=" in p],
                                                    dtype=torch.long), persistent=False)

    host_sync = True  # reads the tokens on the host every step: the eager decoder only (no --graphs)

    def score(self, logits, tokens, masked, keep, ups=None, hidden=None):
        """The scorer interface of :func:`remedi.decoding.step.decide`: (B, Lb) float64."""
        s = position_scores("entropy", logits, tokens, None, None)
        need = torch.isin(tokens, self.eq_ids.to(tokens.device)).any(1).nonzero().squeeze(1).tolist()  # rows with '='
        sub = tokens[need].tolist() if need else []
        rows = [(b, false_result_positions([self.pieces[t] for t in row])) for b, row in zip(need, sub)]
        hits = [(b, i) for b, pos in rows for i in pos]
        if not hits:
            return s
        flag = torch.zeros_like(masked)
        flag[torch.tensor([b for b, _ in hits]), torch.tensor([i for _, i in hits])] = True
        self.flagged += len(hits)
        return torch.where(flag, s - BOTTOM, s)
