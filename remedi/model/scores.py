"""The training-free confidence statistics of a step's positions: what the sampler ranks by, what a residual UPS
anchors on.

They read only a step's prepared logits (and, for ``ups``, the UPS logits), so they sit at the model floor:
the decoders (:mod:`remedi.decoding.step`, which re-exports :func:`position_scores`) and the residual UPS
(:mod:`remedi.model.residual`) both import them from here, and neither imports the other.
"""
from __future__ import annotations

from typing import Optional

import torch

RANDOM_STRATEGIES = ("llada_random", "random")


def position_scores(strategy: str, logits: torch.Tensor, tokens: torch.Tensor, ups: Optional[torch.Tensor],
                    rand: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, Lb) float64 score of ``tokens`` (candidate or current token) at each position."""
    if strategy in RANDOM_STRATEGIES:
        return rand
    if strategy == "ups":
        return torch.sigmoid(ups.double())
    logp = torch.log_softmax(logits.double(), -1)  # (B, Lb, V)
    if strategy in ("tps_prob", "llada_low_confidence"):
        return logp.gather(-1, tokens[..., None]).squeeze(-1).exp()
    p = logp.exp()
    if strategy == "margin":
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if strategy == "entropy":
        return torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # minus the entropy
    raise ValueError(f"unknown strategy {strategy!r}")
