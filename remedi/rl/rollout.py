"""Remask-RL rollouts: block-wise decoding with the joint token / position policy, every step recorded.

A generation of G = n_blocks x Lb tokens is decoded block by block; block j sees the prompt and the
finished blocks 0..j-1 only (the block-causal view of :mod:`remedi.model.block_causal`, which the loss
forward reproduces for all blocks at once). Per block, S = steps / n_blocks steps with the sampler's
cumulative schedule K_1 < ... < K_S = Lb (:func:`remedi.decoding.sampler.unmask_schedule`; K_n = 2n for
Lb 32, S 16). At step n, from one forward over the block in state x_t (RemeDi Eq. 8):

    logits, h = model(x_t)                                  logits (N, Lb, V), UPS scores h (N, Lb)
    x_hat_i ~ softmax(logits_i / T_tok)  at masked i;        x_hat_i = x_t,i at visible i
    u_1..u_K ~ PL(softmax(h / T_pos))    over all Lb positions, K = K_n, without replacement
    x_{t+1}  = x_hat at {u_1..u_K};     [MASK] at every other block position  (a remask if it held a token)

The mask token is never a token of the text (its logit is -inf: :func:`policy_logits`, shared with the
loss). Recorded per (block, step): the exact input state x_t, x_hat, the order u (-1 padded to Lb), the
newly unmasked set (drawn and masked before), the old token log-probs log softmax(logits / T_tok)[x_hat]
at those positions and the old PL log-prob log pi_pos(u | x_t). States must be stored because remasking
breaks the "replay by decode order" trick of unmask-only diffusion RL.

Two layouts (``RolloutConfig.layout``), i.e. what the model sees while it decodes block j:

* ``block_causal`` (the authors'; default): the prompt and the finished blocks 0..j-1 only, each computed
  seeing only what came before it. Two attention modes, the same numbers up to float rounding (tested):
  ``cache="prefix"`` runs the prompt once into a :class:`GrowingKVCache`, each step computes only the
  block against the cache, and a finished block is run once more in its final state to write its
  keys/values (what the loss layout's clean half computes); ``cache="none"`` recomputes
  [prompt | blocks 0..j] every step with the block-causal prefix mask.
* ``bidirectional`` (the project's sampler, ``cache="none"``): the whole sequence [prompt | blocks < j |
  block j | masks of the later blocks] with full attention, as :func:`remedi.decoding.sampler.generate`
  decodes (at T -> 0 the rollout reproduces its ``ups`` strategy token for token, tested). Use it for a
  model and UPS trained on whole sequences (the embedded model, the Remask-SFT trainer's default): in the
  block-causal view such a model is off its training distribution. Its loss forward costs n_blocks
  times more (:mod:`remedi.rl.loss`).

Random numbers: rollout b draws only from ``generators[b]`` (on the model's device), per step first the
token Gumbel noise (Lb, V), then the PL Gumbel noise (Lb,), so a rollout is the same alone or in any
batch (exactly in float32).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch

from remedi.decoding.sampler import BlockCounts, layout_batch, unmask_schedule
from remedi.model.block_causal import prefix_mask
from remedi.model.kv_cache import GrowingKVCache
from remedi.model.loading import SpecialIds
from remedi.rl.policy import (order_to_mask, plackett_luce_logprob, sample_plackett_luce, sample_tokens,
                              token_logprob)

CACHE_MODES = ("prefix", "none")
LAYOUTS = ("block_causal", "bidirectional")


@dataclass
class RolloutConfig(BlockCounts):
    gen_length: int = 256
    block_length: int = 32
    steps: int = 128  # over the whole generation; steps / n_blocks per block
    temperature: float = 1.2  # T_tok
    ups_temperature: float = 1.2  # T_pos
    cache: str = "prefix"
    layout: str = "block_causal"

    @property
    def schedule(self) -> list[int]:
        """K_n, n = 1..S: positions of a block unmasked after step n (cumulative LLaDA counts)."""
        return unmask_schedule(self.block_length, self.steps_per_block)

    def validate(self) -> "RolloutConfig":
        for name in ("gen_length", "block_length", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--{name} must be a positive integer, got {v!r}")
        if self.gen_length % self.block_length:
            raise ValueError(f"--block_length {self.block_length} must divide --gen_length {self.gen_length}")
        if self.steps % self.num_blocks:
            raise ValueError(f"--steps {self.steps} must be a multiple of the number of blocks {self.num_blocks}")
        if self.steps_per_block > self.block_length:
            raise ValueError(f"--steps {self.steps} gives {self.steps_per_block} steps per block of "
                             f"{self.block_length}: at most one step per position (K_n must grow every step)")
        for name in ("temperature", "ups_temperature"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"--{name} must be > 0 for a stochastic policy (RL needs its log-probs), got {v}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"--cache {self.cache!r}: choose {' or '.join(CACHE_MODES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout {self.layout!r}: choose {' or '.join(LAYOUTS)}")
        if self.layout == "bidirectional" and self.cache != "none":
            raise ValueError("--layout bidirectional has no exact KV cache (the prompt and earlier blocks attend to "
                             "the block being decoded): use --cache none")
        return self


@dataclass
class RolloutBatch:
    """N rollouts of one policy; nb blocks, S steps per block, Lb positions per block, G = nb * Lb."""

    prompt: torch.Tensor  # (N, P) long, left-padded with the pad id
    prompt_mask: Optional[torch.Tensor]  # (N, P) bool, True at real prompt tokens; None = no padding
    states: torch.Tensor  # (N, nb, S, Lb) long: the block's input state x_t of every step
    tokens: torch.Tensor  # (N, nb, S, Lb) long: x_hat (sampled where x_t was masked, copied elsewhere)
    orders: torch.Tensor  # (N, nb, S, Lb) long: the PL draw u_1..u_{K_n}, then -1
    new_mask: torch.Tensor  # (N, nb, S, Lb) bool: newly unmasked (drawn and masked before the step)
    tok_logp: torch.Tensor  # (N, nb, S, Lb) float32: old log softmax(logits / T_tok)[x_hat] (0 off new_mask)
    pl_logp: torch.Tensor  # (N, nb, S) float32: old log pi_pos(u | x_t)
    pl_entropy: torch.Tensor  # (N, nb, S) float32: entropy (nats) of softmax(h / T_pos) over the block
    remasks: torch.Tensor  # (N, nb) long: positions holding a token before a step and masked after it
    final: torch.Tensor  # (N, G) long: the generated answer
    forwards: int = 0  # model forwards per rollout (steps + block commits + prefill)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return self.states.shape[0]

    def select(self, rows) -> "RolloutBatch":
        """The rollouts ``rows`` (a slice, list or index tensor) as a batch of their own."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        return RolloutBatch(**out)

    def to(self, device) -> "RolloutBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def commit_steps(self) -> torch.Tensor:
        """(N, G) long: the step (0-based within its block) at which each position was unmasked for good."""
        N, nb, S, Lb = self.new_mask.shape
        steps = torch.arange(S, device=self.new_mask.device)[None, None, :, None]  # (1, 1, S, 1)
        last = torch.where(self.new_mask, steps, torch.full_like(steps, -1)).amax(2)  # (N, nb, Lb)
        return last.reshape(N, nb * Lb)


