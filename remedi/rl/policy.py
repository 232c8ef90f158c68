"""Remask RL policy terms: Plackett-Luce unmasking policy, token policy, clipped losses.

RemeDi's Remask RL (paper Eq. 8) treats one denoising step of a block as two actions drawn from one forward
pass of the model on the current state x_t (a block of Lb positions):

* token action: x_hat_i ~ softmax(logits_i / T_tok) at every currently masked position i (visible tokens are
  copied);
* position action: an ordered list u_1..u_K of K = K_n block positions drawn without replacement from the
  Plackett-Luce (PL) distribution with weights q = softmax(h / T_pos) over the *eligible* positions, h being
  the UPS scores. The next state keeps x_hat at u_1..u_K and re-masks every other block position.

Position log-probability (Eq. 8, sums over eligible j only):

    log pi_pos(u | x_t) = sum_{k=1..K} [ log q_{u_k} - log sum_{j not in {u_1..u_{k-1}}} q_j ]
                        = sum_{k=1..K} [ z_{u_k} - logsumexp_{j eligible, j not in {u_1..u_{k-1}}} z_j ],
      z = h / T_pos

(the normaliser of q cancels, so the raw scaled scores z are used). Token log-probability of a newly unmasked
position i (chosen at this step and masked before it): log softmax(logits_i / T_tok)[x_hat_i].

Loss, as in the authors' code (token and PL ratios clipped separately), with r = exp(logp_new - logp_old):

    L = -[ sum_tokens min(r_tok A, clip(r_tok, 1-eps, 1+eps) A)
           + sum_(block,step) min(r_PL A, clip(r_PL, 1-eps, 1+eps) A) ] / normaliser

or, in 'joint' mode, one ratio per (block, step): r = prod_tokens r_tok * r_PL. The advantages (GRPO's
A = (R - mean_group) / (std_group + 1e-4), leave-one-out, greedy baseline, per-block credit) are in
remedi.rl.advantages. An optional KL penalty to a frozen reference uses the k3 estimator
exp(ref - new) - (ref - new) - 1.

Only torch and the standard library are used. Every random draw takes an explicit ``torch.Generator``; a list of
one generator per row makes each row's draw independent of the rest of the batch.
"""
from __future__ import annotations

from typing import Dict, Literal, Optional, Sequence, Tuple, Union

import torch

# moved to remedi.rl.advantages (with the other baselines); re-exported for existing imports
from remedi.rl.advantages import group_advantages  # noqa: F401

__all__ = [
    "Generators", "plackett_luce_logprob", "sample_plackett_luce", "order_to_mask", "token_logprob",
    "sample_tokens", "group_advantages", "clipped_surrogate", "grpo_loss", "kl_k3",
]

Generators = Union[torch.Generator, Sequence[torch.Generator]]
ClipRange = Union[float, Tuple[float, float]]
Normaliser = Union[float, int, Literal["rollouts", "terms"]]

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------- helpers


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype (bf16, fp16, fp32, ints) computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_temperature(temperature: float, allow_zero: bool) -> None:
    if not isinstance(temperature, (int, float)) or temperature != temperature:
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if temperature < 0 or (temperature == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"temperature must be {bound}, got {temperature}")


def _eligible_mask(scores: torch.Tensor, eligible: Optional[torch.Tensor]) -> torch.Tensor:
    if eligible is None:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if eligible.shape != scores.shape:
        raise ValueError(f"eligible has shape {tuple(eligible.shape)}, expected {tuple(scores.shape)}")
    return eligible.to(device=scores.device, dtype=torch.bool)


