"""Block-wise masked-diffusion sampling: LLaDA's reference decoder and the RemeDi dynamic-remask step.

Two families of strategies, selected by name (``SamplerConfig.strategy``):

* ``llada_low_confidence`` / ``llada_random`` -- LLaDA's ``generate.py`` as an algorithm (LLaDA, arXiv:2502.09992, "The
  reference sampler"): for each block, m = masked positions at the block start; step n commits
  ``m // s`` tokens plus one for the first ``m % s`` steps; the committed positions are the most confident
  masked positions of the block (confidence = softmax probability of the candidate, or uniform noise);
  a committed token is never masked again.
* ``ups`` / ``tps_prob`` / ``margin`` / ``entropy`` / ``random`` -- the RemeDi step (RemeDi, arXiv:2509.23653, "Sampler
  with dynamic remasking"): after step n of a block exactly K_n = c_1 + ... + c_n positions of the block
  are unmasked (c_n the LLaDA counts for a fully masked block). Every position of the block is scored --
  a masked one by its candidate, an unmasked one by its current token -- the top K_n stay or become
  unmasked and every other position of the block becomes the mask again (a *remask* if it held a token).

Scores (all computed in float64 from the float32 logits):
  tps_prob   p(candidate) at masked positions, p(current token) at unmasked ones
  margin     top-1 minus top-2 probability of the position's distribution
  entropy    minus the entropy of the position's distribution
  ups        sigmoid(UPS logit) (from the conditional pass when cfg_scale > 0)
  random     uniform(0, 1) from the row's generator

Conventions shared with :mod:`remedi.decoding.reference` and tests/llada_generate_ref.py (all three agree
token for token):

* The mask token is never a prediction (its logit is set to -inf). A trained model never predicts it; an
  untrained one would otherwise "commit" a mask and end with masks in its output.
* Ties in a ranking go to the earlier position. A position whose confidence is -inf (EOS/EOT candidates
  under ``confidence_eos_eot_inf``) is still committed if the schedule needs more positions than have
  finite scores, but never one outside the current block (the reference's ``topk`` over -inf ties could
  pick a masked position of a later block there).
* Random numbers: row b draws only from ``generators[b]``, on that generator's device, for the current
  block only, in this order per step: Gumbel uniforms of shape (block_length, V) in float64 when
  temperature > 0, then uniform confidences of shape (block_length,) in float64 for the random
  strategies. Hence a row gives the same output alone or in any batch, and temperature 0 with a
  deterministic strategy draws nothing (independent of the seed).
* "The same alone or in any batch" is exact in float32 (tested on CPU; 8/8 rows identical on an H100 with
  LLaDA-8B in float32). In bfloat16 it holds only up to rounding: padding and batch size change the
  kernels' summation order, logits move by a few bf16 ulps, and near-ties can flip a token, after which
  the row diverges (a random-weight 8B in bf16 agreed on ~90% of argmaxes and on 0/8 whole rows). For
  bit-reproducible evaluations in bf16 keep the batch size fixed (or 1).
* Gumbel sampling is the reference's: ``argmax(exp(logits) / (-log u) ** temperature)`` in float64.
* CFG: the unconditional copy has every prompt position replaced by the mask;
  ``logits = un + (cfg_scale + 1) * (cond - un)``; the batch of 2B rows is one forward pass, counted as
  2 NFE (so ``nfe = 2 * steps`` with CFG).
* ``confidence_eos_eot_inf`` gives EOS and EOT *candidates* confidence -inf at every temperature (the
  reference applies it to EOS only at temperature 0, a quirk not copied).

Fast decoding (every part has a flag that turns it off, and the defaults are the exact sampler):

* ``cache="prefix"`` / ``"dual"`` (Fast-dLLM's two block caches; one :class:`~remedi.model.llada.KVCache`
  holds the backbone's and the UPS stream's keys/values, and the 2B rows of CFG). A block's first step
  is a full forward into a fresh cache (so it equals the uncached step, and eos_gating's shrinking batch
  needs no cache surgery). Later steps compute only ``x[:, lo:]`` (prefix: block + masked suffix) or
  ``x[:, lo:hi]`` (dual: the block alone), attending to the other positions' keys/values as of the last
  full forward: approximate, since with bidirectional attention those keys depend on the block's
  changing tokens. ``cache_refresh = n`` adds a full forward every n-th step; n = 1 equals
  ``cache="none"`` token for token (tested). Remasking inside the block works unchanged.
* ``threshold`` (parallel decoding, Fast-dLLM / the RemeDi UPS rule): each step commits every masked
  position of the block whose confidence is >= threshold, and at least the best one; with
  ``remask_threshold`` (remask strategies only) positions unmasked in earlier steps whose confidence is
  below it are remasked, lowest first, at most (commits of the step - 1). Every step therefore leaves
  at least one mask fewer: a block ends within block_length steps and a generation within gen_length.
  ``steps`` is not used; NFE counts the forwards a row took part in. The confidence compared is the
  strategy's score, except ``entropy`` (exp(-entropy), in (0, 1]); for the random strategies it is a
  fresh uniform draw, so the threshold is the probability that a masked position stays masked. In a
  batch, a row whose block is finished draws no random numbers and is left unchanged until the other
  rows finish theirs (one host sync per step decides), so rows stay batch-independent.
* ``compile``: ``model.compile_blocks`` once per model, with the cache's update kept out of the
  graphs (:class:`_EagerUpdateCache`).
* ``graphs`` (:mod:`remedi.decoding.graphs`): the same algorithm on static buffers -- one fixed-size KV
  cache over the whole sequence, the block's position, schedule, EOS gate and finished rows as device
  tensors, a sort-free ranking -- so that no step of a block synchronises with the host, and on a CUDA
  device each step is one CUDA-graph replay (``graph_capture``). Equal to the eager decoder token for
  token in float32 for every flag combination (tested); host reads remain where the algorithm needs a
  value: once per threshold step, once per block with eos_gating, every step with trajectories.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from remedi.model.loading import SpecialIds
from remedi.model.llada import KVCache

STRATEGIES = ("llada_low_confidence", "llada_random", "ups", "tps_prob", "margin", "entropy", "random")
LLADA_STRATEGIES = ("llada_low_confidence", "llada_random")
REMASK_STRATEGIES = ("ups", "tps_prob", "margin", "entropy", "random")
RANDOM_STRATEGIES = ("llada_random", "random")
CACHE_MODES = ("none", "prefix", "dual")


class BlockCounts:
    """``num_blocks`` and ``steps_per_block`` of a config with gen_length, block_length and steps."""

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


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
        for name in ("steps", "gen_length", "block_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--{name} must be a positive integer, got {v!r}")
        if self.gen_length % self.block_length:
            raise ValueError(f"--block_length {self.block_length} must divide --gen_length {self.gen_length} "
                             f"(e.g. --block_length {_largest_divisor_at_most(self.gen_length, self.block_length)})")
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
        if has_ups is False and self.strategy == "ups":
            raise ValueError("source 'ups' needs a UPS: pass --ups_head CHECKPOINT (or a model with a UPS "
                             "stream), or choose another source (tps_prob, margin, entropy, random, llada_*)")
        if model_max_len is not None and prompt_len is not None and prompt_len + self.gen_length > model_max_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + --gen_length {self.gen_length} = "
                             f"{prompt_len + self.gen_length} exceeds the model's max_sequence_length "
                             f"{model_max_len}; shorten the prompt or lower --gen_length")


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


@dataclass
class Generation:
    """One row's result. ``tokens`` drops everything from the first EOS on.

    nfe: model forward passes this row took part in (one per step, two per step with CFG).
    remasks: positions holding a token before a step and masked after it; remasks_per_block lists the
    blocks actually computed (fewer than gen_length / block_length when eos_gating stopped early).
    seconds: wall time of the whole ``generate`` call divided by the number of rows (each row's share of
    the batch; ``seconds * len(rows)`` is the batch's wall time).
    trajectory (record_trajectory only): one dict per step with "step" (0-based, over all blocks),
    "block", "span" ([lo, hi) of the block), "unmasked" / "remasked" (positions relative to the
    generation start), "conf" ({position: score} for every position the step ranked: the whole block
    for the remask strategies, its masked positions for LLaDA's) and "tokens" (the generated region
    after the step, None where masked).
    """

    tokens: list[int]
    nfe: int
    remasks: int
    remasks_per_block: list[int]
    seconds: float
    trajectory: Optional[list[dict]] = None


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

    With ``compile`` the cache's update runs outside the compiled graphs (see :class:`_EagerUpdateCache`).
    """
    if cfg.cache == "none":
        return None
    return _EagerUpdateCache() if cfg.compile else KVCache()


class _EagerUpdateCache(KVCache):
    """KVCache whose update is never traced by torch.compile.

    Traced, the update's dictionary lookups and ``layer`` / ``start`` integers become guards, so every
    layer and every block start compiles anew until dynamo's recompile limit sends the rest to eager
    (measured on CPU with the tiny config). Left out of the graph, together with
    ``allow_unspec_int_on_nn_module`` (see :func:`_compile_context`), the blocks compile a handful of times.
    """

    @torch.compiler.disable
    def update(self, layer, start, k, v):
        return super().update(layer, start, k, v)


def block_forward(model, x: torch.Tensor, attn: Optional[torch.Tensor], lo: int, hi: int, prompt_end: int,
                  cfg: SamplerConfig, mask_id: int, cache: Optional[KVCache] = None, full: bool = True):
    """Logits (B, hi-lo, V) float32 (CFG applied) and UPS logits (B, hi-lo) or None for block [lo, hi).

    The LM head runs only on the block (``out_slice``). Without a cache, or with ``full``, the whole
    sequence is computed (a full forward also refills ``cache``). Otherwise only ``x[:, lo:]`` (prefix
    cache) or ``x[:, lo:hi]`` (dual cache) is computed; the other positions' keys/values come from the
    cache as they were last computed. With CFG the 2B rows (conditional, then unconditional) share one
    forward and one cache; the unconditional copy differs only in the prompt, which a partial forward
    never covers.
    """
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
    else:
        out = model(inp, attn, **kw)
        logits, ups = out.logits.float(), out.ups_logits
    policy = getattr(model, "ups_policy", None)
    if policy is not None and ups is not None and cfg.strategy == "ups":  # residual UPS: a scorer, see decide
        ups = policy.bind(ups, cfg)
    return logits, ups


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
    equivalent, :func:`remedi.decoding.graphs.rank_select`).
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


