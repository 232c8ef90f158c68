"""Remask-RL loss: new log-probs of the recorded steps, scored with the block-causal layout, then GRPO.

For step index i (0..S-1) one forward scores that step of *every* block of a rollout at once. In the
``block_causal`` layout (RemeDi's training layout, :mod:`remedi.model.block_causal`):

    input  [ prompt | final response | x_t of step i of block 0, ..., block nb-1 ]

noisy block j sees the prompt, the final blocks 0..j-1 (exactly the finished blocks the rollout's block j
saw) and its own recorded state, at block j's positions. From it (RemeDi Eq. 8):

    tok_new[j, p] = log softmax(logits_p / T_tok)[x_hat_p]           at newly unmasked p (new_mask)
    pl_new[j]     = sum_k [ z_{u_k} - logsumexp_{l not in u_<k} z_l ],  z = h / T_pos

and :func:`remedi.rl.policy.grpo_loss` gives the clipped surrogate of this step index. With a head UPS on a
frozen backbone the [prompt | final] half is the same in every pass and carries no gradient: it runs once
into a :class:`PrefixCache` and each pass computes only the noisy half (same numbers, ~(P+G)/(P+2G) less
compute). The (block, step)
terms of Eq. 8 are a sum over step indices, so one backward per step index (S passes per rollout batch)
accumulates the gradient of the whole loss when each pass is divided by the same normaliser (the number
of rollouts of the optimiser step), without holding S graphs at once.

In the ``bidirectional`` layout (the project's sampler) block j's view is the whole sequence with blocks
> j masked, so step i of the nb blocks are nb rows of one forward (:func:`bidirectional_rows`): nb times
the compute of the block-causal pass, the same number of passes.

Before the first update the policy is the rollout's, so the ratios are exactly 1 up to float rounding
(float32: |log r| < 1e-5, tests/test_rl_loss.py); in bf16 the cached rollout and the one-pass layout round
differently and the ratios scatter around 1 (reported as ``*_ratio_min/max``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from remedi.decoding.step import ups_scorer
from remedi.model.block_causal import block_causal_forward, block_causal_mask, prefix_mask
from remedi.model.kv_cache import PrefixCache
from remedi.rl.policy import grpo_loss, plackett_luce_logprob, token_logprob
from remedi.rl.rollout import RolloutBatch, RolloutConfig, policy_logits


@torch.no_grad()
def clean_prefix_cache(model, batch: RolloutBatch) -> PrefixCache:
    """Run [prompt | final] once with the block-causal prefix mask; the cache for every step pass."""
    N, nb, S, Lb = batch.states.shape
    P, G = batch.prompt.shape[1], nb * Lb
    cache = PrefixCache()
    x = torch.cat([batch.prompt, batch.final], 1)  # (N, P + G)
    model(x, prefix_mask(P, G, Lb, batch.prompt_mask, batch_size=N, device=x.device), cache=cache,
          compute_logits=False)
    cache.frozen = True
    return cache


def bidirectional_rows(batch: RolloutBatch, step: int, mask_id: int):
    """The sequences the ``bidirectional`` rollout ran at step ``step`` of every block, one row per (rollout,
    block), aligned so that every row's block sits at the same slice (one forward, one ``out_slice``).

    Row (b, j) = [pad x (nb-1-j)Lb | prompt_b | final_b blocks < j | x_t of block j | masks of blocks > j |
    pad x j Lb]; the padding is hidden by the key-padding mask and RoPE sees only offsets, so block j's
    outputs are those of the rollout's step. Returns ids (N*nb, T'), key mask (N*nb, T'), the block slice;
    T' = P + 2G - Lb.
    """
    N, nb, S, Lb = batch.states.shape
    P, G = batch.prompt.shape[1], nb * Lb
    T = P + 2 * G - Lb
    dev = batch.states.device
    ids = torch.full((N, nb, T), mask_id, dtype=torch.long, device=dev)
    real = torch.zeros((N, nb, T), dtype=torch.bool, device=dev)
    pm = torch.ones_like(batch.prompt, dtype=torch.bool) if batch.prompt_mask is None else batch.prompt_mask
    for j in range(nb):
        off = (nb - 1 - j) * Lb
        seq = torch.cat([batch.prompt, batch.final[:, :j * Lb], batch.states[:, j, step],
                         torch.full((N, (nb - 1 - j) * Lb), mask_id, dtype=torch.long, device=dev)], 1)  # (N, P+G)
        ids[:, j, off:off + P + G] = seq
        real[:, j, off:off + P] = pm
        real[:, j, off + P:off + P + G] = True
    lo = P + (nb - 1) * Lb
    return ids.view(N * nb, T), real.view(N * nb, T), slice(lo, lo + Lb)


def _noisy_outputs(model, batch: RolloutBatch, noisy: torch.Tensor, cache: PrefixCache | None):
    N, nb, S, Lb = batch.states.shape
    if cache is None:
        return block_causal_forward(model, batch.prompt, batch.final, noisy, Lb, batch.prompt_mask)
    P, G = batch.prompt.shape[1], nb * Lb
    full = block_causal_mask(P, G, Lb, batch.prompt_mask, batch_size=N, device=noisy.device)  # (N, 1, T, T)
    pos = torch.arange(P, P + G, device=noisy.device)[None].expand(N, -1)  # noisy block j at block j's positions
    return model(noisy, full[:, :, P + G:], cache=cache, start=P + G, position_ids=pos)


def step_logprobs(model, batch: RolloutBatch, step: int, cfg: RolloutConfig, mask_id: int,
                  cache: Optional[PrefixCache] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """New log-probs of step index ``step`` of every block: tok (N, nb, Lb) (0 off new_mask), pl (N, nb).

    cache: a :func:`clean_prefix_cache` of this batch (head UPS on a frozen backbone only), else None.
    """
    N, nb, S, Lb = batch.states.shape
    if cfg.layout == "bidirectional":
        ids, real, sl = bidirectional_rows(batch, step, mask_id)  # (N * nb, T')
        out = model(ids, real, out_slice=sl)  # logits (N * nb, Lb, V), row b * nb + j
    else:
        noisy = batch.states[:, :, step].reshape(N, nb * Lb)  # (N, G): x_t of this step, block after block
        out = _noisy_outputs(model, batch, noisy, cache)
    if out.ups_logits is None:
        raise ValueError("the model has no UPS: Remask RL needs a UPS head or stream")
    policy = ups_scorer(model)
    scores = out.ups_logits if policy is None else residual_scores(policy, out, batch, step, cfg, mask_id)
    return _token_terms(out.logits, batch, step, cfg, mask_id), _pl_terms(scores, batch, step, cfg)


def residual_scores(policy, out, batch: RolloutBatch, step: int, cfg: RolloutConfig, mask_id: int) -> torch.Tensor:
    """(N, nb, Lb) float64: a residual UPS's scores anchor + g(features) of step index ``step`` of every block,
    from a loss forward's outputs (the rollout's inputs to the scorer: prepared logits, x_hat, x_t's mask, K_n,
    base UPS logits, hidden states); differentiable in g's weights."""
    N, nb, S, Lb = batch.states.shape
    logits = policy_logits(out.logits, mask_id).reshape(N * nb, Lb, -1)
    tokens = batch.tokens[:, :, step].reshape(N * nb, Lb)
    masked = batch.states[:, :, step].reshape(N * nb, Lb) == mask_id
    keep = torch.full((N * nb,), cfg.schedule[step], dtype=torch.long, device=tokens.device)
    feats, anchor = policy.step_inputs(logits, tokens, masked, keep, out.ups_logits.reshape(N * nb, Lb),
                                       out.hidden.reshape(N * nb, Lb, -1))
    return policy.score_from(feats, anchor, masked).view(N, nb, Lb)