def _gumbel(shape: Tuple[int, ...], generator: Optional[Generators], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise -log(-log U) of ``shape``; row b (dim 0) comes from ``generator[b]`` for a list."""
    if generator is None:
        raise ValueError("an explicit torch.Generator (or one per row) is required; the global RNG is not used")
    if isinstance(generator, torch.Generator):
        u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    else:
        gens = list(generator)
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for {shape[0]} rows")
        if not all(isinstance(g, torch.Generator) for g in gens):
            raise TypeError("generators must be torch.Generator objects")
        if gens:
            u = torch.stack([torch.rand(shape[1:], generator=g, dtype=dtype, device=device) for g in gens])
        else:
            u = torch.empty(shape, dtype=dtype, device=device)
    u = u.clamp_(min=torch.finfo(dtype).tiny)  # rand is in [0, 1): keep log finite at 0
    return -torch.log(-torch.log(u))


def _right_expand(t: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """Broadcast ``t`` to ``shape`` by appending singleton dims (an (N,) advantage -> (N, S, Lb))."""
    if t.dim() > len(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not broadcast to {tuple(shape)}")
    t = t.reshape(tuple(t.shape) + (1,) * (len(shape) - t.dim()))
    try:
        return t.expand(shape)
    except RuntimeError as e:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not broadcast to {tuple(shape)}") from e


def _clip_bounds(clip: ClipRange) -> Tuple[float, float]:
    lo, hi = (clip, clip) if isinstance(clip, (int, float)) else tuple(clip)
    if not (0 <= lo < 1) or hi < 0:
        raise ValueError(f"clip must give 0 <= eps_low < 1 and eps_high >= 0, got {clip!r}")
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------- Plackett-Luce policy


def _validate_order(order: torch.Tensor, valid: torch.Tensor, safe: torch.Tensor, elig: torch.Tensor) -> None:
    B, L = elig.shape
    if bool(((order < -1) | (order >= L)).any()):
        raise ValueError(f"order entries must be positions in [0, {L}) or -1 padding")
    if order.shape[1] > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("-1 padding in order must be trailing (a row draws its first k_b entries)")
    bad = valid & ~elig.gather(1, safe)  # (B, K)
    if bool(bad.any()):
        b, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"order[{b}, {k}] = {int(order[b, k])} is not an eligible position")
    counts = torch.zeros(B, L, dtype=torch.long, device=order.device).scatter_add_(1, safe, valid.long())
    if bool((counts > 1).any()):
        b = int((counts > 1).any(-1).nonzero()[0])
        raise ValueError(f"order row {b} draws a position more than once")


def plackett_luce_logprob(scores: torch.Tensor, order: torch.Tensor, eligible: Optional[torch.Tensor] = None,
                          temperature: float = 1.0, validate: bool = True) -> torch.Tensor:
    """log pi_pos(u | x_t) of ordered draws without replacement (RemeDi Eq. 8, position term).

        log pi = sum_{k=1..K_b} [ z_{u_k} - logsumexp_{j in E_b minus {u_1..u_{k-1}}} z_j ],   z = scores / T

    with E_b the eligible positions of row b (ineligible positions have probability zero).

    Args:
        scores: (B, L) raw UPS logits h, any float dtype (computed in float32, or float64 if given float64).
        order: (B, K) long positions u_1..u_K; a row drawing k_b < K entries pads its tail with -1.
        eligible: (B, L) bool, the positions a row may draw from; None = all.
        temperature: T_pos > 0.
        validate: check that entries are in range, eligible, distinct and the padding is trailing (ValueError
            otherwise). This synchronises with the device; turn it off only for inputs known to be valid.

    Returns:
        (B,) log-probabilities, differentiable w.r.t. ``scores``; 0 for a row with no draws. Vectorised over B,
        a loop over K; each step is a log-sum-exp over the positions still available (drawn and ineligible
        ones masked with -inf), so it is stable for scores of any magnitude.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, L), got shape {tuple(scores.shape)}")
    if order.dim() != 2 or order.shape[0] != scores.shape[0]:
        raise ValueError(f"order must be (B, K) with B = {scores.shape[0]}, got shape {tuple(order.shape)}")
    if order.dtype.is_floating_point or order.dtype == torch.bool:
        raise ValueError(f"order must be an integer tensor, got {order.dtype}")
    _check_temperature(temperature, allow_zero=False)
    B, L = scores.shape
    elig = _eligible_mask(scores, eligible)  # (B, L)
    order = order.to(device=scores.device, dtype=torch.long)  # (B, K)
    valid = order >= 0  # (B, K)
    safe = order.clamp(min=0)  # (B, K), padding points at position 0 and is masked out below
    if validate and order.numel():
        _validate_order(order, valid, safe, elig)

    z = scores.to(_compute_dtype(scores)) / temperature  # (B, L)
    # shift invariance: subtract the row max over eligible positions (no gradient flows through it), so the
    # differences z_u - logsumexp below are formed near 0 and keep full precision for large scores
    if L:
        zmax = z.detach().masked_fill(~elig, _NEG_INF).amax(dim=-1, keepdim=True)  # (B, 1)
        z = z - torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))  # (B, L)
    avail = elig.clone()  # (B, L) positions still drawable
    placeholder = torch.zeros_like(z)  # finite row for steps a row does not take (keeps gradients NaN-free)
    total = z.new_zeros(B)  # (B,)
    for k in range(order.shape[1]):
        idx = safe[:, k:k + 1]  # (B, 1)
        v = valid[:, k]  # (B,)
        masked = torch.where(v[:, None], z.masked_fill(~avail, _NEG_INF), placeholder)  # (B, L)
        lse = torch.logsumexp(masked, dim=-1)  # (B,)
        chosen = z.gather(1, idx).squeeze(1)  # (B,)
        total = total + torch.where(v, chosen - lse, torch.zeros_like(lse))
        avail = avail & ~torch.zeros_like(avail).scatter_(1, idx, v[:, None])
    return total


