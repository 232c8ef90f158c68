"""Per-position features of one decoding step, computed from what the sampler already has (no extra forward).

A step of the remask sampler sees, for the current block (B, Lb): the prepared logits (mask and, with
``logits_eos_inf``, EOS at -inf), the token each position would hold (candidate where masked, current token
where visible), the masked flag and K_n, the number of positions kept after the step. The model side adds
the base UPS logit (head or stream) and, optionally, a low-rank projection of the final hidden state
(:meth:`remedi.model.residual.ResidualUPS.model_features`). From these, :func:`step_features` builds the
feature vector of every position; :func:`step_features_reference` computes the same numbers with plain
per-position Python loops (the slow, obviously correct path; tests/test_residual_ups.py checks they agree).

Features (all float64; names as recorded in a residual UPS file):

  entropy       entropy of the position's distribution, nats (the sampler's ``entropy`` score is minus it)
  margin        top-1 minus top-2 probability
  logp_tok      log p(token), floored at ``LOGP_FLOOR`` (a visible EOS under logits_eos_inf has p = 0)
  logp_max      log of the top-1 probability
  masked        1 where the position is masked before the step
  pos           position in the block, i / (Lb - 1)
  progress      K_n / Lb: the share of the block visible after the step (steps n / N of the schedule)
  digit / operator / equals    the token's type (a per-vocabulary lookup table, :func:`token_types`)
  result_digit  a digit whose nearest preceding non-digit, non-space token of the block is '=': the
                digits of ``c`` in ``a op b = c``, where the embedded model's slips are
  ctx_entropy   entropy minus the block's mean entropy (block context)
  base          the base UPS logit (0 when the model has no base UPS)
  hidden        ``hidden_rank`` columns: the low-rank projection of the hidden state
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

LOGP_FLOOR = -30.0
TYPE_OTHER, TYPE_DIGIT, TYPE_OPERATOR, TYPE_EQUALS, TYPE_SPACE = range(5)
OPERATOR_CHARS = frozenset("+-*/x×÷")
SCALAR_FEATURES = ("entropy", "margin", "logp_tok", "logp_max", "masked", "pos", "progress", "digit", "operator",
                   "equals", "result_digit", "ctx_entropy", "base")
FEATURES = SCALAR_FEATURES + ("hidden",)


def token_types(tokenizer, vocab_size: Optional[int] = None) -> torch.Tensor:
    """(V,) uint8: the type of every vocabulary id, from its decoded text (computed once per tokenizer).

    digit: the text (spaces stripped) is all digits; operator: one of + - * / x × ÷; equals: '='; space:
    whitespace only; everything else (words, punctuation, special tokens) is other. Ids past the
    tokenizer's vocabulary (embedding padding) are other.
    """
    n = len(tokenizer)
    V = max(n, vocab_size or 0)
    out = torch.full((V,), TYPE_OTHER, dtype=torch.uint8)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i in range(n):
        if i in special:
            continue
        text = tokenizer.decode([i])
        s = text.strip()
        if not s:
            out[i] = TYPE_SPACE if text else TYPE_OTHER
        elif s.isdigit() and s.isascii():
            out[i] = TYPE_DIGIT
        elif s == "=":
            out[i] = TYPE_EQUALS
        elif s in OPERATOR_CHARS:
            out[i] = TYPE_OPERATOR
    return out


def feature_width(names: Sequence[str], hidden_rank: int) -> int:
    return sum(hidden_rank if n == "hidden" else 1 for n in names)


def check_feature_names(names: Sequence[str], hidden_rank: int) -> None:
    bad = [n for n in names if n not in FEATURES]
    if bad:
        raise ValueError(f"unknown residual features {bad}; choose from {', '.join(FEATURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"residual features listed twice: {list(names)}")
    if ("hidden" in names) != (hidden_rank > 0):
        raise ValueError("the 'hidden' feature needs hidden_rank > 0, and hidden_rank > 0 needs the 'hidden' feature")


def _result_digits(types: torch.Tensor) -> torch.Tensor:
    """(B, Lb) bool: digits whose nearest preceding non-digit, non-space token in the block is '='."""
    B, Lb = types.shape
    out = torch.zeros(B, Lb, dtype=torch.bool, device=types.device)
    state = torch.zeros(B, dtype=torch.bool, device=types.device)  # "the last non-digit, non-space was '='"
    for i in range(Lb):  # Lb is a block (32): a short loop over positions, vectorised over rows
        t = types[:, i]
        digit = t == TYPE_DIGIT
        out[:, i] = digit & state
        state = torch.where(digit | (t == TYPE_SPACE), state, t == TYPE_EQUALS)
    return out


def step_features(names: Sequence[str], logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                  keep: torch.Tensor, type_table: torch.Tensor, model_feats: Optional[torch.Tensor],
                  hidden_rank: int = 0) -> torch.Tensor:
    """(B, Lb, F) float64 features of one step (see the module docstring).

    logits (B, Lb, V) prepared; tokens (B, Lb) the candidate or current token; masked (B, Lb) bool;
    keep (B,) K_n; type_table (V,); model_feats (B, Lb, 1 + hidden_rank): base logit, then the hidden
    projection (None: zeros).
    """
    B, Lb = tokens.shape
    logp = torch.log_softmax(logits.double(), -1)  # (B, Lb, V)
    p = logp.exp()
    cols = {}
    want = set(names)
    if want & {"entropy", "ctx_entropy"}:
        ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # (B, Lb)
        cols["entropy"] = ent
        cols["ctx_entropy"] = ent - ent.mean(1, keepdim=True)
    if "margin" in want:
        top = p.topk(2, dim=-1).values
        cols["margin"] = top[..., 0] - top[..., 1]
    if "logp_tok" in want:
        cols["logp_tok"] = logp.gather(-1, tokens[..., None]).squeeze(-1).clamp(min=LOGP_FLOOR)
    if "logp_max" in want:
        cols["logp_max"] = logp.max(-1).values.clamp(min=LOGP_FLOOR)
    cols["masked"] = masked.double()
    cols["pos"] = (torch.arange(Lb, device=tokens.device, dtype=torch.float64) / max(Lb - 1, 1)).expand(B, Lb)
    cols["progress"] = (keep.double() / Lb)[:, None].expand(B, Lb)
    types = type_table.to(tokens.device)[tokens]  # (B, Lb)
    cols["digit"] = (types == TYPE_DIGIT).double()
    cols["operator"] = (types == TYPE_OPERATOR).double()
    cols["equals"] = (types == TYPE_EQUALS).double()
    if "result_digit" in want:
        cols["result_digit"] = _result_digits(types).double()
    mf = model_feats.double() if model_feats is not None else \
        torch.zeros(B, Lb, 1 + hidden_rank, dtype=torch.float64, device=tokens.device)
    cols["base"] = mf[..., 0]
    out = [mf[..., 1:1 + hidden_rank] if n == "hidden" else cols[n][..., None] for n in names]
    return torch.cat(out, -1)  # (B, Lb, F)


def step_features_reference(names: Sequence[str], logits: torch.Tensor, tokens: torch.Tensor,
                            masked: torch.Tensor, keep: torch.Tensor, type_table: torch.Tensor,
                            model_feats: Optional[torch.Tensor], hidden_rank: int = 0) -> torch.Tensor:
    """:func:`step_features` position by position with Python floats (slow; the reference for tests)."""
    B, Lb = tokens.shape
    rows = []
    for b in range(B):
        probs = [torch.softmax(logits[b, i].double(), -1).tolist() for i in range(Lb)]
        ents = [-sum(q * math.log(q) for q in pr if q > 0) for pr in probs]
        mean_ent = sum(ents) / Lb
        types = [int(type_table[int(t)]) for t in tokens[b]]
        row = []
        for i in range(Lb):
            pr = probs[i]
            srt = sorted(pr, reverse=True)
            tok = int(tokens[b, i])
            j = i - 1
            while j >= 0 and types[j] in (TYPE_DIGIT, TYPE_SPACE):
                j -= 1
            is_result = types[i] == TYPE_DIGIT and j >= 0 and types[j] == TYPE_EQUALS
            mf = [0.0] * (1 + hidden_rank) if model_feats is None else [float(v) for v in model_feats[b, i]]
            val = {"entropy": ents[i], "margin": srt[0] - srt[1],
                   "logp_tok": max(math.log(pr[tok]) if pr[tok] > 0 else -math.inf, LOGP_FLOOR),
                   "logp_max": max(math.log(srt[0]), LOGP_FLOOR), "masked": float(bool(masked[b, i])),
                   "pos": i / max(Lb - 1, 1), "progress": float(keep[b]) / Lb,
                   "digit": float(types[i] == TYPE_DIGIT), "operator": float(types[i] == TYPE_OPERATOR),
                   "equals": float(types[i] == TYPE_EQUALS), "result_digit": float(is_result),
                   "ctx_entropy": ents[i] - mean_ent, "base": mf[0]}
            feats = []
            for n in names:
                feats += mf[1:1 + hidden_rank] if n == "hidden" else [val[n]]
            row.append(feats)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)
