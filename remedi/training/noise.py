"""Remask SFT noise (RemeDi, arXiv:2509.23653): mask, then corrupt some of what stays unmasked.

For a clean answer x0 (the prompt is never noised) and a time t ~ U(0, 1):

    rho_mask(t)      = t                  ("linear", the paper)   or (1 - eps) t + eps  ("llada", eps = 1e-3)
    rho_incorrect(t) = 4 r t (1 - t)      r = --r_incorrect (paper 0.1)

Each answer token is masked with probability rho_mask(t); each still-unmasked answer token is then replaced
by a wrong token with probability rho_incorrect(t). The replacement is never the original token and never a
special token; it is drawn uniformly over the ordinary vocabulary (``vocab``) or from the unigram of the
tokens in the batch (``batch``, what the authors' code does); :mod:`remedi.training.self_noise` can
refill some of them with the model's own predictions. The three answer sets are returned:
S_mask, S_incorrect (unmasked and != x0) and S_clean (== x0).

The paper's monotonicity condition: the total corruption rho_mask(t) + rho_incorrect(t) must not decrease
in t (more time = more noise). d/dt [t + 4rt(1-t)] = 1 + 4r(1 - 2t) >= 0 for all t in [0, 1] exactly when
r <= 1/4, hence ``--r_incorrect`` in [0, 0.25]; the same bound keeps rho_mask + rho_incorrect <= 1.

Every random draw goes through the caller's ``torch.Generator``; the same generator state gives the same
noise on any device (draws happen on the generator's device, results are moved to x0's device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

SCHEDULES = ("linear", "llada")
INCORRECT_SOURCES = ("vocab", "batch")
LLADA_EPS = 1e-3
R_INCORRECT_MAX = 0.25


def rho_mask(t: torch.Tensor, schedule: str = "linear", eps: float = LLADA_EPS) -> torch.Tensor:
    """Masking probability at time t."""
    if schedule == "linear":
        return t
    if schedule == "llada":
        return (1 - eps) * t + eps
    raise ValueError(f"--mask_schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def rho_incorrect(t: torch.Tensor, r: float) -> torch.Tensor:
    """Probability that a still-unmasked answer token is replaced by a wrong one: 4 r t (1 - t)."""
    return 4.0 * r * t * (1.0 - t)


def total_noise(t: torch.Tensor, r: float, schedule: str = "linear") -> torch.Tensor:
    """rho_mask(t) + rho_incorrect(t): the quantity the paper requires to be non-decreasing in t."""
    return rho_mask(t, schedule) + rho_incorrect(t, r)


def check_r_incorrect(r: float) -> None:
    if not 0.0 <= r <= R_INCORRECT_MAX:
        raise ValueError(
            f"--r_incorrect {r} is outside [0, {R_INCORRECT_MAX}]: the noise rho_mask(t) + 4 r t (1 - t) must not "
            f"decrease in t (RemeDi, arXiv:2509.23653), which needs r <= 1/4; the paper uses 0.1")


@dataclass
class Noised:
    """Output of :func:`inject_noise`; every tensor is (B, L) on x0's device."""

    x_t: torch.Tensor  # long: noisy input
    t: torch.Tensor  # float32: the time of each position (per row, or per block of the answer)
    p_mask: torch.Tensor  # float32: rho_mask(t) per position (the TPS loss weights masked CE by 1 / p_mask)
    masked: torch.Tensor  # bool: S_mask
    incorrect: torch.Tensor  # bool: S_incorrect
    clean: torch.Tensor  # bool: S_clean (answer positions holding x0)