def cached_step_logprobs(model, batch: RolloutBatch, step: int, cfg: RolloutConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`step_logprobs` without a forward, for a head UPS on a frozen backbone: the token terms are the
    rollout's (the backbone does not change), the PL terms are ``model.ups_head`` on the hidden states the
    rollout recorded (``RolloutConfig.record_hidden``). With a residual UPS (``model.ups_policy``) the PL
    terms are its score anchor + g(features) from the features the rollout recorded (the backbone and the
    base UPS are frozen, only g trains). Equal to the recomputed ones up to rounding (tested).
    """
    policy = ups_scorer(model)
    if policy is not None:  # a residual UPS: its recorded features and anchor, rescored with g's current weights
        if batch.features is None:
            raise ValueError("the rollouts carry no residual features: roll them out with the residual UPS attached")
        masked = batch.states[:, :, step] != batch.tokens[:, :, step]  # x_hat differs from x_t exactly where masked
        s = policy.score_from(batch.features[:, :, step], batch.anchor[:, :, step], masked)  # (N, nb, Lb)
        return batch.tok_logp[:, :, step], _pl_terms(s, batch, step, cfg)
    if batch.hidden is None:
        raise ValueError("the rollouts carry no features: roll out with record_hidden=True (RolloutConfig)")
    head = getattr(model, "ups_head", None)
    if head is None:
        raise ValueError("cached features need a UPS head (a stream UPS changes the backbone's keys/values)")
    h = head(batch.hidden[:, :, step])  # (N, nb, Lb)
    return batch.tok_logp[:, :, step], _pl_terms(h, batch, step, cfg)


def _token_terms(logits: torch.Tensor, batch: RolloutBatch, step: int, cfg: RolloutConfig, mask_id: int):
    """tok (N, nb, Lb): log softmax(logits / T_tok)[x_hat] at the step's newly unmasked positions, else 0
    (all 0 for greedy rollout tokens: no token action)."""
    N, nb, S, Lb = batch.states.shape
    fresh = batch.new_mask[:, :, step]  # (N, nb, Lb)
    if cfg.tokens == "greedy":
        return torch.zeros(fresh.shape, dtype=torch.float32, device=fresh.device)
    logits = logits.view(N, nb, Lb, -1)  # (N, nb, Lb, V)
    # only the newly unmasked positions enter the loss: log-softmax over those rows alone
    sel = policy_logits(logits[fresh], mask_id)  # (M, V)
    lp = token_logprob(sel, batch.tokens[:, :, step][fresh], cfg.temperature)  # (M,)
    return torch.zeros(fresh.shape, dtype=lp.dtype, device=lp.device).masked_scatter(fresh, lp)  # (N, nb, Lb)


def _pl_terms(ups_logits: torch.Tensor, batch: RolloutBatch, step: int, cfg: RolloutConfig) -> torch.Tensor:
    """pl (N, nb): log pi_pos(order | x_t) of the step (0 for the zero-temperature top_k rule)."""
    N, nb, S, Lb = batch.states.shape
    h = ups_logits.float().reshape(N * nb, Lb)  # (N * nb, Lb)
    if cfg.positions == "top_k":
        return h.new_zeros(N, nb) + 0 * h.sum()  # no position action (kept in the graph for DDP)
    K = cfg.schedule[step]
    order = batch.orders[:, :, step, :K].reshape(N * nb, K)  # (N * nb, K)
    return plackett_luce_logprob(h, order, temperature=cfg.ups_temperature, validate=False).view(N, nb)


def step_loss(model, batch: RolloutBatch, step: int, advantages: torch.Tensor, cfg: RolloutConfig, mask_id: int,
              *, clip: float = 0.2, mode: str = "separate", normaliser: float,
              reference: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, kl_coef: float = 0.0,
              cache: Optional[PrefixCache] = None, features: bool = False) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The GRPO loss of step index ``step`` (every block), divided by ``normaliser``; and its statistics.

    features: score from the rollout's recorded hidden states (:func:`cached_step_logprobs`, head UPS on a
    frozen backbone) instead of a forward. Greedy rollout tokens contribute no token terms, the top_k
    position rule no PL terms.

    advantages: (N,) group-normalised, one per rollout. reference: (tok_ref, pl_ref) log-probs of the same
    actions under the reference policy (for kl_coef > 0), shaped like :func:`step_logprobs`' output.
    Adds ``tok_abs_log_ratio_sum`` / ``pl_abs_log_ratio_sum`` (sums of |log r| over the terms) to the stats.
    """
    if cfg.tokens == "greedy" and cfg.positions == "top_k":
        raise ValueError("a rollout with greedy tokens and top_k positions has no random action to learn from: "
                         "sample the tokens or the positions (plackett_luce)")
    tok_new, pl_new = cached_step_logprobs(model, batch, step, cfg) if features else \
        step_logprobs(model, batch, step, cfg, mask_id, cache)
    fresh = batch.new_mask[:, :, step] & (cfg.tokens == "sample")
    tok_old = batch.tok_logp[:, :, step]
    pl_old = batch.pl_logp[:, :, step]
    pl_mask = torch.full_like(pl_old, cfg.positions == "plackett_luce", dtype=torch.bool)
    loss, stats = grpo_loss(tok_new, tok_old, fresh, pl_new, pl_old, pl_mask, advantages.to(tok_new.device),
                            clip=clip, mode=mode, kl=reference, kl_coef=kl_coef, normaliser=normaliser)
    with torch.no_grad():
        stats["tok_abs_log_ratio_sum"] = float((tok_new - tok_old).abs()[fresh].sum())
        stats["pl_abs_log_ratio_sum"] = float((pl_new - pl_old).abs().sum())
    return loss, stats


class StepStats:
    """Combines the per-pass statistics of :func:`step_loss` into one record per optimiser step.

    Ratio means and clip fractions are weighted by their term counts; min/max are taken over passes. The
    record always has the same keys for a given (mode, kl) (NaN where nothing was counted), so processes
    can gather them.
    """

    def __init__(self, mode: str = "separate", kl: bool = False) -> None:
        self.parts = ("tok", "pl", "joint") if mode == "joint" else ("tok", "pl")
        self.clip_parts = ("joint",) if mode == "joint" else ("tok", "pl")
        self.kl_keys = ("kl_tok", "kl_pl") if kl else ()
        self.n = {p: 0.0 for p in self.parts}
        self.sums: Dict[str, float] = {}
        self.mins: Dict[str, float] = {}
        self.maxs: Dict[str, float] = {}
        self.loss = 0.0
        self.abs_lr = {"tok": 0.0, "pl": 0.0}
        self.kl = {k: 0.0 for k in self.kl_keys}

    def add(self, stats: Dict[str, float]) -> None:
        # joint mode has one term per (block, step) slot; every slot is taken, so their number is n_pl
        counts = {"tok": stats["n_tok"], "pl": stats["n_pl"], "joint": stats["n_pl"]}
        self.loss += stats["loss"]
        for part in ("tok", "pl"):
            self.abs_lr[part] += stats[f"{part}_abs_log_ratio_sum"]
        for part in self.parts:
            c = counts[part]
            if not c:
                continue
            self.n[part] += c
            for key in (f"{part}_ratio_mean", f"{part}_clip_frac"):
                if key in stats and stats[key] == stats[key]:
                    self.sums[key] = self.sums.get(key, 0.0) + stats[key] * c
            for key, agg, fn in ((f"{part}_ratio_min", self.mins, min), (f"{part}_ratio_max", self.maxs, max)):
                if key in stats and stats[key] == stats[key]:
                    agg[key] = fn(agg.get(key, stats[key]), stats[key])
        for key in self.kl_keys:
            part = key.split("_")[1]
            if stats.get(key) == stats.get(key) and key in stats and counts[part]:
                self.kl[key] += stats[key] * counts[part]

    def record(self) -> Dict[str, float]:
        nan = float("nan")
        out: Dict[str, float] = {"loss": self.loss}
        for part in self.parts:
            n = self.n[part]
            out[f"{part}_ratio_mean"] = self.sums.get(f"{part}_ratio_mean", nan) / n if n else nan
            out[f"{part}_ratio_min"] = self.mins.get(f"{part}_ratio_min", nan)
            out[f"{part}_ratio_max"] = self.maxs.get(f"{part}_ratio_max", nan)
        for part in self.clip_parts:
            n = self.n[part]
            out[f"{part}_clip_frac"] = self.sums[f"{part}_clip_frac"] / n if n and f"{part}_clip_frac" in self.sums \
                else nan
        for part in ("tok", "pl"):
            out[f"{part}_abs_log_ratio"] = self.abs_lr[part] / self.n[part] if self.n[part] else nan
        for key in self.kl_keys:
            n = self.n[key.split("_")[1]]
            out[key] = self.kl[key] / n if n else nan
        return out