def decide(cfg: SamplerConfig, ids: SpecialIds, logits: torch.Tensor, ups: Optional[torch.Tensor],
           cur: torch.Tensor, x0: torch.Tensor, rand: Optional[torch.Tensor], k: Optional[torch.Tensor],
           run: Optional[torch.Tensor], select=None):
    """One step's decision for the block ``cur`` (B, Lb): (new block, masked, remasked, score).

    logits (B, Lb, V) prepared; x0 (B, Lb) the candidates; k (B,) the positions to keep (remask
    strategies: K_n) or to commit (LLaDA's: the step's counts), unused by threshold decoding; run (B, 1)
    bool or None: rows where it is False are left as they are (finished rows). Pure tensor code: no
    host synchronisation, so the static path captures it in its CUDA graphs.
    """
    select = select or select_top_k
    masked = cur == ids.mask
    tok = torch.where(masked, x0, cur) if cfg.remasks else x0
    if callable(ups) and cfg.strategy == "ups":  # a residual UPS bound to this step (remedi.policy.residual)
        score = ups(logits, tok, masked, k)
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
        new = torch.where(keep, tok, torch.full_like(cur, ids.mask))
        remasked = ~masked & ~keep
    else:
        keep = select(score, masked, k)
        new = torch.where(keep, x0, cur)
        remasked = torch.zeros_like(masked)
    if run is not None:
        new, remasked = torch.where(run, new, cur), remasked & run
    return new, masked, remasked, score


