"""Remask-RL rollouts: the sampler's block loop with the rollout selection rule and a recorder.

A rollout is :func:`remedi.decoding.sampler.decode_blocks` -- the engine the eval sampler runs, on the
eager, static-buffer or CUDA-graph decoder (``RolloutConfig.graphs`` / ``graph_capture``) -- with a
:class:`~remedi.decoding.step.PolicyRule` in place of the eval rule, and a recorder that stores what the
loss needs. A generation of G = n_blocks x Lb tokens is decoded block by block; per block,
S = steps / n_blocks steps with the sampler's cumulative schedule K_1 < ... < K_S = Lb
(:func:`remedi.decoding.sampler.unmask_schedule`; K_n = 2n for Lb 32, S 16). At step n, from one forward
over the block in state x_t (RemeDi Eq. 8; :func:`remedi.decoding.step.policy_decide`):

    logits, h = model(x_t)                                  logits (N, Lb, V), UPS scores h (N, Lb)
    x_hat_i ~ softmax(logits_i / T_tok)  at masked i;        x_hat_i = x_t,i at visible i
    u_1..u_K ~ PL(softmax(h / T_pos))    over all Lb positions, K = K_n, without replacement
    x_{t+1}  = x_hat at {u_1..u_K};     [MASK] at every other block position  (a remask if it held a token)

Options (issue 20): ``tokens="greedy"`` takes x_hat = argmax (only the positions are stochastic; the token
terms then carry no log-probs and the loss has none); ``positions="top_k"`` is the zero-temperature
position rule (the K_n largest h: the eval sampler's ``ups`` choice). With both, a rollout in the
bidirectional layout equals the eval sampler (``strategy="ups"``, greedy) token for token (tested).

The mask token is never a token of the text (its logit is -inf: :func:`policy_logits`, shared with the
loss). Recorded per (block, step): the exact input state x_t, x_hat, the order u (-1 padded to Lb), the
newly unmasked set (drawn and masked before), the old token log-probs log softmax(logits / T_tok)[x_hat]
at those positions, the old PL log-prob log pi_pos(u | x_t), the UPS logits h and, with
``record_hidden``, the block's hidden states (features: a head UPS on a frozen backbone is rescored from
them without a second forward, :func:`remedi.rl.loss.cached_step_logprobs`). States must be stored because
remasking breaks the "replay by decode order" trick of unmask-only diffusion RL.

With a residual UPS attached (``model.ups_policy``, :mod:`remedi.model.residual`) the positions are ranked by
its score s = anchor + g(features) in place of h (PL over s / T_pos, or top_k over s: then the eval sampler
with the same residual), ``ups`` records s and ``features`` / ``anchor`` what s was computed from, so the
loss rescores the steps with g's current weights (g is what trains: ``RemeDiLM.ups_modules()``).

Two layouts (``RolloutConfig.layout``, the engine's ``SamplerConfig.layout``), i.e. what the model sees
while it decodes block j:

* ``block_causal`` (the authors'; default): the prompt and the finished blocks 0..j-1 only, each computed
  seeing only what came before it. Two attention modes, the same numbers up to float rounding (tested):
  ``cache="prefix"`` runs the prompt once into the cache, each step computes only the block against it,
  and a finished block is run once more in its final state to write its keys/values (what the loss
  layout's clean half computes); ``cache="none"`` recomputes [prompt | blocks 0..j] every step with the
  block-causal prefix mask.
* ``bidirectional`` (the project's sampler, ``cache="none"``): the whole sequence [prompt | blocks < j |
  block j | masks of the later blocks] with full attention, as :func:`remedi.decoding.sampler.generate`
  decodes. Use it for a model and UPS trained on whole sequences (the embedded model, the Remask-SFT
  trainer's default): in the block-causal view such a model is off its training distribution. Its loss
  forward costs n_blocks times more (:mod:`remedi.rl.loss`).

Random numbers: rollout b draws only from ``generators[b]`` (on the model's device), per step first the
token uniforms (Lb, V) (sampled tokens only), then the PL uniforms (Lb,) (``plackett_luce`` only), turned
into Gumbel noise, so a rollout is the same alone or in any batch (exactly in float32) and on every decoder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch

from remedi.decoding.sampler import (BlockCounts, PolicyRule, SamplerConfig, decode_blocks,  # noqa: F401
                                     unmask_schedule)
from remedi.decoding.step import HIDE_RL_REFUSAL, POSITION_RULES, TOKEN_RULES, pl_entropy, ups_scorer  # noqa: F401  (pl_entropy: re-exported)
from remedi.model.loading import SpecialIds

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
    tokens: str = "sample"  # sample at T_tok | greedy (only the positions are stochastic)
    positions: str = "plackett_luce"  # PL at T_pos | top_k (the zero-temperature rule, the eval choice)
    graphs: bool = False  # the static-buffer decoder (CUDA graphs on a GPU), as SamplerConfig.graphs
    graph_capture: bool = True  # with graphs on CUDA: capture/replay (False: the same static step, uncaptured)
    record_hidden: bool = False  # also record the block's hidden states per step (cached-feature loss)

    @property
    def schedule(self) -> list[int]:
        """K_n, n = 1..S: positions of a block unmasked after step n (cumulative LLaDA counts)."""
        return unmask_schedule(self.block_length, self.steps_per_block)

    def validate(self) -> "RolloutConfig":
        self.check_lengths()
        if self.steps % self.num_blocks:
            raise ValueError(f"--steps {self.steps} must be a multiple of the number of blocks {self.num_blocks}")
        if self.steps_per_block > self.block_length:
            raise ValueError(f"--steps {self.steps} gives {self.steps_per_block} steps per block of "
                             f"{self.block_length}: at most one step per position (K_n must grow every step)")
        if self.tokens not in TOKEN_RULES:
            raise ValueError(f"--rollout_tokens {self.tokens!r}: choose {' or '.join(TOKEN_RULES)}")
        if self.positions not in POSITION_RULES:
            raise ValueError(f"--rollout_positions {self.positions!r}: choose {' or '.join(POSITION_RULES)}")
        for name, on in (("temperature", self.tokens == "sample"), ("ups_temperature", self.positions != "top_k")):
            v = getattr(self, name)
            if on and not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"--{name} must be > 0 for a stochastic policy (RL needs its log-probs), got {v}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"--cache {self.cache!r}: choose {' or '.join(CACHE_MODES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout {self.layout!r}: choose {' or '.join(LAYOUTS)}")
        if self.layout == "bidirectional" and self.cache != "none":
            raise ValueError("--layout bidirectional has no exact KV cache (the prompt and earlier blocks attend to "
                             "the block being decoded): use --cache none")
        return self

    @property
    def rule(self) -> PolicyRule:
        return PolicyRule(self.tokens, float(self.temperature), self.positions, float(self.ups_temperature),
                          self.record_hidden)

    def sampler_config(self) -> SamplerConfig:
        """The engine's configuration: the ``ups`` strategy, the step schedule, this layout and decoder."""
        return SamplerConfig(strategy="ups", steps=self.steps, gen_length=self.gen_length,
                             block_length=self.block_length, cache=self.cache, layout=self.layout,
                             graphs=self.graphs, graph_capture=self.graph_capture)


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
    ups: Optional[torch.Tensor] = None  # (N, nb, S, Lb) float32: the UPS logits h the positions were ranked by
    hidden: Optional[torch.Tensor] = None  # (N, nb, S, Lb, d): the block's hidden states (record_hidden only)
    # with a residual UPS policy (model.ups_policy): what its scores (``ups``) were computed from, float64
    features: Optional[torch.Tensor] = None  # (N, nb, S, Lb, F)
    anchor: Optional[torch.Tensor] = None  # (N, nb, S, Lb)

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


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def rollout(model, prompts: Sequence[Sequence[int]], cfg: RolloutConfig, ids: SpecialIds,
            generators: Sequence[torch.Generator]) -> RolloutBatch:
    """Decode one rollout per prompt (repeat a prompt for a group) with the joint policy; see the module doc.

    model: a RemeDiLM with a UPS, or any module with its forward (DDP / FSDP wrappers, peft; the eager
    decoder only: ``graphs`` needs the RemeDiLM itself). generators: one per rollout, on the model's device.
    """
    cfg.validate()
    scfg = cfg.sampler_config()
    scfg.validate()
    if len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} rollouts")
    device = _model_device(model)
    bad = [g.device for g in generators if g.device.type != device.type]
    if bad:
        raise ValueError(f"generators must live on the model's device ({device}), got {bad[0]}")
    if getattr(model, "ups_arch", True) is None:
        raise ValueError("the model has no UPS: Remask RL needs a UPS head or stream (pass --ups_head)")
    scorer = ups_scorer(model)
    if scorer is not None and not hasattr(scorer, "step_inputs"):
        raise ValueError(f"{type(scorer).__name__} is not a residual UPS: Remask RL cannot roll it out")
    if getattr(scorer, "hide_tau", None) is not None:
        raise ValueError(HIDE_RL_REFUSAL)
    if getattr(scorer, "unmask_only", False) and cfg.positions == "plackett_luce":
        raise ValueError("an unmask_only residual UPS gives visible positions score +inf, which has no "
                         "Plackett-Luce probability: roll it out with positions top_k, or use the full policy")
    t0 = time.perf_counter()
    N, Lb, S, nb = len(prompts), cfg.block_length, cfg.steps_per_block, cfg.num_blocks
    rec = Recorder(N, nb, S, Lb, device)
    run = decode_blocks(model, prompts, scfg, ids, list(generators), rule=cfg.rule, on_step=rec)
    x, P = run.decoder.x, run.P
    if bool((x[:, P:] == ids.mask).any()):
        raise RuntimeError("a rollout ended with masked positions (the schedule must end at K_S = block_length)")
    return RolloutBatch(prompt=x[:, :P].clone(), prompt_mask=_prompt_mask(prompts, P, device), states=rec.states,
                        tokens=rec.tokens, orders=rec.orders, new_mask=rec.new_mask, tok_logp=rec.tok_logp,
                        pl_logp=rec.pl_logp, pl_entropy=rec.pl_entropy, remasks=rec.remasks, final=x[:, P:].clone(),
                        forwards=run.decoder.forwards, seconds=time.perf_counter() - t0, ups=rec.ups,
                        **rec.optional)


