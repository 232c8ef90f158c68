"""The loss of one micro-batch: :func:`loss_step`, and :class:`TrainStep`, the module DDP/FSDP wrap around it.

Remask SFT (RemeDi, arXiv:2509.23653): L = L_TPS + lambda_ups * L_UPS, where L_TPS is LLaDA's masked
cross-entropy weighted by 1/t (arXiv:2502.09992) and L_UPS the BCE of the confidence logits against
1 (clean) / 0 (incorrect) / stopgrad p(x0 | x_t) (masked). Alternating training splits it into ``tps``
and ``ups`` phases, each keeping only its own loss's graph.

Everything a micro-batch computes, including the optional no-gradient pass that fills self-noise
positions with the model's own predictions, runs inside one ``forward`` so that DDP and FSDP see a
single forward per backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from remedi.model.llada import RemeDiLM
from remedi.training.losses import tps_loss, true_token_logprob, ups_labels, ups_loss
from remedi.training.self_noise import SelfNoise, self_corrupt

PHASES = ("joint", "tps", "ups")


@dataclass(frozen=True)
class StepConfig:
    """What a step needs besides the batch. ``backbone_trains``: LoRA or full backbone parameters train."""

    backbone_trains: bool
    label_smoothing: bool = False
    lambda_ups: float = 1.0
    self_noise: Optional[SelfNoise] = None


def combine_losses(tps: torch.Tensor, ups: Optional[torch.Tensor], phase: str, lambda_ups: float) -> torch.Tensor:
    """The loss to backpropagate. A TPS loss without a graph (frozen backbone, head UPS) only gets logged."""
    if phase == "ups":
        return lambda_ups * ups
    if phase == "tps":
        return tps
    loss = tps if tps.requires_grad else tps.new_zeros(())
    if ups is not None and lambda_ups > 0:
        loss = loss + lambda_ups * ups
    return loss


def loss_step(lm: RemeDiLM, cfg: StepConfig, x_t, x0, answer_mask, masked, incorrect, clean, p_mask,
              phase: str = "joint", self_pos: Optional[torch.Tensor] = None,
              self_u: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """(loss, metrics) of one micro-batch; every input is (B, L) on the model's device.

    ``self_pos``/``self_u`` (with ``cfg.self_noise``): positions the model fills with its own predictions
    and one uniform per position for sampling them (see :mod:`remedi.training.self_noise`).

    The backbone runs without autograd when nothing upstream of the outputs needs a gradient (head UPS with
    a frozen backbone, or a UPS step of alternating mode with a head). ``metrics`` holds the detached
    pieces the loop logs: tps_loss, ups_loss, ups_logits, labels, argmax_ok and the final sets masked,
    incorrect, clean (after self-noise), plus self_pos when self-noise ran.
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: choose one of {', '.join(PHASES)}")
    sets = {"masked": masked, "incorrect": incorrect, "clean": clean}
    if self_pos is not None:
        if cfg.self_noise is None:
            raise ValueError("self_pos given, but the step has no self-noise configuration")
        sc = self_corrupt(lm, x_t, x0, masked, incorrect, clean, self_pos, self_u, cfg.self_noise)
        x_t = sc.x_t
        sets = {"masked": sc.masked, "incorrect": sc.incorrect, "clean": sc.clean, "self_pos": sc.self_pos}
    masked, incorrect, clean = sets["masked"], sets["incorrect"], sets["clean"]
    arch = lm.ups_arch
    grad_backbone = (arch == "stream" or (cfg.backbone_trains and phase != "ups")) and torch.is_grad_enabled()
    with torch.set_grad_enabled(grad_backbone):
        # The TPS loss and the masked positions' UPS labels need logits at S_mask only: project just those
        # hidden states onto the vocabulary (a (N, V) float32 log-softmax instead of (B, L, V)).
        out = lm.model(x_t, compute_logits=False)
        masked_logits = lm.model.lm_head(out.hidden[masked])  # (N, V), N = |S_mask|
    logp, argmax_ok = true_token_logprob(masked_logits, x0, masked)  # (B, L), only on S_mask
    l_tps = tps_loss(logp, masked, p_mask, answer_mask)
    metrics = {"tps_loss": l_tps, "argmax_ok": argmax_ok, **sets}
    l_ups = None
    if arch is not None:
        ups_logits = lm.ups_head(out.hidden.detach()) if arch == "head" else out.ups_logits  # (B, L)
        labels = ups_labels(clean, incorrect, masked, logp.exp(), smoothing=cfg.label_smoothing)
        l_ups = ups_loss(ups_logits, labels, answer_mask)
        metrics.update(ups_loss=l_ups, ups_logits=ups_logits.detach(), labels=labels)
    # Alternating mode: only the phase's loss keeps its graph, so DDP (find_unused_parameters) sees the
    # other part's parameters as unused instead of waiting for gradients that never come.
    if phase == "tps" and l_ups is not None:
        metrics["ups_loss"] = l_ups = l_ups.detach()
    if phase == "ups":
        metrics["tps_loss"] = l_tps = l_tps.detach()
    return combine_losses(l_tps, l_ups, phase, cfg.lambda_ups), metrics


class TrainStep(nn.Module):
    """:func:`loss_step` as a module, so DDP/FSDP wrap one forward; returns {"loss", **metrics}."""

    def __init__(self, lm: RemeDiLM, backbone_trains: bool, label_smoothing: bool = False, lambda_ups: float = 1.0,
                 self_noise: Optional[SelfNoise] = None):
        super().__init__()
        self.lm = lm
        self.cfg = StepConfig(backbone_trains, label_smoothing, lambda_ups, self_noise)

    def forward(self, x_t, x0, answer_mask, masked, incorrect, clean, p_mask, phase: str = "joint",
                self_pos=None, self_u=None) -> dict:
        loss, metrics = loss_step(self.lm, self.cfg, x_t, x0, answer_mask, masked, incorrect, clean, p_mask,
                                  phase=phase, self_pos=self_pos, self_u=self_u)
        return {"loss": loss, **metrics}