_COMPILED: "weakref.WeakSet" = weakref.WeakSet()


def compile_model(model, **compile_kwargs) -> None:
    """``model.compile_blocks`` once per model (automatic dynamic shapes: the cached modes run several
    sequence lengths, and eos_gating several batch sizes). ``compile_kwargs`` go to torch.compile."""
    if model in _COMPILED:
        return
    if not hasattr(model, "compile_blocks"):
        raise ValueError(f"--compile: {type(model).__name__} has no compile_blocks(); run without --compile")
    model.compile_blocks(**{"dynamic": None, **compile_kwargs})
    _COMPILED.add(model)


def _compile_context():
    """Layer ids and block starts are module/argument integers: let dynamo treat them as symbols."""
    return torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)


# ------------------------------------------------------------------------------------------- driver
@torch.inference_mode()
def generate(model, prompts: list[list[int]], cfg: SamplerConfig, ids: SpecialIds,
             generators: Optional[list[torch.Generator]] = None) -> list[Generation]:
    """Decode ``gen_length`` tokens after each prompt; rows are independent (see the module docstring).

    generators: one per row; default ``torch.Generator().manual_seed(0)`` for every row (so a row's
    default stream does not depend on its place in the batch).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    cfg.validate(model.config.max_sequence_length, max(len(p) for p in prompts), model.ups_arch is not None)
    if generators is None:
        generators = [torch.Generator().manual_seed(0) for _ in prompts]
    if len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
    if cfg.graphs:
        from remedi.decoding.graphs import check_static_model

        check_static_model(model)
        if getattr(model, "ups_policy", None) is not None and cfg.strategy == "ups":
            raise ValueError("--graphs does not run a residual UPS policy yet: decode it without --graphs")
    if not cfg.compile:
        return _generate(model, prompts, cfg, ids, generators)
    compile_model(model)
    with _compile_context():
        return _generate(model, prompts, cfg, ids, generators)


@dataclass
class StepOut:
    """One step's tensors, rows indexed as the decoder indexes them (``decoder.row(j, b)``)."""

    masked: torch.Tensor  # (R, Lb) bool: masked before the step
    new: torch.Tensor  # (R, Lb) the block after the step
    remasked: torch.Tensor  # (R, Lb) bool
    score: torch.Tensor  # (R, Lb) float64


