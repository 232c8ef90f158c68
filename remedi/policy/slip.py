"""The gold-free slip oracle (a ceiling check): entropy order, but the result digits of a false ``a op b = c``
in the proposed block go to the bottom of the ranking; and a token action at those digits (:class:`SlipRepredict`).

It asks whether hiding a detected arithmetic slip helps at all: if the same digits come back when the
schedule forces them visible, a position-only policy cannot fix slips and a token action is needed. It plugs
in where a residual UPS does (``model.ups_policy``, decoded with the ``ups`` source); it has no weights and is
never saved. :class:`SlipRepredict` asks the next question: if hiding the digits does not help, does
re-predicting them with the slip's context hidden (the digits and their later copies in the block) fix them?
The check is per row in Python (one host read of the block's tokens per step, then a regex over
the rows that need it): an experiment, not a decoder, so it runs on the eager decoder only (``host_sync``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch

from remedi.model.scores import position_scores

EQUATION = re.compile(r"(\d+)\s*([-+*/x×])\s*(\d+)\s*=\s*(\d+)")
BOTTOM = 1e6  # subtracted from a flagged position's entropy score: below every unflagged one


def equation_value(a: str, op: str, b: str) -> Optional[Fraction]:
    """The exact value of ``a op b`` (an operator of :data:`EQUATION`), or None for a division by zero."""
    x, y = int(a), int(b)
    if op == "+":
        return Fraction(x + y)
    if op == "-":
        return Fraction(x - y)
    if op in "*x×":
        return Fraction(x * y)
    return Fraction(x, y) if y else None


def equation_is_true(a: str, op: str, b: str, c: str) -> bool:
    return equation_value(a, op, b) == int(c)


def _text(pieces: list[str]) -> tuple[str, list[int]]:
    owner, text = [], ""
    for i, p in enumerate(pieces):
        text += p
        owner += [i] * len(p)
    return text, owner


def false_result_positions(pieces: list[str]) -> list[int]:
    """Positions (indices into ``pieces``, one decoded token each) holding result digits of false equations."""
    text, owner = _text(pieces)
    out = set()
    for m in EQUATION.finditer(text):
        if not equation_is_true(*m.groups()):
            out.update(owner[j] for j in range(m.start(4), m.end(4)))
    return sorted(out)


@dataclass
class Slip:
    """One false ``a op b = c`` in a row: the pieces holding c, and the later pieces holding c again as a number."""
    a: str
    op: str
    b: str
    result: list[int]
    copies: list[int]


def find_slips(pieces: list[str]) -> list[Slip]:
    """Every false equation of a row of decoded pieces, with the later whole-number copies of its result."""
    text, owner = _text(pieces)
    out = []
    for m in EQUATION.finditer(text):
        if equation_is_true(*m.groups()):
            continue
        c = m.group(4)
        copies = set()
        for m2 in re.finditer(rf"(?<!\d){c}(?!\d)", text[m.end(4):]):
            start = m.end(4) + m2.start()
            copies.update(owner[j] for j in range(start, start + len(c)))
        result = sorted({owner[j] for j in range(m.start(4), m.end(4))})
        out.append(Slip(m.group(1), m.group(2), m.group(3), result, sorted(copies - set(result))))
    return out


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


ACCEPT = ("any", "true")


class SlipRepredict(SlipOracle):
    """A token action at result digits (an experiment, gold-free): entropy order, and at every step where the
    proposed block (visible tokens, candidates at masks) holds a false ``a op b = c``, one more forward of
    that row with c's digits and c's later copies in the block hidden; its argmax is written at those
    positions, visible ones included (a token rewrite, not a remask).

    ``accept="any"`` writes whatever the second look predicts (the model alone decides). ``accept="true"``
    writes it only when the re-predicted equation is true: an arithmetic check inside the decoding loop, so
    a ceiling for a learned token action, not a policy. ``hide`` also sends the flagged digits to the bottom
    of the ranking, as :class:`SlipOracle` does. Counters: ``actions`` (equations rewritten), ``tries``
    (equations re-predicted), ``extra_forwards`` (rows of the second forwards: add them to the NFE).
    """

    def __init__(self, tokenizer, vocab_size: int, mask_id: int, accept: str = "any", hide: bool = False):
        super().__init__(tokenizer, vocab_size)
        if accept not in ACCEPT:
            raise ValueError(f"accept {accept!r}: choose one of {', '.join(ACCEPT)}")
        self.mask_id, self.accept, self.hide = int(mask_id), accept, bool(hide)
        self.actions = self.tries = self.extra_forwards = 0

    def score(self, logits, tokens, masked, keep, ups=None, hidden=None):
        if self.hide:
            return super().score(logits, tokens, masked, keep, ups, hidden)
        return position_scores("entropy", logits, tokens, None, None)

    def token_action(self, x0: torch.Tensor, cur: torch.Tensor, repredict) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates, block) after the rewrite; ``repredict(rows, block)`` is the decoder's second look."""
        tok = torch.where(cur == self.mask_id, x0, cur)
        need = torch.isin(tok, self.eq_ids.to(tok.device)).any(1).nonzero().squeeze(1).tolist()
        found = [(b, find_slips([self.pieces[t] for t in row])) for b, row in zip(need, tok[need].tolist())]
        found = [(b, sl) for b, sl in found if sl]
        if not found:
            return x0, cur
        rows = [b for b, _ in found]
        block = tok[rows].clone()
        for j, (_, sl) in enumerate(found):
            for slip in sl:
                block[j, slip.result + slip.copies] = self.mask_id
        pred = repredict(rows, block).argmax(-1)
        self.extra_forwards += len(rows)
        x0, cur = x0.clone(), cur.clone()
        for j, (b, sl) in enumerate(found):
            for slip in sl:
                self.tries += 1
                c = "".join(self.pieces[t] for t in pred[j, slip.result].tolist())
                if self.accept == "true" and not (c.isdigit() and equation_is_true(slip.a, slip.op, slip.b, c)):
                    continue
                self.actions += 1
                at = torch.tensor(slip.result + slip.copies, device=x0.device)
                x0[b, at] = pred[j, at]
                visible = cur[b, at] != self.mask_id
                cur[b, at[visible]] = pred[j, at[visible]]
        return x0, cur
