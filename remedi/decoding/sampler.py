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
  (A residual UPS with a hide threshold, :mod:`remedi.model.residual`, keeps fewer: kept positions scoring below
  its tau are hidden too, except at the block's last step.)

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
* "The same alone or in any batch" is exact in float32 (tested on CPU; the GPU check is in BENCHMARKS.md). In bfloat16 it holds only up to rounding: padding and batch size change the
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
  graphs (:class:`~remedi.model.kv_cache.EagerUpdateCache`).
* ``graphs`` (:mod:`remedi.decoding.graphs`): the same algorithm on static buffers -- one fixed-size KV
  cache over the whole sequence, the block's position, schedule, EOS gate and finished rows as device
  tensors, a sort-free ranking -- so that no step of a block synchronises with the host, and on a CUDA
  device each step is one CUDA-graph replay (``graph_capture``). Equal to the eager decoder token for
  token in float32 for every flag combination (tested); host reads remain where the algorithm needs a
  value: once per threshold step, once per block with eos_gating, every step with trajectories.
"""
from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from remedi.decoding import graphs
from remedi.decoding.step import (  # noqa: F401  (re-exported: the sampler's public names)
    STRATEGIES, LLADA_STRATEGIES, REMASK_STRATEGIES, RANDOM_STRATEGIES, CACHE_MODES, BlockCounts, SamplerConfig,
    StepOut, transfer_counts, unmask_schedule, layout_batch, new_cache, block_forward, prepare_logits,
    draw_candidates, gumbel_argmax, draw_uniform, eos_eot_candidates, position_scores, select_top_k,
    threshold_confidence, threshold_step, decide, LAYOUTS, PolicyRule, policy_decide, prefill_prompt, commit_block,
    ups_scorer)
from remedi.model.loading import SpecialIds


@dataclass
class Generation:
    """One row's result. ``tokens`` drops everything from the first EOS on.

    nfe: model forward passes this row took part in (one per step, two per step with CFG, and the second looks of
    a token action, :class:`remedi.policy.slip.SlipRepredict`).
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
        graphs.check_static_model(model)
    scorer = ups_scorer(model) if cfg.strategy == "ups" else None
    if scorer is not None and cfg.graphs and getattr(scorer, "host_sync", False):
        raise ValueError(f"{type(scorer).__name__} reads the tokens on the host every step: decode it without --graphs")
    if scorer is not None and cfg.threshold is not None:
        raise ValueError("a UPS policy (residual UPS, slip oracle) ranks positions under the step schedule only: "
                         "run it without --threshold (its scores are not on the (0, 1] scale a threshold compares)")
    if not cfg.compile:
        return _generate(model, prompts, cfg, ids, generators)
    compile_model(model)
    with _compile_context():
        return _generate(model, prompts, cfg, ids, generators)


def _generate(model, prompts, cfg: SamplerConfig, ids: SpecialIds, generators) -> list[Generation]:
    """The eval sampler: :func:`decode_blocks` with the eval rule, its rows cut into :class:`Generation`."""
    t0 = time.perf_counter()
    B = len(prompts)
    run = decode_blocks(model, prompts, cfg, ids, generators)
    rows, per_block = run.decoder.finish()
    remasks = [[] for _ in range(B)]
    for blk_rows, counts in zip(run.block_rows, per_block):
        for j, b in enumerate(blk_rows):
            remasks[b].append(counts[j])
    seconds = (time.perf_counter() - t0) / B
    return [Generation(tokens=cut_at_eos(rows[b], ids.eos), nfe=run.nfe[b], remasks=sum(remasks[b]),
                       remasks_per_block=remasks[b], seconds=seconds,
                       trajectory=None if run.traj is None else run.traj[b]) for b in range(B)]


@dataclass
class BlockRun:
    """What :func:`decode_blocks` leaves: the decoder (its final state: ``finish()``, ``x``) and the host's
    bookkeeping (NFE per row, the rows of each computed block, trajectories), P the prompt length."""

    decoder: object
    nfe: list
    block_rows: list
    traj: Optional[list]
    P: int


def decode_blocks(model, prompts, cfg: SamplerConfig, ids: SpecialIds, generators,
                  rule: Optional[PolicyRule] = None, on_step=None) -> BlockRun:
    """The block loop, shared by the two decoders, the eval sampler and Remask RL rollouts.

    Decoders: :class:`EagerDecoder` (the reference step) and, with ``graphs``,
    :class:`remedi.decoding.graphs.StaticDecoder`. The selection rule is the eval rule (:func:`decide`)
    unless ``rule`` is a :class:`PolicyRule` (:func:`policy_decide`; step schedule only, no eos_gating).
    ``on_step(blk, n, out)`` is called after every step with its :class:`StepOut` (a rollout's recorder).
    The loop keeps the host's bookkeeping (active rows, NFE, trajectories); the decoders own the tensors.
    The loop itself reads device values only through ``still_running`` (threshold decoding, once a step),
    ``end_block`` with eos_gating (once a block), the trajectory record and ``finish``; the static decoder
    reads none anywhere else. Call it under ``torch.inference_mode()`` or ``torch.no_grad()``.
    """
    device = next(model.parameters()).device
    B, Lb, G = len(prompts), cfg.block_length, cfg.gen_length
    if rule is not None and (cfg.threshold is not None or cfg.eos_gating or cfg.cfg_scale > 0):
        raise ValueError("a PolicyRule runs the step schedule only: no threshold, eos_gating or cfg_scale")
    x, attn, P = layout_batch(prompts, G, ids, device)
    if cfg.graphs:
        dec = graphs.static_decoder(model, cfg, ids, x, attn, P, rule)
    else:
        dec = EagerDecoder(model, cfg, ids, x, attn, P, rule)
    nfe_per_step = cfg.nfe_per_forward
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
            if on_step is not None:
                on_step(blk, n, out)
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
    extra = getattr(dec, "extra_nfe", None)  # a token action's second looks (eager decoder only)
    if extra is not None:
        nfe = [a + b for a, b in zip(nfe, extra)]
    return BlockRun(dec, nfe, block_rows, traj, P)


class EagerDecoder:
    """The reference step: each block decodes its active rows as a sub-batch (rows stopped by eos_gating
    are no longer computed) through a fresh cache; every step is ordinary tensor code.

    The interface the loop uses (shared with :class:`remedi.decoding.graphs.StaticDecoder`):
    begin_block, step, row, generated, still_running, end_block, finish.
    """

    def __init__(self, model, cfg: SamplerConfig, ids: SpecialIds, x: torch.Tensor,
                 attn: Optional[torch.Tensor], P: int, rule: Optional[PolicyRule] = None):
        self.model, self.cfg, self.ids, self.x, self.attn, self.P = model, cfg, ids, x, attn, P
        self.rule = rule
        self.scorer = ups_scorer(model) if cfg.strategy == "ups" else None  # a residual UPS policy, or None
        if rule is not None and hasattr(self.scorer, "token_action"):
            raise ValueError(f"{type(self.scorer).__name__} rewrites tokens outside the rollout policy: Remask RL "
                             "cannot train it; roll out with a UPS that only ranks positions")
        self.causal = cfg.layout == "block_causal"
        self.forwards = 0  # model forwards (steps, and the block-causal cache's prefill and commits)
        self.device = x.device
        self.K = torch.tensor(unmask_schedule(cfg.block_length, cfg.steps_per_block), device=self.device)
        self.log: list[torch.Tensor] = []  # per computed block: its active rows' remask counts
        self.extra_nfe = [0] * x.shape[0]  # per row: forwards of a token action's second looks (repredict)

    def begin_block(self, blk: int, lo: int, hi: int, active: list[int]) -> None:
        self.lo, self.hi, self.active = lo, hi, active
        self.idx = torch.tensor(active, device=self.device)
        self.xa = self.x[self.idx]
        self.aa = None if self.attn is None else self.attn[self.idx]
        self.counts = None if self.cfg.threshold is not None else \
            transfer_counts((self.xa[:, lo:hi] == self.ids.mask).sum(1), self.cfg.steps_per_block)  # (A, s)
        if not self.causal or blk == 0:  # the block-causal cache lives across blocks (no eos_gating there)
            self.cache = new_cache(self.cfg)
            if self.causal and self.cache is not None:
                prefill_prompt(self.model, self.xa, self.aa, self.P, self.cache)
                self.forwards += 1
        self.blk_remasks = torch.zeros(len(active), dtype=torch.long, device=self.device)

    def step(self, n: int, full: bool, step_gens, running: list[bool]) -> StepOut:
        cfg, ids, lo, hi = self.cfg, self.ids, self.lo, self.hi
        A = len(self.active)
        logits, ups, hidden = block_forward(self.model, self.xa, self.aa, lo, hi, self.P, cfg, ids.mask, self.cache,
                                            full, with_hidden=True)
        self.forwards += 1
        logits = prepare_logits(logits, cfg, ids)
        cur = self.xa[:, lo:hi]
        if self.rule is not None:
            if ups is None:
                raise ValueError("the model has no UPS: a rollout ranks positions by UPS logits (pass --ups_head)")
            V = logits.shape[-1]
            noise = {name: torch.stack([torch.rand(shape, generator=g, dtype=dt, device=g.device) for g in step_gens])
                     .to(self.device) for name, shape, dt in self.rule.draws(cfg.block_length, V)}
            out = policy_decide(self.rule, ids, logits, ups, cur.clone(), noise, self.K[n].expand(A), hidden,
                                self.scorer)  # state kept
            self.xa[:, lo:hi] = out.new
            self.blk_remasks += out.remasked.sum(1)
            self.new = out.new
            return out
        x0 = draw_candidates(logits, cfg.temperature, step_gens)
        action = getattr(self.scorer, "token_action", None)  # a policy that may rewrite tokens (remedi.policy.slip)
        if action is not None:
            x0, cur = action(x0, cur, self.repredict)
        rand = draw_uniform(A, cfg.block_length, step_gens, self.device) if cfg.strategy in RANDOM_STRATEGIES \
            else None
        if cfg.threshold is not None:
            k = None
        else:
            k = self.K[n].expand(A) if cfg.remasks else self.counts[:, n]
        run = None if all(running) else torch.tensor(running, device=self.device)[:, None]  # finished rows stay
        new, masked, remasked, score = decide(cfg, ids, logits, ups, cur, x0, rand, k, run, hidden=hidden,
                                              scorer=self.scorer)
        self.xa[:, lo:hi] = new
        self.blk_remasks += remasked.sum(1)
        self.new = new
        return StepOut(masked, new, remasked, score)

    def repredict(self, rows: list[int], block: torch.Tensor) -> torch.Tensor:
        """Prepared logits (len(rows), Lb, V) of the current block for active rows ``rows``, with the block's
        tokens replaced by ``block`` (masks where the caller hides context): one extra forward of those rows,
        without the cache (a full forward that leaves the cache as it was). A token action's second look."""
        idx = torch.tensor(rows, device=self.device)
        x = self.xa[idx].clone()
        x[:, self.lo:self.hi] = block
        attn = None if self.aa is None else self.aa[idx]
        cfg = dataclasses.replace(self.cfg, cache="none")
        logits = block_forward(self.model, x, attn, self.lo, self.hi, self.P, cfg, self.ids.mask, None, True)[0]
        self.forwards += 1
        for r in rows:
            self.extra_nfe[self.active[r]] += cfg.nfe_per_forward
        return prepare_logits(logits, self.cfg, self.ids)

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
        if self.causal and self.cache is not None and self.hi < self.x.shape[1]:
            commit_block(self.model, self.xa, self.aa, self.lo, self.hi, self.cache)  # the finished block's keys
            self.forwards += 1
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
