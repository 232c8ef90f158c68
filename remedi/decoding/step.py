"""The pieces of one decoding step, shared by every decoder (eager, static-buffer, CUDA graph) and by rollouts.

The block loop and the eager decoder are in :mod:`remedi.decoding.sampler` (whose docstring describes the
algorithm and its conventions); the static-buffer decoder is in :mod:`remedi.decoding.graphs`. Both import
this module and neither imports the other's internals, so there is no import cycle. ``sampler`` re-exports
every public name here, so ``from remedi.decoding.sampler import SamplerConfig, decide, ...`` keeps working.

What a step computes for the block ``cur``: a forward (:func:`block_forward`, or the static forward),
the prepared logits, candidate tokens, then :func:`decide` -- the scores of every position
(:func:`position_scores`, which lives in :mod:`remedi.model.scores` so the residual UPS reads it too) and the
selection rule that turns scores into the next block state. The selection rule is the eval one (deterministic
top-K_n, :func:`select_top_k` / :func:`rank_select`) unless a :class:`PolicyRule` is given (Remask RL
rollouts: Plackett-Luce over the UPS logits; see :func:`policy_decide`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from remedi.model.block_causal import prefix_mask
from remedi.model.kv_cache import EagerUpdateCache, GrowingKVCache, KVCache
from remedi.model.loading import SpecialIds
from remedi.model.scores import RANDOM_STRATEGIES, position_scores  # noqa: F401  (re-exported)

STRATEGIES = ("llada_low_confidence", "llada_random", "ups", "tps_prob", "margin", "entropy", "random")
LLADA_STRATEGIES = ("llada_low_confidence", "llada_random")
REMASK_STRATEGIES = ("ups", "tps_prob", "margin", "entropy", "random")
CACHE_MODES = ("none", "prefix", "dual")
LAYOUTS = ("bidirectional", "block_causal")


class BlockCounts:
    """``num_blocks`` and ``steps_per_block`` of a config with gen_length, block_length and steps."""

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def check_lengths(self) -> None:
        """ValueError unless steps, gen_length and block_length are positive integers and blocks tile gen_length."""
        for name in ("steps", "gen_length", "block_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--{name} must be a positive integer, got {v!r}")
        if self.gen_length % self.block_length:
            raise ValueError(f"--block_length {self.block_length} must divide --gen_length {self.gen_length} "
                             f"(e.g. --block_length {_largest_divisor_at_most(self.gen_length, self.block_length)})")


@dataclass
class SamplerConfig(BlockCounts):
    strategy: str = "llada_low_confidence"
    steps: int = 64
    gen_length: int = 64
    block_length: int = 32
    temperature: float = 0.0
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eos_gating: bool = False
    record_trajectory: bool = False
    cache: str = "none"  # none | prefix | dual (see "Fast decoding" in the module docstring)
    cache_refresh: int = 0  # 0: full forward only at a block's first step; n: also every n-th step
    threshold: Optional[float] = None  # parallel threshold decoding; None = the step schedule
    remask_threshold: Optional[float] = None  # threshold mode, remask strategies: remask below this
    compile: bool = False  # torch.compile the transformer blocks (in place, once per model)
    graphs: bool = False  # static-buffer step, no host sync inside a block, CUDA graphs (remedi.decoding.graphs)
    graph_capture: bool = True  # with graphs on a CUDA device: capture/replay CUDA graphs (False: run it eagerly)
    # what block j sees: the whole sequence (LLaDA's sampler) or only [prompt | blocks 0..j] (RemeDi's RL view;
    # cache "prefix" is then exact: the prompt once, then block-only steps and one commit forward per block)
    layout: str = "bidirectional"

    @property
    def nfe_per_forward(self) -> int:
        """NFE a row costs per model call: 2 with CFG (conditional and unconditional rows), else 1."""
        return 2 if self.cfg_scale > 0 else 1

    @property
    def remasks(self) -> bool:
        """True for the RemeDi strategies (which may remask), False for LLaDA's unmask-only ones."""
        return self.strategy in REMASK_STRATEGIES

    def validate(self, model_max_len: Optional[int] = None, prompt_len: Optional[int] = None,
                 has_ups: Optional[bool] = None) -> None:
        """Raise ValueError naming the flag for any setting the sampler cannot run.

        ``steps / num_blocks`` may exceed ``block_length``: LLaDA allows it, and the surplus steps of a
        block commit nothing (they still cost a forward pass; the remask strategies may still swap).
        With ``threshold`` the number of steps is dynamic and ``steps`` is not used.
        """
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy/source {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        self.check_lengths()
        if self.steps % self.num_blocks and self.threshold is None:
            raise ValueError(f"--steps {self.steps} must be divisible by the number of blocks "
                             f"{self.num_blocks} (= --gen_length / --block_length); e.g. --steps "
                             f"{max(self.num_blocks, self.steps - self.steps % self.num_blocks)}")
        if not (self.temperature >= 0.0 and self.temperature != float("inf")):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not (self.cfg_scale >= 0.0 and self.cfg_scale != float("inf")):
            raise ValueError(f"--cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"--cache {self.cache!r}: choose one of {', '.join(CACHE_MODES)}")
        r = self.cache_refresh
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"--cache_refresh must be an integer >= 0 (0 = full forward only at each block's "
                             f"first step, n = also every n-th step), got {r!r}")
        if r and self.cache == "none":
            raise ValueError(f"--cache_refresh {r} needs --cache prefix or --cache dual (without a cache every "
                             f"step is a full forward already)")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"--threshold must be in (0, 1] (or unset for the step schedule), got {self.threshold}")
        if self.remask_threshold is not None:
            if self.threshold is None:
                raise ValueError("--remask_threshold works only in parallel threshold decoding: also pass "
                                 "--threshold (e.g. --threshold 0.9 --remask_threshold 0.1)")
            if not 0.0 < self.remask_threshold <= self.threshold:
                raise ValueError(f"--remask_threshold must be in (0, --threshold] = (0, {self.threshold}], got "
                                 f"{self.remask_threshold}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.layout == "block_causal":
            bad = [name for name, on in (("--cache dual", self.cache == "dual"), ("--cache_refresh", self.cache_refresh),
                                         ("--cfg_scale", self.cfg_scale > 0), ("--threshold", self.threshold is not None),
                                         ("--eos_gating", self.eos_gating), ("--compile", self.compile)) if on]
            if bad:
                raise ValueError(f"the block_causal layout runs the step schedule with cache none or prefix only; "
                                 f"drop {', '.join(bad)}")
        if has_ups is False and self.strategy == "ups":
            raise ValueError("source 'ups' needs a UPS: pass --ups_head CHECKPOINT (or a model with a UPS "
                             "stream), or choose another source (tps_prob, margin, entropy, random, llada_*)")
        if model_max_len is not None and prompt_len is not None and prompt_len + self.gen_length > model_max_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + --gen_length {self.gen_length} = "
                             f"{prompt_len + self.gen_length} exceeds the model's max_sequence_length "
                             f"{model_max_len}; shorten the prompt or lower --gen_length")


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