def answer_block_index(answer_mask: torch.Tensor, block_length: int) -> torch.Tensor:
    """(B, L) long: index of each answer position's block, counted from the row's first answer token."""
    k = answer_mask.long().cumsum(-1) - 1  # 0-based rank of the position within the answer
    return torch.where(answer_mask, k.clamp_min(0) // block_length, torch.zeros_like(k))


def sample_times(answer_mask: torch.Tensor, generator: torch.Generator,
                 block_length: Optional[int] = None) -> torch.Tensor:
    """(B, L) float32 times: one t per row, or (block diffusion) one per answer block of ``block_length``."""
    B, L = answer_mask.shape
    dev = generator.device
    if block_length is None:
        t = torch.rand(B, generator=generator, device=dev).to(answer_mask.device)
        return t[:, None].expand(B, L).contiguous()
    if block_length <= 0:
        raise ValueError(f"--train_block_length must be positive, got {block_length}")
    n_blocks = -(-L // block_length)
    tb = torch.rand(B, n_blocks, generator=generator, device=dev).to(answer_mask.device)  # (B, n_blocks)
    return tb.gather(1, answer_block_index(answer_mask, block_length))


def _replacements(x0: torch.Tensor, candidates: torch.Tensor, weights: Optional[torch.Tensor],
                  generator: torch.Generator) -> torch.Tensor:
    """One replacement per element of x0 (1-D), never equal to it, drawn from ``candidates``.

    ``candidates`` (K,) long, sorted and distinct; ``weights`` (K,) or None (uniform). Excluding the
    original is exact: uniform draws pick among the K-1 other candidates (index shifted past the
    original's), weighted draws zero the original's weight.
    """
    if candidates.numel() < 2:
        raise ValueError("need at least two ordinary (non-special) token ids to draw incorrect tokens from")
    dev = generator.device
    cand, orig = candidates.to(dev), x0.to(dev)
    pos = torch.searchsorted(cand, orig)  # (N,) where the original sits among the candidates
    present = (pos < cand.numel()) & (cand[pos.clamp_max(cand.numel() - 1)] == orig)
    if weights is None:
        k = torch.where(present, cand.numel() - 1, cand.numel())
        idx = (torch.rand(orig.shape, generator=generator, device=dev) * k).long().clamp_max(k - 1)
        idx = idx + (present & (idx >= pos)).long()  # skip over the original
        return cand[idx].to(x0.device)
    probs = weights.to(dev, torch.float32)[None, :].expand(orig.numel(), -1).clone()  # (N, K)
    probs[torch.arange(orig.numel(), device=dev)[present], pos[present]] = 0.0
    # K >= 2 candidates with positive counts, so every row keeps some positive weight.
    pick = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return cand[pick].to(x0.device)


def ordinary_ids(vocab_size: int, special_ids: Iterable[int]) -> torch.Tensor:
    """All token ids in [0, vocab_size) that are not special (the pool for ``vocab`` replacements)."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    for s in special_ids:
        if s is not None and 0 <= int(s) < vocab_size:
            keep[int(s)] = False
    return keep.nonzero().squeeze(-1)


def inject_noise(
    x0: torch.Tensor,
    answer_mask: torch.Tensor,
    *,
    mask_id: int,
    r_incorrect: float,
    generator: torch.Generator,
    vocab_size: int,
    special_ids: Iterable[int],
    schedule: str = "linear",
    incorrect_source: str = "batch",
    block_length: Optional[int] = None,
    t: Optional[torch.Tensor] = None,
) -> Noised:
    """Noise the answer span of x0 (B, L); the prompt (answer_mask False) is returned untouched.

    ``t``: optional (B, L) times (tests); otherwise drawn per row or per answer block.
    ``special_ids``: ids never used as replacements (mask, eos, pad, eot, bos, every tokenizer special).
    """
    check_r_incorrect(r_incorrect)
    if incorrect_source not in INCORRECT_SOURCES:
        raise ValueError(f"--incorrect_source {incorrect_source!r}: choose one of {', '.join(INCORRECT_SOURCES)}")
    answer_mask = answer_mask.to(torch.bool)
    dev = generator.device
    if t is None:
        t = sample_times(answer_mask, generator, block_length)
    t = t.to(x0.device, torch.float32)
    p_mask = rho_mask(t, schedule)
    p_inc = rho_incorrect(t, r_incorrect)
    u_mask = torch.rand(x0.shape, generator=generator, device=dev).to(x0.device)
    u_inc = torch.rand(x0.shape, generator=generator, device=dev).to(x0.device)
    masked = answer_mask & (u_mask < p_mask)
    incorrect = answer_mask & ~masked & (u_inc < p_inc)
    specials = {int(s) for s in special_ids if s is not None} | {int(mask_id)}
    if incorrect_source == "vocab":
        cand, weights = ordinary_ids(vocab_size, specials), None
    else:
        tokens = x0[answer_mask]
        tokens = tokens[~torch.isin(tokens, torch.tensor(sorted(specials), device=tokens.device))]
        cand, counts = torch.unique(tokens, return_counts=True)
        weights = counts.float()
        if cand.numel() < 2:  # a batch with one distinct ordinary token cannot supply a wrong one
            cand, weights = ordinary_ids(vocab_size, specials), None
    x_t = x0.clone()
    if bool(incorrect.any()):
        x_t[incorrect] = _replacements(x0[incorrect], cand, weights, generator)
    x_t[masked] = mask_id
    clean = answer_mask & ~masked & ~incorrect
    return Noised(x_t=x_t, t=t, p_mask=p_mask, masked=masked, incorrect=incorrect, clean=clean)
