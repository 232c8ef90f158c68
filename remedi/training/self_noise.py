"""On-policy corruption: fill the positions chosen for corruption with the model's own predictions.

Why: Remask SFT's incorrect tokens (arXiv:2509.23653) are random replacements, which look nothing like
the plausible mistakes the model commits at inference, so a UPS trained on them learns to trust almost
every committed token. Here a position chosen for corruption is instead masked, the model predicts it
from that masked state without gradients (argmax, or sampled at a temperature), and the prediction is
written there. Its UPS label is 1 when the prediction equals x0 and 0 when it does not; masked positions
keep the soft label stopgrad p(x0 | x_t).

``select="confident"`` (PRISM-style commits): instead of the randomly chosen positions, each row commits
as many positions as were chosen, namely the ones whose prediction the model is surest of (highest
max-probability among the masked state), as a low-confidence-remasking sampler would; the positions
that lose out stay masked.

The CPU side (:func:`draw_self_positions`) uses only the caller's generator; the model pass itself draws
nothing at random (dropout is off during it, sampling reads pre-drawn uniforms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NOISE_SOURCES = ("random", "self")
SELF_SELECT = ("random", "confident")


@dataclass(frozen=True)
class SelfNoise:
    mask_id: int
    temperature: float = 0.0  # 0: argmax
    select: str = "random"  # random | confident

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"--self_noise_temperature must be >= 0, got {self.temperature}")
        if self.select not in SELF_SELECT:
            raise ValueError(f"--self_noise_select {self.select!r}: choose {', '.join(SELF_SELECT)}")


def draw_self_positions(incorrect: torch.Tensor, ratio: float,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(self_pos, u), both (B, L): which corruption positions the model fills (each with probability
    ``ratio``; the others keep their random replacement) and one uniform per position for sampling."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"--self_noise_ratio must be in (0, 1], got {ratio}")
    dev = generator.device
    u_pick = torch.rand(incorrect.shape, generator=generator, device=dev).to(incorrect.device)
    u = torch.rand(incorrect.shape, generator=generator, device=dev).to(incorrect.device)
    return incorrect & (u_pick < ratio), u


@dataclass
class SelfCorrupted:
    """Every tensor (B, L) on the model's device."""

    x_t: torch.Tensor
    masked: torch.Tensor
    incorrect: torch.Tensor  # random replacements and wrong self predictions
    clean: torch.Tensor  # untouched positions and right self predictions
    self_pos: torch.Tensor
    pred: torch.Tensor  # the model's token at self_pos (x_t there), x0 elsewhere


def pick_tokens(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """(N,) tokens from (N, V) logits: argmax at temperature 0, else inverse-CDF sampling with ``u`` (N,)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (N, V)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None]).squeeze(-1)  # (N,)
    return idx.clamp_max(logits.shape[-1] - 1)


@torch.no_grad()
def self_corrupt(lm, x_t: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, incorrect: torch.Tensor,
                 clean: torch.Tensor, self_pos: torch.Tensor, u: Optional[torch.Tensor],
                 cfg: SelfNoise) -> SelfCorrupted:
    """Mask ``self_pos``, predict it with the model (no gradient, dropout off) and write the predictions."""
    x_in = x_t.clone()
    x_in[self_pos] = cfg.mask_id  # the masked state the model predicts from
    was_training = lm.training
    lm.eval()
    try:
        logits = lm.model(x_in).logits  # (B, L, V)
    finally:
        lm.train(was_training)
    if u is None:
        u = torch.zeros(x0.shape, device=x0.device)
    if cfg.select == "confident":
        cand = masked | self_pos  # every position of the masked state
        lsel = logits[cand].float()  # (N, V)
        lsel[:, cfg.mask_id] = float("-inf")
        conf = torch.full(x0.shape, float("-inf"), device=x0.device)
        conf[cand] = lsel.amax(-1) - torch.logsumexp(lsel, -1)  # log max-probability
        order = torch.sort(conf, dim=-1, descending=True, stable=True).indices  # (B, L)
        ranks = torch.arange(x0.shape[1], device=x0.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, ranks)  # rank[b, i]: place of position i in row b
        k = self_pos.sum(-1, keepdim=True)  # (B, 1): as many commits per row as positions were chosen
        committed = cand & (rank < k)
        masked, self_pos = cand & ~committed, committed
    sel = logits[self_pos].float()  # (N, V)
    sel[:, cfg.mask_id] = float("-inf")  # a committed position never holds the mask token
    pred = x0.clone()
    pred[self_pos] = pick_tokens(sel, cfg.temperature, u[self_pos])
    out = x_in.clone()
    out[self_pos] = pred[self_pos]
    ok = pred == x0
    incorrect = (incorrect & ~self_pos & ~masked) | (self_pos & ~ok)
    clean = (clean & ~masked) | (self_pos & ok)
    return SelfCorrupted(x_t=out, masked=masked, incorrect=incorrect, clean=clean, self_pos=self_pos, pred=pred)