# ------------------------------------------------------------------------------------------ schedules
def transfer_counts(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-step commit counts: (B,) masked counts -> (B, steps), m // s plus 1 for the first m % s."""
    base = masked // steps
    rem = masked % steps
    return base[:, None] + (torch.arange(steps, device=masked.device)[None, :] < rem[:, None]).long()


def unmask_schedule(block_length: int, steps: int) -> list[int]:
    """K_n for n = 1..steps: positions of a block unmasked after step n (cumulative LLaDA counts)."""
    counts = transfer_counts(torch.tensor([block_length]), steps)[0]
    return torch.cumsum(counts, 0).tolist()


# ------------------------------------------------------------------------------------- step pieces
def layout_batch(prompts: Sequence[Sequence[int]], gen_length: int, ids: SpecialIds, device):
    """Left-pad prompts with ids.pad and append gen_length masks: x (B, P+G), attention mask or None, P."""
    P = max(len(p) for p in prompts)
    x = torch.full((len(prompts), P + gen_length), ids.mask, dtype=torch.long)
    attn = torch.ones_like(x)
    for b, p in enumerate(prompts):
        x[b, :P - len(p)] = ids.pad
        attn[b, :P - len(p)] = 0
        x[b, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
    attn = None if bool(attn.all()) else attn.to(device)
    return x.to(device), attn, P


def new_cache(cfg: SamplerConfig) -> Optional[KVCache]:
    """A fresh KV cache for one block (None for ``cache="none"``).

    With ``compile`` the cache's update runs outside the compiled graphs (see :class:`~remedi.model.kv_cache.EagerUpdateCache`).
    """
    if cfg.cache == "none":
        return None
    if cfg.layout == "block_causal":
        return GrowingKVCache()  # [prompt | finished blocks | block], kept across blocks
    return EagerUpdateCache() if cfg.compile else KVCache()


def block_forward(model, x: torch.Tensor, attn: Optional[torch.Tensor], lo: int, hi: int, prompt_end: int,
                  cfg: SamplerConfig, mask_id: int, cache: Optional[KVCache] = None, full: bool = True,
                  with_hidden: bool = False):
    """Logits (B, hi-lo, V) float32 (CFG applied) and UPS logits (B, hi-lo) or None for block [lo, hi);
    with ``with_hidden`` also the block's final hidden states (B, hi-lo, d) (after ln_f; conditional rows).

    The ``block_causal`` layout is :func:`block_causal_forward`. Otherwise (bidirectional):

    The LM head runs only on the block (``out_slice``). Without a cache, or with ``full``, the whole
    sequence is computed (a full forward also refills ``cache``). Otherwise only ``x[:, lo:]`` (prefix
    cache) or ``x[:, lo:hi]`` (dual cache) is computed; the other positions' keys/values come from the
    cache as they were last computed. With CFG the 2B rows (conditional, then unconditional) share one
    forward and one cache; the unconditional copy differs only in the prompt, which a partial forward
    never covers.
    """
    if cfg.layout == "block_causal":
        out = block_causal_forward(model, x, attn, lo, hi, prompt_end, cfg.block_length, cache)
        return (out.logits.float(), out.ups_logits) + ((out.hidden,) if with_hidden else ())
    if cache is None or full:
        start, inp, out_slice = 0, x, slice(lo, hi)
    elif cfg.cache == "prefix":
        start, inp, out_slice = lo, x[:, lo:], slice(0, hi - lo)
    else:  # dual
        start, inp, out_slice = lo, x[:, lo:hi], None
    kw = {"out_slice": out_slice} if cache is None else {"out_slice": out_slice, "cache": cache, "start": start}
    if cfg.cfg_scale > 0:
        un = inp.clone()
        if start < prompt_end:
            un[:, :prompt_end - start] = mask_id  # unconditional copy: the prompt fully masked
        both = torch.cat([inp, un], 0)
        am = None if attn is None else torch.cat([attn, attn], 0)
        out = model(both, am, **kw)
        cond, unc = out.logits.float().chunk(2, 0)
        logits = unc + (cfg.cfg_scale + 1) * (cond - unc)
        ups = None if out.ups_logits is None else out.ups_logits.chunk(2, 0)[0]
        hidden = out.hidden.chunk(2, 0)[0]
    else:
        out = model(inp, attn, **kw)
        logits, ups, hidden = out.logits.float(), out.ups_logits, out.hidden
    return (logits, ups, hidden) if with_hidden else (logits, ups)


def block_causal_forward(model, x: torch.Tensor, attn: Optional[torch.Tensor], lo: int, hi: int, prompt_end: int,
                         block_length: int, cache: Optional[KVCache]):
    """Block [lo, hi) seeing only [prompt | blocks before it | itself] (:mod:`remedi.model.block_causal`).

    With a :class:`~remedi.model.kv_cache.GrowingKVCache` holding [prompt | finished blocks] (see
    :func:`prefill_prompt` and :func:`commit_block`) only the block is computed; without a cache
    [prompt | blocks 0..j] is recomputed under the block-causal prefix mask. The same numbers up to rounding.
    """
    if cache is not None:
        return model(x[:, lo:hi], None if attn is None else attn[:, :hi], cache=cache, start=lo)
    pm = None if attn is None else attn[:, :prompt_end].bool()
    mask = prefix_mask(prompt_end, hi - prompt_end, block_length, pm, batch_size=x.shape[0], device=x.device)
    return model(x[:, :hi], mask, out_slice=slice(lo, hi))


def prefill_prompt(model, x: torch.Tensor, attn: Optional[torch.Tensor], prompt_end: int, cache: KVCache) -> None:
    """The block-causal cache's first forward: the prompt alone (it sees only itself)."""
    model(x[:, :prompt_end], None if attn is None else attn[:, :prompt_end], cache=cache, compute_logits=False)


def commit_block(model, x: torch.Tensor, attn: Optional[torch.Tensor], lo: int, hi: int, cache: KVCache) -> None:
    """Write a finished block's keys/values in its final state (what the loss layout's clean half computes)."""
    model(x[:, lo:hi], None if attn is None else attn[:, :hi], cache=cache, start=lo, compute_logits=False)


def prepare_logits(logits: torch.Tensor, cfg: SamplerConfig, ids: SpecialIds) -> torch.Tensor:
    logits = logits.clone()
    logits[..., ids.mask] = -torch.inf  # the mask is not a token of the text
    if cfg.logits_eos_inf:
        logits[..., ids.eos] = -torch.inf
    return logits


def draw_candidates(logits: torch.Tensor, temperature: float,
                    generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """x0 (B, Lb): argmax, or the reference's float64 Gumbel-max with per-row uniforms.

    A row whose generator is None draws nothing (threshold decoding: its block is finished; it gets the
    argmax, which the caller discards), so a row's random stream never depends on its batch.
    """
    if temperature == 0:
        return logits.argmax(-1)
    rows = [b for b, g in enumerate(generators) if g is not None]
    Lb, V = logits.shape[1:]
    u = torch.stack([torch.rand((Lb, V), generator=generators[b], dtype=torch.float64,
                                device=generators[b].device).to(logits.device) for b in rows])  # (R, Lb, V)
    sub = logits if len(rows) == len(generators) else logits[torch.tensor(rows, device=logits.device)]
    if len(rows) == len(generators):
        return gumbel_argmax(sub, u, temperature)
    x0 = logits.argmax(-1)
    x0[torch.tensor(rows, device=logits.device)] = gumbel_argmax(sub, u, temperature)
    return x0


def gumbel_argmax(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference's Gumbel-max with given uniforms ``u`` (same shape, float64):
    ``argmax(exp(logits) / (-log u) ** temperature)`` in float64."""
    return (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)


def draw_uniform(B: int, Lb: int, generators: Sequence[Optional[torch.Generator]], device) -> torch.Tensor:
    """(B, Lb) float64 uniforms, one row per generator; zeros for a None generator (draws nothing)."""
    return torch.stack([torch.zeros(Lb, dtype=torch.float64, device=device) if g is None else
                        torch.rand((Lb,), generator=g, dtype=torch.float64, device=g.device).to(device)
                        for g in generators])  # (B, Lb)


def eos_eot_candidates(x0: torch.Tensor, ids: SpecialIds) -> torch.Tensor:
    hit = x0 == ids.eos
    if ids.eot is not None:
        hit |= x0 == ids.eot
    return hit


def select_top_k(scores: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool (B, Lb): the k[b] highest-scoring eligible positions of each row (ties: earlier position).

    Vectorised: one stable sort by score, then a stable sort that moves eligible positions first, so
    that an eligible -inf still ranks above every ineligible position; rank < k selects.
    """
    B, Lb = scores.shape
    s = torch.where(eligible, scores, torch.full_like(scores, -torch.inf))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (B, Lb)
    elig_first = torch.sort(eligible.gather(1, order).to(torch.int8), dim=1, descending=True, stable=True).indices
    order = order.gather(1, elig_first)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(Lb, device=scores.device).expand(B, Lb).contiguous())
    return (ranks < k[:, None]) & eligible


def rank_select(scores: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool (B, Lb): the k[b] highest-scoring eligible positions, exactly :func:`select_top_k`'s choice.

    Without sorting: position i's rank is the number of positions ordered before it -- eligible ones
    first, then higher score, then (ties) the earlier position -- from one (B, Lb, Lb) comparison.
    """
    L = scores.shape[1]
    s = torch.where(eligible, scores, torch.full_like(scores, -torch.inf))
    si, sj = s[:, :, None], s[:, None, :]  # (B, L, 1), (B, 1, L): i's row compares against every j
    ei, ej = eligible[:, :, None], eligible[:, None, :]
    idx = torch.arange(L, device=scores.device)
    earlier = idx[None, :] < idx[:, None]  # (L, L): j < i
    before = (ej & ~ei) | ((ej == ei) & ((sj > si) | ((sj == si) & earlier)))  # (B, L, L): j ranks before i
    return (before.sum(-1) < k[:, None]) & eligible


def threshold_confidence(strategy: str, score: torch.Tensor) -> torch.Tensor:
    """The score on the (0, 1] scale a threshold compares against: exp(-entropy) for ``entropy``
    (1 for a one-hot distribution, 1/V for a uniform one), the score itself for every other source."""
    return score.exp() if strategy == "entropy" else score


def threshold_step(cfg: SamplerConfig, score: torch.Tensor, masked: torch.Tensor, select=None):
    """Parallel threshold decoding: (unmask, remask), bool (B, Lb).

    unmask: every masked position whose confidence reaches ``threshold``, and at least the best-scoring
    masked one. remask (remask strategies with ``remask_threshold``): positions unmasked before this
    step whose confidence is below ``remask_threshold``, lowest first, at most (newly unmasked - 1) of
    them, so that every step leaves at least one mask fewer and a block takes at most block_length steps.
    ``select``: the top-k selection (default :func:`select_top_k`; the static path passes its sort-free
    equivalent, :func:`rank_select`).
    """
    select = select or select_top_k
    conf = threshold_confidence(cfg.strategy, score)
    one = torch.ones(score.shape[0], dtype=torch.long, device=score.device)
    unmask = select(score, masked, one) | (masked & (conf >= cfg.threshold))
    if cfg.remask_threshold is None or not cfg.remasks:
        return unmask, torch.zeros_like(masked)
    low = ~masked & (conf < cfg.remask_threshold)
    cap = (unmask.sum(1) - 1).clamp(min=0)
    return unmask, select(-score, low, cap)


def ups_scorer(model):
    """The scorer a model carries for the ``ups`` source (``model.ups_policy``: a residual UPS or the slip
    oracle of :mod:`remedi.policy.slip`), or None. Looks through DDP/FSDP-style ``module`` wrappers."""
    return getattr(getattr(model, "module", model), "ups_policy", None)


def decide(cfg: SamplerConfig, ids: SpecialIds, logits: torch.Tensor, ups: Optional[torch.Tensor],
           cur: torch.Tensor, x0: torch.Tensor, rand: Optional[torch.Tensor], k: Optional[torch.Tensor],
           run: Optional[torch.Tensor], select=None, hidden: Optional[torch.Tensor] = None, scorer=None):
    """One step's decision for the block ``cur`` (B, Lb): (new block, masked, remasked, score).

    hidden: the block's final hidden states (B, Lb, d), given by every decoder, for ``scorer``.
    scorer (:func:`ups_scorer`; ``ups`` source only): replaces :func:`position_scores` by
    ``scorer.score(logits, tokens, masked, k, ups, hidden)`` (B, Lb) float64 -- a residual UPS's
    anchor + g(features) -- and must be pure tensor code as well (step schedule only: k is K_n).
    A scorer with a learned count (``scorer.hide_below_threshold(score, k)`` not None: a residual UPS's
    hide threshold) hides the kept positions that mask marks, after the top-K_n choice: fewer than K_n stay
    visible, and a hidden position that was visible counts as remasked. The mask marks nothing where K_n is
    the block length, so the block's last step still shows every position.

    logits (B, Lb, V) prepared; x0 (B, Lb) the candidates; k (B,) the positions to keep (remask
    strategies: K_n) or to commit (LLaDA's: the step's counts), unused by threshold decoding; run (B, 1)
    bool or None: rows where it is False are left as they are (finished rows). Pure tensor code: no
    host synchronisation, so the static path captures it in its CUDA graphs.
    """
    select = select or select_top_k
    masked = cur == ids.mask
    tok = torch.where(masked, x0, cur) if cfg.remasks else x0
    hide = None  # kept positions a learned count hides anyway (from the scorer's own score, before the EOS rule)
    if scorer is not None and cfg.strategy == "ups":
        score = scorer.score(logits, tok, masked, k, ups, hidden)
        if cfg.threshold is None and hasattr(scorer, "hide_below_threshold"):
            hide = scorer.hide_below_threshold(score, k)
    else:
        score = position_scores(cfg.strategy, logits, tok, ups, rand)
    if cfg.confidence_eos_eot_inf:
        stop = eos_eot_candidates(x0, ids)
        score = score.masked_fill(masked & stop if cfg.remasks else stop, -torch.inf)
    if cfg.threshold is not None:
        unmask, remasked = threshold_step(cfg, score, masked, select)
        new = torch.where(unmask, x0, torch.where(remasked, torch.full_like(cur, ids.mask), cur))
    elif cfg.remasks:
        keep = select(score, torch.ones_like(masked), k)
        if hide is not None:
            keep = keep & ~hide
        new = torch.where(keep, tok, torch.full_like(cur, ids.mask))
        remasked = ~masked & ~keep
    else:
        keep = select(score, masked, k)
        new = torch.where(keep, x0, cur)
        remasked = torch.zeros_like(masked)
    if run is not None:
        new, remasked = torch.where(run, new, cur), remasked & run
    return new, masked, remasked, score


@dataclass
class StepOut:
    """One step's tensors, rows indexed as the decoder indexes them (``decoder.row(j, b)``)."""

    masked: torch.Tensor  # (R, Lb) bool: masked before the step
    new: torch.Tensor  # (R, Lb) the block after the step
    remasked: torch.Tensor  # (R, Lb) bool
    score: torch.Tensor  # (R, Lb) float64
    record: Optional[dict] = None  # a PolicyRule step: what the RL loss needs (see policy_decide)




# ------------------------------------------------------------------------- the rollout selection rule
TOKEN_RULES = ("sample", "greedy")
HIDE_RL_REFUSAL = ("Remask RL cannot roll out a residual UPS with a hide threshold (its learned count of extra "
                   "hidden positions is no Plackett-Luce action): start RL from a residual UPS without one")
POSITION_RULES = ("plackett_luce", "top_k")


@dataclass(frozen=True)
class PolicyRule:
    """The Remask RL selection rule (RemeDi Eq. 8), used by the decoders instead of the eval rule.

    tokens: ``sample`` -- x_hat ~ softmax(logits / token_temperature) at masked positions (Gumbel-max);
    ``greedy`` -- the argmax, so only the positions are stochastic (tokens are then no action of the policy).
    positions: ``plackett_luce`` -- the K_n kept positions are an ordered PL draw without replacement over
    z = h / position_temperature (h the UPS logits; Gumbel-top-k); ``top_k`` -- the zero-temperature rule,
    the K_n largest h (ties: the earlier position), i.e. the eval sampler's ``ups`` choice.
    record_hidden: also record the block's hidden states per step (features for a frozen-backbone loss).

    Random numbers, per step and row, from the row's generator: token uniforms (Lb, V) float32 when
    sampling tokens, then PL uniforms (Lb,) float32 with ``plackett_luce`` (Gumbel noise -log(-log u)).
    """

    tokens: str = "sample"
    token_temperature: float = 1.0
    positions: str = "plackett_luce"
    position_temperature: float = 1.0
    record_hidden: bool = False

    def draws(self, Lb: int, V: int) -> list:
        """(name, shape, dtype) of the uniforms a step draws per row, in drawing order."""
        out = []
        if self.tokens == "sample":
            out.append(("tok", (Lb, V), torch.float32))
        if self.positions == "plackett_luce":
            out.append(("pos", (Lb,), torch.float32))
        return out


def gumbel_noise(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) from uniforms in [0, 1) (0 clamped to the smallest normal)."""
    return -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))


def pl_logprob_sorted(z: torch.Tensor, order: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B,) log-prob of the first k[b] entries of ``order`` (B, L), a full permutation of the positions,
    as ordered draws without replacement from PL(softmax(z)) over all L positions.

    The positions left before draw i are exactly order[i:], so each normaliser is a suffix log-sum-exp:
    one reversed ``logcumsumexp`` instead of k sequential ones (no host sync; used inside CUDA graphs).
    Equals :func:`remedi.rl.policy.plackett_luce_logprob` up to float rounding (tested).
    """
    zs = z.gather(1, order)  # (B, L)
    lse = torch.logcumsumexp(zs.flip(1), 1).flip(1)  # (B, L): logsumexp of order[i:]
    take = torch.arange(z.shape[1], device=z.device)[None, :] < k[:, None]
    return torch.where(take, zs - lse, torch.zeros_like(zs)).sum(1)


def pl_entropy(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) entropy of softmax(scores / T) over the last dim (the first PL draw's distribution)."""
    logq = torch.log_softmax(scores.float() / temperature, dim=-1)
    return -(logq.exp() * logq).sum(-1)


def policy_decide(rule: PolicyRule, ids: SpecialIds, logits: torch.Tensor, ups: torch.Tensor, cur: torch.Tensor,
                  noise: dict, k: torch.Tensor, hidden: Optional[torch.Tensor] = None, scorer=None) -> StepOut:
    """One rollout step for the block ``cur`` (B, Lb) under ``rule``: the next block and the step's record.

    logits (B, Lb, V) prepared (mask token at -inf); ups (B, Lb) the UPS logits h, the scores the positions
    are ranked by (a scoring hook adds its learned term to h here; ``hidden`` (B, Lb, d) is the block's
    final hidden state); noise: the uniforms of :meth:`PolicyRule.draws` by name, (B, ...) each; k (B,)
    the positions kept after the step (K_n). Pure tensor code (no host sync): the static decoder captures
    it in its CUDA graphs.

    record: ``state`` x_t, ``tokens`` x_hat (sampled at masked positions, copied elsewhere), ``order``
    (B, Lb) the kept positions in draw order then -1, ``new_mask`` newly unmasked (kept and masked before),
    ``tok_logp`` log softmax(logits / T_tok)[x_hat] on new_mask (0 elsewhere; 0 for greedy tokens),
    ``pl_logp`` log pi_pos(order | x_t) (0 for top_k), ``pl_entropy`` (0 for top_k), ``ups`` h, and
    ``hidden`` with ``record_hidden``.

    scorer (:func:`ups_scorer`, a residual UPS): the positions are ranked by its score s = anchor + g(features)
    of the step's tokens instead of h (z = s / T_pos for PL, s itself for top_k: then the choice of the eval
    sampler with the same scorer), in float64; ``ups`` records s, and ``features`` / ``anchor`` record what
    s was computed from (:meth:`~remedi.model.residual.ResidualUPS.step_inputs`), so the loss can rescore
    the recorded steps with g's current weights without a forward (the backbone and base UPS are frozen).
    A residual UPS with a hide threshold (a learned count of extra hidden positions) is refused: the count is
    a hard threshold outside the Plackett-Luce draw, with no probability for the loss to train.
    """
    if getattr(scorer, "hide_tau", None) is not None:
        raise ValueError(HIDE_RL_REFUSAL)
    B, Lb = cur.shape
    masked = cur == ids.mask
    if rule.tokens == "sample":
        z_tok = logits.float() / rule.token_temperature
        x0 = (z_tok + gumbel_noise(noise["tok"])).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    tok = torch.where(masked, x0, cur)
    extra = {}
    if scorer is not None:
        feats, anchor = scorer.step_inputs(logits, tok, masked, k, ups, hidden)
        h = scorer.score_from(feats, anchor, masked)  # (B, Lb) float64
        extra = {"features": feats, "anchor": anchor}
    else:
        h = ups.float()
    if rule.positions == "plackett_luce":
        z = h / rule.position_temperature
        keys = z + gumbel_noise(noise["pos"])
    else:
        z, keys = h, h
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices  # (B, Lb), ties: earlier position
    take = torch.arange(Lb, device=cur.device)[None, :] < k[:, None]  # (B, Lb): the first K_n of the order
    keep = torch.zeros_like(masked).scatter(1, order, take)
    new = torch.where(keep, tok, torch.full_like(cur, ids.mask))
    remasked = ~masked & ~keep
    fresh = keep & masked
    zero = torch.zeros(B, dtype=torch.float32, device=cur.device)
    if rule.tokens == "sample":
        lp = torch.log_softmax(z_tok, -1).gather(-1, tok[..., None]).squeeze(-1)
        tok_logp = torch.where(fresh, lp, torch.zeros_like(lp))
    else:
        tok_logp = torch.zeros(B, Lb, dtype=torch.float32, device=cur.device)
    stochastic = rule.positions == "plackett_luce"
    record = {"state": cur, "tokens": tok, "order": torch.where(take, order, torch.full_like(order, -1)),
              "new_mask": fresh, "tok_logp": tok_logp, "ups": h,
              "pl_logp": pl_logprob_sorted(z, order, k) if stochastic else zero,
              "pl_entropy": pl_entropy(h, rule.position_temperature) if stochastic else zero}
    if rule.record_hidden and hidden is not None:
        record["hidden"] = hidden
    record.update(extra)
    return StepOut(masked, new, remasked, h.double(), record)