def policy_logits(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """float32 logits with the mask token's logit at -inf (never sampled; same in rollout and loss)."""
    out = logits.float()
    mask_col = torch.zeros(out.shape[-1], dtype=torch.bool, device=out.device)
    mask_col[mask_id] = True
    return out.masked_fill(mask_col, float("-inf"))


def pl_entropy(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) entropy of softmax(scores / T) over the last dim (the first PL draw's distribution)."""
    logq = torch.log_softmax(scores.float() / temperature, dim=-1)
    return -(logq.exp() * logq).sum(-1)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _block_outputs(model, x, key_mask, prompt_mask, P, lo, hi, Lb, cache, layout):
    """Logits (N, Lb, V) and UPS scores (N, Lb) of block [lo, hi) in the layout's view."""
    if layout == "bidirectional":
        out = model(x, key_mask, out_slice=slice(lo, hi))  # the whole sequence, later blocks still masked
    elif cache is not None:
        am = None if key_mask is None else key_mask[:, :hi]
        out = model(x[:, lo:hi], am, cache=cache, start=lo)
    else:
        mask = prefix_mask(P, hi - P, Lb, prompt_mask, batch_size=x.shape[0], device=x.device)
        out = model(x[:, :hi], mask, out_slice=slice(lo, hi))
    if out.ups_logits is None:
        raise ValueError("the model has no UPS: Remask RL needs a UPS head or stream (pass --ups_head)")
    return out.logits, out.ups_logits.float()


@torch.no_grad()
def rollout(model, prompts: Sequence[Sequence[int]], cfg: RolloutConfig, ids: SpecialIds,
            generators: Sequence[torch.Generator]) -> RolloutBatch:
    """Decode one rollout per prompt (repeat a prompt for a group) with the joint policy; see the module doc.

    model: a RemeDiLM with a UPS, or any module with its forward (DDP / FSDP wrappers, peft).
    generators: one per rollout, on the model's device.
    """
    cfg.validate()
    if len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} rollouts")
    device = _model_device(model)
    bad = [g.device for g in generators if g.device.type != device.type]
    if bad:
        raise ValueError(f"generators must live on the model's device ({device}), got {bad[0]}")
    t0 = time.perf_counter()
    N, Lb, S, nb, G = len(prompts), cfg.block_length, cfg.steps_per_block, cfg.num_blocks, cfg.gen_length
    x, key_mask, P = layout_batch(prompts, G, ids, device)  # x (N, P + G); key_mask (N, P + G) or None
    prompt_mask = None if key_mask is None else key_mask[:, :P].bool()
    schedule = cfg.schedule
    shape = (N, nb, S, Lb)
    states = torch.empty(shape, dtype=torch.long, device=device)
    tokens = torch.empty(shape, dtype=torch.long, device=device)
    orders = torch.full(shape, -1, dtype=torch.long, device=device)
    new_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    tok_logp = torch.zeros(shape, dtype=torch.float32, device=device)
    pl_logp = torch.zeros((N, nb, S), dtype=torch.float32, device=device)
    ent = torch.zeros((N, nb, S), dtype=torch.float32, device=device)
    remasks = torch.zeros((N, nb), dtype=torch.long, device=device)
    cache = GrowingKVCache() if cfg.cache == "prefix" else None
    forwards = 0
    if cache is not None:  # the prompt alone, once
        model(x[:, :P], None if key_mask is None else key_mask[:, :P], cache=cache, compute_logits=False)
        forwards += 1
    for j in range(nb):
        lo, hi = P + j * Lb, P + (j + 1) * Lb
        for n in range(S):
            cur = x[:, lo:hi]  # (N, Lb)
            logits, h = _block_outputs(model, x, key_mask, prompt_mask, P, lo, hi, Lb, cache, cfg.layout)
            forwards += 1
            logits = policy_logits(logits, ids.mask)  # (N, Lb, V)
            masked = cur == ids.mask  # (N, Lb)
            x_hat = torch.where(masked, sample_tokens(logits, cfg.temperature, generators), cur)  # (N, Lb)
            order = sample_plackett_luce(h, schedule[n], generators, temperature=cfg.ups_temperature)  # (N, K)
            keep = order_to_mask(order, Lb)  # (N, Lb)
            fresh = keep & masked
            states[:, j, n] = cur
            tokens[:, j, n] = x_hat
            orders[:, j, n, :order.shape[1]] = order
            new_mask[:, j, n] = fresh
            lp = token_logprob(logits, x_hat, cfg.temperature)  # (N, Lb)
            tok_logp[:, j, n] = torch.where(fresh, lp, torch.zeros_like(lp))
            pl_logp[:, j, n] = plackett_luce_logprob(h, order, temperature=cfg.ups_temperature, validate=False)
            ent[:, j, n] = pl_entropy(h, cfg.ups_temperature)
            remasks[:, j] += (~masked & ~keep).sum(1)
            x[:, lo:hi] = torch.where(keep, x_hat, torch.full_like(cur, ids.mask))
        if cache is not None and j + 1 < nb:  # the finished block's keys/values, as the loss layout sees them
            model(x[:, lo:hi], None if key_mask is None else key_mask[:, :hi], cache=cache, start=lo,
                  compute_logits=False)
            forwards += 1
    if bool((x[:, P:] == ids.mask).any()):
        raise RuntimeError("a rollout ended with masked positions (the schedule must end at K_S = block_length)")
    return RolloutBatch(prompt=x[:, :P].clone(), prompt_mask=prompt_mask, states=states, tokens=tokens,
                        orders=orders, new_mask=new_mask, tok_logp=tok_logp, pl_logp=pl_logp, pl_entropy=ent,
                        remasks=remasks, final=x[:, P:].clone(), forwards=forwards,
                        seconds=time.perf_counter() - t0)