def _per_row_k(k: Union[int, torch.Tensor], B: int, device: torch.device) -> torch.Tensor:
    if isinstance(k, torch.Tensor):
        if k.dtype.is_floating_point or k.dtype == torch.bool:
            raise ValueError(f"k must be an int or an integer tensor, got {k.dtype}")
        if k.dim() == 0:
            k = k.expand(B)
        if k.shape != (B,):
            raise ValueError(f"k must be an int or a ({B},) tensor, got shape {tuple(k.shape)}")
        return k.to(device=device, dtype=torch.long)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int or a (B,) long tensor, got {k!r}")
    return torch.full((B,), k, dtype=torch.long, device=device)


def sample_plackett_luce(scores: torch.Tensor, k: Union[int, torch.Tensor], generator: Optional[Generators],
                         eligible: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
    """Draw ordered positions u_1..u_k without replacement from PL(softmax(scores / T)) over eligible positions.

    Gumbel-top-k: with G_j iid standard Gumbel, the positions sorted by descending z_j + G_j (z = scores / T)
    have exactly the law of k sequential PL draws, and the returned order is that descending order.

    Args:
        scores: (B, L) UPS logits h (not differentiated through; sampling is gradient-free).
        k: int, or (B,) long tensor of per-row counts; row b's tail beyond k_b is padded with -1.
        generator: one torch.Generator (noise for the whole (B, L) batch in one draw, so a row's draw depends
            on its place in the batch), or a list of B generators (row b's noise comes from generator[b]
            alone, so its draw does not depend on the other rows). Not consumed when temperature == 0.
        eligible: (B, L) bool; None = all positions. Ineligible positions are never drawn.
        temperature: T_pos >= 0; 0 = deterministic top-k of the scores (ties broken arbitrarily).

    Returns:
        (B, K) long order, K = max_b k_b, entries past k_b set to -1. ValueError if k_b exceeds the number of
        eligible positions of row b or is negative.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, L), got shape {tuple(scores.shape)}")
    _check_temperature(temperature, allow_zero=True)
    B, L = scores.shape
    elig = _eligible_mask(scores, eligible)  # (B, L)
    k_row = _per_row_k(k, B, scores.device)  # (B,)
    if B and bool((k_row < 0).any()):
        raise ValueError(f"k must be >= 0, got {k_row.tolist()}")
    n_elig = elig.sum(-1)  # (B,)
    over = k_row > n_elig  # (B,)
    if B and bool(over.any()):
        b = int(over.nonzero()[0])
        raise ValueError(f"row {b} asks for k = {int(k_row[b])} positions but only {int(n_elig[b])} are eligible")
    K = int(k_row.max()) if B else 0

    cd = _compute_dtype(scores)
    z = scores.detach().to(cd)  # (B, L)
    keys = z if temperature == 0 else z / temperature + _gumbel((B, L), generator, cd, scores.device)
    keys = keys.masked_fill(~elig, _NEG_INF)  # (B, L)
    order = keys.topk(K, dim=-1, largest=True, sorted=True).indices  # (B, K)
    pad = torch.arange(K, device=scores.device)[None, :] >= k_row[:, None]  # (B, K)
    return order.masked_fill(pad, -1)


def order_to_mask(order: torch.Tensor, length: int) -> torch.Tensor:
    """(B, K) order with -1 padding -> (B, length) bool, True at the drawn positions.

    The newly unmasked positions of a step (the ones whose token log-probs enter the loss) are
    ``order_to_mask(order, Lb) & was_masked``.
    """
    valid = order >= 0  # (B, K)
    out = torch.zeros(order.shape[0], length, dtype=torch.bool, device=order.device)
    return out.scatter_(1, order.clamp(min=0).long(), valid) if order.numel() else out


# --------------------------------------------------------------------------------------------- token policy


def token_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T_tok)[token], the token term of Eq. 8.

    Args:
        logits: (..., V) in any float dtype; the log-softmax runs in float32 (float64 kept).
        tokens: (...) integer ids, the leading shape of ``logits``.
        temperature: T_tok > 0.

    Returns:
        (...) float32 log-probabilities, differentiable w.r.t. ``logits``.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits.shape[:-1] "
                         f"= {tuple(logits.shape[:-1])}")
    _check_temperature(temperature, allow_zero=False)
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)  # (..., V)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (...)


def sample_tokens(logits: torch.Tensor, temperature: float, generators: Optional[Generators]) -> torch.Tensor:
    """Categorical draw x_hat ~ softmax(logits / T) by Gumbel-max: argmax(logits / T + G).

    Args:
        logits: (B, ..., V); row b (dim 0) uses ``generators[b]`` when a list of B generators is given (its draw
            is then independent of the other rows), or one generator draws the whole batch.
        temperature: T_tok >= 0; 0 = argmax (first index on ties) and the generators are not consumed (None
            is then allowed).

    Returns:
        (B, ...) long token ids.
    """
    _check_temperature(temperature, allow_zero=True)
    if temperature == 0:
        return logits.argmax(dim=-1)
    cd = _compute_dtype(logits)
    z = logits.detach().to(cd) / temperature  # (B, ..., V)
    return (z + _gumbel(tuple(z.shape), generators, cd, logits.device)).argmax(dim=-1)  # (B, ...)


# ------------------------------------------------------------------------------------------------- losses


def _ratio_stats(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, lo: float, hi: float,
                 prefix: str) -> Dict[str, float]:
    """Mean/min/max of the ratio over ``mask`` and the fraction of entries where the clipped branch is active
    (ratio > 1 + eps_high with A > 0, or ratio < 1 - eps_low with A < 0: those terms have zero gradient)."""
    with torch.no_grad():
        n = int(mask.sum())
        if n == 0:
            nan = float("nan")
            return {f"{prefix}ratio_mean": nan, f"{prefix}ratio_min": nan, f"{prefix}ratio_max": nan,
                    f"{prefix}clip_frac": nan, f"{prefix}count": 0.0}
        r = ratio[mask].float()
        a = adv[mask].float()
        clipped = ((r > 1 + hi) & (a > 0)) | ((r < 1 - lo) & (a < 0))
        mean, rmin, rmax, frac = torch.stack([r.mean(), r.min(), r.max(), clipped.float().mean()]).tolist()
        return {f"{prefix}ratio_mean": mean, f"{prefix}ratio_min": rmin, f"{prefix}ratio_max": rmax,
                f"{prefix}clip_frac": frac, f"{prefix}count": float(n)}


def clipped_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                      clip: ClipRange, mask: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Summed negative PPO clipped surrogate over the entries in ``mask``:

        loss_sum = - sum_{mask} min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),   r = exp(logp_new - logp_old)

    Args:
        logp_new: (...) log-probs under the current policy (carries the gradient).
        logp_old: (...) log-probs under the rollout policy (detached here).
        advantages: broadcastable to ``logp_new`` after appending singleton dims, e.g. (N,) per rollout.
        clip: eps, or (eps_low, eps_high).
        mask: (...) bool, the entries that count; None = all. Entries outside it may hold anything (even
            -inf): their log-ratio is zeroed before the exp, so neither value nor gradient is affected.

    Returns:
        (loss_sum, stats): a 0-dim tensor (not normalised), and floats ``ratio_mean/min/max``, ``clip_frac``
        (fraction of masked entries whose clipped branch is active, i.e. zero gradient) and ``count``.
    """
    lo, hi = _clip_bounds(clip)
    if logp_old.shape != logp_new.shape:
        raise ValueError(f"logp_old shape {tuple(logp_old.shape)} != logp_new shape {tuple(logp_new.shape)}")
    if mask is None:
        mask = torch.ones(logp_new.shape, dtype=torch.bool, device=logp_new.device)
    elif mask.shape != logp_new.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp_new shape {tuple(logp_new.shape)}")
    mask = mask.to(torch.bool)
    adv = _right_expand(advantages.detach(), logp_new.shape, "advantages").to(logp_new.dtype)  # (...)
    log_ratio = torch.where(mask, logp_new - logp_old.detach(), torch.zeros_like(logp_new))  # (...)
    ratio = torch.exp(log_ratio)  # (...)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - lo, 1 + hi) * adv)  # (...)
    loss_sum = -torch.where(mask, surr, torch.zeros_like(surr)).sum()
    return loss_sum, _ratio_stats(ratio, adv, mask, lo, hi, prefix="")


def kl_k3(logp_new: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_new || pi_ref) per sampled action: exp(d) - d - 1 with d = logp_ref - logp_new.

    Non-negative, zero iff the log-probs agree, and unbiased when the action is drawn from pi_new
    (E_new[exp(d)] = 1, so E[k3] = E_new[log pi_new - log pi_ref]). ``expm1`` keeps small d accurate.
    """
    d = logp_ref - logp_new
    return torch.expm1(d) - d


def _masked_k3_sum(new: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    d = torch.where(mask, ref.detach() - new, torch.zeros_like(new))  # zeroed before expm1: padding is inert
    return torch.where(mask, torch.expm1(d) - d, torch.zeros_like(d)).sum()


def grpo_loss(tok_new: torch.Tensor, tok_old: torch.Tensor, tok_mask: torch.Tensor,
              pl_new: torch.Tensor, pl_old: torch.Tensor, pl_mask: torch.Tensor,
              adv_tok: torch.Tensor, adv_pl: Optional[torch.Tensor] = None, clip: ClipRange = 0.2,
              mode: Literal["separate", "joint"] = "separate",
              kl: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None, kl_coef: float = 0.0,
              normaliser: Normaliser = "rollouts") -> Tuple[torch.Tensor, Dict[str, float]]:
    """Remask-RL GRPO loss (RemeDi Eq. 8 with the authors' clipping).

    Layout: N rollouts, S = (number of blocks) x (steps per block) (block, step) slots, Lb block positions.

    Args:
        tok_new, tok_old: (N, S, Lb) token log-probs log softmax(logits / T_tok)[x_hat] of the current and the
            rollout policy (``token_logprob``); only entries in ``tok_mask`` are read.
        tok_mask: (N, S, Lb) bool, True at the positions newly unmasked at that step (drawn and masked before).
        pl_new, pl_old: (N, S) position log-probs log pi_pos(u | x_t) (``plackett_luce_logprob``).
        pl_mask: (N, S) bool, the (block, step) slots that were taken.
        adv_tok: advantages for the token terms, (N,) per rollout or anything that broadcasts to (N, S, Lb)
            after appending singleton dims.
        adv_pl: advantages for the PL (and, in joint mode, the joint) terms, broadcasting to (N, S);
            None = ``adv_tok``.
        clip: eps, or (eps_low, eps_high) for asymmetric clipping.
        mode: 'separate' (authors' code):
                  sum = - sum_tok min(r_tok A, clip(r_tok) A) - sum_(n,s) min(r_PL A, clip(r_PL) A);
              'joint': one ratio per (block, step),
                  r_(n,s) = exp( sum_{i in tok_mask[n,s]} (tok_new - tok_old) + (pl_new - pl_old) ),
                  sum = - sum_(n,s) min(r A, clip(r) A) over slots with pl_mask or any token.
              At ratio 1 both modes have the same gradient, -A grad(sum of the step's log-probs); the loss
              values differ by the constant -sum_tok A / normaliser (separate has one term per token too).
        kl: None, or (tok_ref, pl_ref) log-probs of the same actions under a frozen reference (either may be
            None). Adds kl_coef * (sum_tok k3 + sum_(n,s) k3) / normaliser. With kl_coef == 0 the KL is only
            reported in the stats.
        kl_coef: the KL weight (default 0: off).
        normaliser: the loss is (summed terms) / normaliser. 'rollouts' (default) divides by N, so each
            rollout's gradient is the plain sum of its per-token and per-step terms and the gradient scale does
            not depend on the sequence length or step count (no per-sequence length average, cf. Dr. GRPO); a
            longer rollout carries more terms, as in the sum of Eq. 8. 'terms' divides by the number of active
            terms (token-mean style); a number divides by that constant (e.g. a fixed global batch size under
            data parallelism).

    Returns:
        (loss, stats): a 0-dim loss and floats: ``loss``, ``policy_loss``, ``normaliser``, ``n_tok``, ``n_pl``,
        ``tok_ratio_mean/min/max``, ``pl_ratio_mean/min/max``; separate mode ``tok_clip_frac``,
        ``pl_clip_frac``; joint mode ``joint_ratio_mean/min/max``, ``joint_clip_frac``; with ``kl``: ``kl_tok``
        and ``kl_pl`` (mean k3 per term) and ``kl_loss``.
    """
    if mode not in ("separate", "joint"):
        raise ValueError(f"mode must be 'separate' or 'joint', got {mode!r}")
    if tok_new.dim() < 2 or tok_new.shape[:-1] != pl_new.shape:
        raise ValueError(f"token tensors must be pl shape + (Lb,): got {tuple(tok_new.shape)} and "
                         f"{tuple(pl_new.shape)}")
    for name, t, like in (("tok_old", tok_old, tok_new), ("tok_mask", tok_mask, tok_new),
                          ("pl_old", pl_old, pl_new), ("pl_mask", pl_mask, pl_new)):
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and kl is None:
        raise ValueError("kl_coef > 0 needs kl=(tok_ref, pl_ref)")
    lo, hi = _clip_bounds(clip)
    tok_mask = tok_mask.to(torch.bool)  # (N, S, Lb)
    pl_mask = pl_mask.to(torch.bool)  # (N, S)
    a_tok = _right_expand(adv_tok.detach(), tok_new.shape, "adv_tok")  # (N, S, Lb)
    if adv_pl is None:
        if adv_tok.dim() > pl_new.dim():
            raise ValueError("adv_pl is needed when adv_tok has per-token shape")
        adv_pl = adv_tok
    a_pl = _right_expand(adv_pl.detach(), pl_new.shape, "adv_pl")  # (N, S)

    stats: Dict[str, float] = {}
    with torch.no_grad():  # per-factor ratio diagnostics (both modes)
        r_tok = torch.exp(torch.where(tok_mask, tok_new - tok_old, torch.zeros_like(tok_new)))  # (N, S, Lb)
        r_pl = torch.exp(torch.where(pl_mask, pl_new - pl_old, torch.zeros_like(pl_new)))  # (N, S)
        for prefix, r, a, m in (("tok_", r_tok, a_tok, tok_mask), ("pl_", r_pl, a_pl, pl_mask)):
            s = _ratio_stats(r, a, m, lo, hi, prefix)
            stats.update({key: v for key, v in s.items() if "ratio" in key})
            if mode == "separate":
                stats[f"{prefix}clip_frac"] = s[f"{prefix}clip_frac"]

    if mode == "separate":
        tok_sum, _ = clipped_surrogate(tok_new, tok_old, a_tok, (lo, hi), tok_mask)
        pl_sum, _ = clipped_surrogate(pl_new, pl_old, a_pl, (lo, hi), pl_mask)
        policy_sum = tok_sum + pl_sum
        n_terms = tok_mask.sum() + pl_mask.sum()
    else:
        tok_lr = torch.where(tok_mask, tok_new - tok_old.detach(), torch.zeros_like(tok_new)).sum(-1)  # (N, S)
        pl_lr = torch.where(pl_mask, pl_new - pl_old.detach(), torch.zeros_like(pl_new))  # (N, S)
        step_mask = pl_mask | tok_mask.any(-1)  # (N, S)
        joint_lr = tok_lr + pl_lr  # (N, S) log of r_tok_total * r_PL
        policy_sum, js = clipped_surrogate(joint_lr, torch.zeros_like(joint_lr), a_pl, (lo, hi), step_mask)
        stats.update({f"joint_{key}": v for key, v in js.items() if key != "count"})
        n_terms = step_mask.sum()

    if isinstance(normaliser, str):
        if normaliser not in ("rollouts", "terms"):
            raise ValueError(f"normaliser must be 'rollouts', 'terms' or a positive number, got {normaliser!r}")
        # an empty batch has a zero sum; dividing it by 1 keeps the loss 0 instead of NaN
        norm = float(max(pl_new.shape[0] if normaliser == "rollouts" else int(n_terms), 1))
    elif isinstance(normaliser, (int, float)) and not isinstance(normaliser, bool) and normaliser > 0:
        norm = float(normaliser)
    else:
        raise ValueError(f"normaliser must be 'rollouts', 'terms' or a positive number, got {normaliser!r}")

    loss = policy_sum / norm
    stats.update(policy_loss=float(loss.detach()), normaliser=norm, n_tok=float(tok_mask.sum()),
                 n_pl=float(pl_mask.sum()))
    if kl is not None:
        tok_ref, pl_ref = kl
        kl_sum = tok_new.new_zeros(())
        for name, new, ref, m in (("kl_tok", tok_new, tok_ref, tok_mask), ("kl_pl", pl_new, pl_ref, pl_mask)):
            if ref is None:
                continue
            if ref.shape != new.shape:
                raise ValueError(f"{name} reference has shape {tuple(ref.shape)}, expected {tuple(new.shape)}")
            term = _masked_k3_sum(new, ref, m)
            n = int(m.sum())
            stats[name] = float(term.detach()) / n if n else float("nan")
            kl_sum = kl_sum + term
        kl_loss = kl_coef * kl_sum / norm
        stats["kl_loss"] = float(kl_loss.detach())
        if kl_coef > 0:
            loss = loss + kl_loss
    stats["loss"] = float(loss.detach())
    return loss, stats