def _prompt_mask(prompts, P: int, device) -> Optional[torch.Tensor]:
    """(N, P) bool, True at real (not left-padding) prompt tokens; None when no prompt is padded."""
    if all(len(p) == P for p in prompts):
        return None
    lens = torch.tensor([len(p) for p in prompts], device=device)
    return torch.arange(P, device=device)[None, :] >= (P - lens)[:, None]


class Recorder:
    """The rollout's recorder: ``on_step`` of :func:`decode_blocks`, writing each step's record (rows in
    batch order: rollouts never drop rows) into the (N, nb, S, ...) tensors of a :class:`RolloutBatch`."""

    def __init__(self, N: int, nb: int, S: int, Lb: int, device) -> None:
        shape = (N, nb, S, Lb)
        self.states = torch.empty(shape, dtype=torch.long, device=device)
        self.tokens = torch.empty(shape, dtype=torch.long, device=device)
        self.orders = torch.full(shape, -1, dtype=torch.long, device=device)
        self.new_mask = torch.zeros(shape, dtype=torch.bool, device=device)
        self.tok_logp = torch.zeros(shape, dtype=torch.float32, device=device)
        self.ups = torch.zeros(shape, dtype=torch.float32, device=device)
        self.pl_logp = torch.zeros((N, nb, S), dtype=torch.float32, device=device)
        self.pl_entropy = torch.zeros((N, nb, S), dtype=torch.float32, device=device)
        self.remasks = torch.zeros((N, nb), dtype=torch.long, device=device)
        self.optional: dict = {}  # hidden (record_hidden), features / anchor (a residual UPS): (N, nb, S, ...)

    def __call__(self, blk: int, n: int, out) -> None:
        r = out.record
        for name, buf in (("state", self.states), ("tokens", self.tokens), ("order", self.orders),
                          ("new_mask", self.new_mask), ("tok_logp", self.tok_logp), ("ups", self.ups),
                          ("pl_logp", self.pl_logp), ("pl_entropy", self.pl_entropy)):
            buf[:, blk, n] = r[name]
        self.remasks[:, blk] += out.remasked.sum(1)
        for name in ("hidden", "features", "anchor"):
            if name in r:
                if name not in self.optional:
                    self.optional[name] = torch.zeros(self.states.shape[:3] + r[name].shape[1:], dtype=r[name].dtype,
                                                      device=self.states.device)
                self.optional[name][:, blk, n] = r[name]