def _generate(model, prompts, cfg: SamplerConfig, ids: SpecialIds, generators) -> list[Generation]:
    """The block loop, shared by the two decoders: :class:`EagerDecoder` (the reference step) and, with
    ``graphs``, :class:`remedi.decoding.graphs.StaticDecoder`. The loop keeps the host's bookkeeping
    (active rows, NFE, trajectories); the decoders own the tensors. The loop itself reads device values
    only through ``still_running`` (threshold decoding, once a step), ``end_block`` with eos_gating (once
    a block), the trajectory record and ``finish``; the static decoder reads none anywhere else."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    B, Lb, G = len(prompts), cfg.block_length, cfg.gen_length
    x, attn, P = layout_batch(prompts, G, ids, device)
    if cfg.graphs:
        from remedi.decoding.graphs import static_decoder

        dec = static_decoder(model, cfg, ids, x, attn, P)
    else:
        dec = EagerDecoder(model, cfg, ids, x, attn, P)
    nfe_per_step = 2 if cfg.cfg_scale > 0 else 1
    nfe = [0] * B
    rstep = [0] * B  # steps each row has taken (its trajectory's step index)
    traj = [[] for _ in range(B)] if cfg.record_trajectory else None
    thresh = cfg.threshold is not None
    block_rows = []  # the rows each computed block decoded
    active = list(range(B))
    for blk in range(cfg.num_blocks):
        if not active:
            break
        lo, hi = P + blk * Lb, P + (blk + 1) * Lb
        dec.begin_block(blk, lo, hi, active)
        block_rows.append(active)
        gens = [generators[b] for b in active]
        running = [True] * len(active)  # threshold mode: rows whose block still holds a mask
        n = 0
        # A threshold step leaves at least one mask fewer, so a block ends within Lb steps.
        while n < (Lb if thresh else cfg.steps_per_block) and any(running):
            full = n == 0 or (cfg.cache_refresh > 0 and n % cfg.cache_refresh == 0)
            out = dec.step(n, full, [g if r else None for g, r in zip(gens, running)], running)
            rows = [(j, b) for j, b in enumerate(active) if running[j]]
            if traj is not None:
                ranked = torch.ones_like(out.masked) if cfg.remasks else out.masked
                _record(traj, [(dec.row(j, b), b) for j, b in rows], rstep, blk, lo - P, out.masked, out.new,
                        out.remasked, out.score, ranked, dec.generated(), ids)
            for _, b in rows:
                nfe[b] += nfe_per_step
                rstep[b] += 1
            if thresh:
                running = dec.still_running()  # the one host sync of a threshold step
            n += 1
        if any(running) and thresh:
            raise RuntimeError("threshold decoding left masks in a block after block_length steps (a bug)")
        done = dec.end_block(cfg.eos_gating)
        if cfg.eos_gating:
            active = [b for j, b in enumerate(active) if not done[j]]
    rows, per_block = dec.finish()
    remasks = [[] for _ in range(B)]
    for blk_rows, counts in zip(block_rows, per_block):
        for j, b in enumerate(blk_rows):
            remasks[b].append(counts[j])
    seconds = (time.perf_counter() - t0) / B
    return [Generation(tokens=cut_at_eos(rows[b], ids.eos), nfe=nfe[b], remasks=sum(remasks[b]),
                       remasks_per_block=remasks[b], seconds=seconds,
                       trajectory=None if traj is None else traj[b]) for b in range(B)]


class EagerDecoder:
    """The reference step: each block decodes its active rows as a sub-batch (rows stopped by eos_gating
    are no longer computed) through a fresh cache; every step is ordinary tensor code.

    The interface the loop uses (shared with :class:`remedi.decoding.graphs.StaticDecoder`):
    begin_block, step, row, generated, still_running, end_block, finish.
    """

    def __init__(self, model, cfg: SamplerConfig, ids: SpecialIds, x: torch.Tensor,
                 attn: Optional[torch.Tensor], P: int):
        self.model, self.cfg, self.ids, self.x, self.attn, self.P = model, cfg, ids, x, attn, P
        self.device = x.device
        self.K = torch.tensor(unmask_schedule(cfg.block_length, cfg.steps_per_block), device=self.device)
        self.log: list[torch.Tensor] = []  # per computed block: its active rows' remask counts

    def begin_block(self, blk: int, lo: int, hi: int, active: list[int]) -> None:
        self.lo, self.hi, self.active = lo, hi, active
        self.idx = torch.tensor(active, device=self.device)
        self.xa = self.x[self.idx]
        self.aa = None if self.attn is None else self.attn[self.idx]
        self.counts = None if self.cfg.threshold is not None else \
            transfer_counts((self.xa[:, lo:hi] == self.ids.mask).sum(1), self.cfg.steps_per_block)  # (A, s)
        self.cache = new_cache(self.cfg)
        self.blk_remasks = torch.zeros(len(active), dtype=torch.long, device=self.device)

    def step(self, n: int, full: bool, step_gens, running: list[bool]) -> StepOut:
        cfg, ids, lo, hi = self.cfg, self.ids, self.lo, self.hi
        A = len(self.active)
        logits, ups = block_forward(self.model, self.xa, self.aa, lo, hi, self.P, cfg, ids.mask, self.cache, full)
        logits = prepare_logits(logits, cfg, ids)
        cur = self.xa[:, lo:hi]
        x0 = draw_candidates(logits, cfg.temperature, step_gens)
        rand = draw_uniform(A, cfg.block_length, step_gens, self.device) if cfg.strategy in RANDOM_STRATEGIES \
            else None
        if cfg.threshold is not None:
            k = None
        else:
            k = self.K[n].expand(A) if cfg.remasks else self.counts[:, n]
        run = None if all(running) else torch.tensor(running, device=self.device)[:, None]  # finished rows stay
        new, masked, remasked, score = decide(cfg, ids, logits, ups, cur, x0, rand, k, run)
        self.xa[:, lo:hi] = new
        self.blk_remasks += remasked.sum(1)
        self.new = new
        return StepOut(masked, new, remasked, score)

    def row(self, j: int, b: int) -> int:
        return j

    def generated(self) -> torch.Tensor:
        return self.xa[:, self.P:]

    def still_running(self) -> list[bool]:
        return (self.new == self.ids.mask).any(1).tolist()

    def end_block(self, eos_gating: bool) -> Optional[list[bool]]:
        """Write the block back; with eos_gating, which active rows hold EOS (the rest is not computed)."""
        self.x[self.idx] = self.xa
        self.log.append(self.blk_remasks)
        if not eos_gating:
            return None
        done = (self.xa[:, self.lo:self.hi] == self.ids.eos).any(1).tolist()
        for j, b in enumerate(self.active):
            if done[j]:
                self.x[b, self.hi:] = self.ids.eos
        return done

    def finish(self) -> tuple[list[list[int]], list[list[int]]]:
        """(generated tokens of every row, remask counts of each computed block's active rows)."""
        return self.x[:, self.P:].tolist(), [t.tolist() for t in self.log]


def cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def _record(traj, rows, rstep, blk, off, masked, new, remasked, score, ranked, gen, ids):
    """Append one step to the trajectory of each (batch index j, row b) in ``rows``."""
    unm = (masked & (new != ids.mask)).tolist()
    rem = remasked.tolist()
    sc = score.tolist()
    rk = ranked.tolist()
    gen = gen.tolist()
    for j, b in rows:
        traj[b].append({
            "step": rstep[b], "block": blk, "span": [off, off + len(sc[j])],
            "unmasked": [off + i for i, v in enumerate(unm[j]) if v],
            "remasked": [off + i for i, v in enumerate(rem[j]) if v],
            "conf": {off + i: float(v) for i, v in enumerate(sc[j]) if rk[j][i]},
            "tokens": [None if t == ids.mask else t for t in gen[j]],
        })
