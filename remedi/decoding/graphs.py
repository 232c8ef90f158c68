"""Static-buffer decoding and CUDA graphs for the block sampler (``SamplerConfig.graphs``).

Why: a cached LLaDA-8B step at batch 1 computes 32 tokens, about one read of the 16 GB of weights, yet
the eager step is launch-bound: hundreds of kernel launches and a host synchronisation per step leave the
GPU idle most of the time (BENCHMARKS.md has the measurements). A CUDA graph replays a whole step with one launch; capturing one
needs every tensor of the step at a fixed address with a fixed shape, and no host sync inside.

What is static (one :class:`StaticDecoder` per model and (batch, prompt and block lengths, flags that
change the step's arithmetic), kept for later ``generate`` calls, :data:`MAX_DECODERS` per model):

* ``x`` (B, T): the whole sequence. A step reads and writes its block through ``pos_blk`` (Lb,), the
  block's positions as a device tensor rewritten at each block start, so one graph serves every block.
* :class:`~remedi.model.kv_cache.StaticKVCache`: keys/values (R, H_kv, T, D) per layer (R = B, or 2B with CFG) allocated once;
  a full forward copies into them, a partial one writes its positions with ``index_copy_``.
* RoPE tables: the whole sequence's (computed once) and the block's (rewritten at each block start by
  the same call the model makes, so the values are bit-identical).
* The schedule: ``k_now`` () = K_n of the remask strategies, ``n_now`` () with the block's ``base`` /
  ``rem`` (B,) for LLaDA's counts (= base + (n < rem), as :func:`transfer_counts`); filled before a step.
* Row state: ``live`` (B,) rows not stopped by eos_gating; ``run`` (B,) rows still decoding the block
  (threshold mode; = live otherwise); ``blk_remasks`` (B,) and ``rem_table`` (blocks, B) remask counts.
* Random inputs: ``u_gumbel`` (B, Lb, V) and ``u_conf`` (B, Lb) float64, filled before a step from each
  row's generator in the eager order (all Gumbel uniforms, then all confidences), so the streams match.

Graphs (CUDA with ``graph_capture``): captured at first use, after two eager warm-ups on a side stream
(the state they change is restored), in one memory pool per decoder: ``"full"`` (the whole sequence:
a block's first step, refresh steps, every step without a cache), ``"dual"`` (the block alone, all
blocks) and ``("prefix", lo)`` (block and suffix, one per block since the length changes). A graph holds
the forward *and* the decision (scores, ranking, the update of ``x``, remask counts, finished rows).
Replays read the current values of all inputs; only the first call of a signature captures (captures
synchronise the device), later calls replay.

EOS and the end of a block: the step schedule has a fixed number of steps per block, so the host needs
no device value to run a block. eos_gating is decided on the device at the block's end (rows holding
EOS are frozen and their suffix set to EOS); the host reads that (B,) flag once per block, to stop when
every row is done. Threshold decoding reads ``run`` once per step (its step count depends on the
confidences). Rows are never dropped from the static batch: a stopped row stays in it, frozen (computed,
never changed, no longer counted in NFE), so the shapes and the graphs stay the same.

Exactness: the static forward runs the model's own blocks on the same inputs and equals
``RemeDiLM.forward`` bit for bit in float32 on CPU (tested); :func:`rank_select` selects exactly what
:func:`~remedi.decoding.sampler.select_top_k` does; so the static decoder equals the eager one token for
token (tested over the flag grid). In bf16 on a GPU the kernels may differ (e.g. an index_select copy
where eager uses a strided view), so agreement there is up to rounding, as between batch sizes.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional

import torch

from remedi.model.kv_cache import StaticKVCache
from remedi.model.llada import RemeDiLM, rope_tables
from remedi.model.loading import SpecialIds
from remedi.decoding.step import (RANDOM_STRATEGIES, PolicyRule, SamplerConfig, StepOut, decide,  # noqa: F401
                                  gumbel_argmax, policy_decide, prepare_logits, rank_select,
                                  unmask_schedule, ups_scorer)  # rank_select: re-exported
from remedi.model.block_causal import prefix_mask

MAX_DECODERS = 3  # static decoders (buffers + graphs) kept per model, least recently used evicted
WARMUP = 2  # eager runs of a step before its capture (compilation, cuBLAS/Triton initialisation)


# -------------------------------------------------------------------------------------- the forward
def static_forward(lm, head, input_ids: torch.Tensor, rope, mask: Optional[torch.Tensor],
                   cache: Optional[StaticKVCache], out_index: Optional[torch.Tensor] = None,
                   out_slice: Optional[slice] = None, with_hidden: bool = False):
    """``RemeDiLM.forward`` for the static decoder: (logits (R, L', V), UPS logits (R, L') or None), and
    with ``with_hidden`` the final hidden states (R, L', d) (what a UPS head reads).

    The same blocks, taps and heads as :meth:`LLaDAModel.forward` / :meth:`RemeDiLM.forward`, with the
    RoPE tables and the key-padding mask (R, 1, 1, T) given as tensors and the output positions either
    as a device index (``out_index``, so one graph serves every block) or a slice. The cache's write
    positions are ``cache.pos``. tests/test_decoding_graphs.py checks bit equality with the model.
    """
    cfg = lm.config
    x = lm.transformer.wte(input_ids)  # (R, L, d)
    taps = {t: k for k, t in enumerate(cfg.ups_taps)}
    u = None
    for i, block in enumerate(lm.transformer.blocks):
        x = block(x, rope, mask, cache, 0)
        if i in taps:
            k = taps[i]
            u = x if u is None else x + u
            u = lm.blocks_upm[k](u, rope, mask, cache, 0)
            x = x + lm.backprop_linears[k](lm.backprop_norms[k](u))
    if out_index is not None:
        x = x.index_select(1, out_index)
        u = None if u is None else u.index_select(1, out_index)
    elif out_slice is not None:
        x = x[:, out_slice]
        u = None if u is None else u[:, out_slice]
    hidden = lm.transformer.ln_f(x)
    logits = lm.transformer.ff_out(hidden)
    if cfg.embedding_size != cfg.vocab_size:
        logits = logits[..., :cfg.vocab_size]
    if head is not None:
        ups = head(hidden)
    elif u is not None:
        ups = lm.linear_confidence(lm.ln_f_upm(u)).squeeze(-1).float()  # (R, L')
    else:
        ups = None
    return (logits, ups, hidden) if with_hidden else (logits, ups)


# -------------------------------------------------------------------------------------- the decoder
def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    cur = torch.cuda.current_device()
    return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)


def _fill_uniform(buf: torch.Tensor, g: torch.Generator) -> None:
    """``buf`` <- torch.rand(buf.shape, generator=g) (the same numbers: rand is uniform_(0, 1)); in place
    when g lives on buf's device, else drawn on g's device and copied (a host sync on CUDA)."""
    if _same_device(g.device, buf.device):
        buf.uniform_(0, 1, generator=g)
    else:
        buf.copy_(torch.rand(buf.shape, generator=g, dtype=buf.dtype, device=g.device))


class StaticDecoder:
    """Static buffers (and, on CUDA, graphs) for one (model, batch, lengths, arithmetic flags) signature.

    Same interface as :class:`remedi.decoding.sampler.EagerDecoder`; rows are indexed by batch row.
    """

    def __init__(self, model: RemeDiLM, cfg: SamplerConfig, ids: SpecialIds, B: int, P: int, T: int,
                 has_mask: bool, capture: bool, rule: Optional[PolicyRule] = None):
        self.lm, self.head = model.model, model.ups_head  # not the RemeDiLM: the decoder cache is weak on it
        model.backbone.refresh_fused()  # fused projections (remedi.model.fused) still valid, before any capture
        c = self.lm.config
        self.ids, self.B, self.P, self.T, self.Lb = ids, B, P, T, cfg.block_length
        device = next(self.lm.parameters()).device
        self.device = device
        self.R = R = B * cfg.nfe_per_forward
        long = dict(dtype=torch.long, device=device)
        self.x = torch.full((B, T), ids.mask, **long)
        self.rule, self.causal = rule, cfg.layout == "block_causal"
        self.scorer = ups_scorer(model) if cfg.strategy == "ups" else None  # pure tensor code: captured too
        self.forwards = 0
        if self.causal and cfg.cache == "none":  # the block-causal prefix mask over the whole sequence, fixed
            self.mask = torch.ones((R, 1, T, T), dtype=torch.bool, device=device)
        elif has_mask or self.causal:  # keys; block-causal with a cache: also hides the blocks after the current
            self.mask = torch.ones((R, 1, 1, T), dtype=torch.bool, device=device)
        else:
            self.mask = None
        self.keys = torch.ones((R, T), dtype=torch.bool, device=device)  # key padding (1 = real token)
        self.pos_full = torch.arange(T, **long)
        self.pos_blk = torch.zeros(self.Lb, **long)
        self.rope_full = rope_tables(c.head_dim, c.rope_theta, 0, T, device)
        self.rope_blk = tuple(torch.zeros_like(t[:self.Lb]) for t in self.rope_full)
        blocks = list(self.lm.transformer.blocks) + list(getattr(self.lm, "blocks_upm", []))
        self.cache = None if cfg.cache == "none" else StaticKVCache(
            [b.layer_id for b in blocks], (R, c.n_kv_heads, T, c.head_dim), blocks[0].k_proj.weight.dtype, device)
        self.live = torch.ones(B, dtype=torch.bool, device=device)
        self.run = torch.ones(B, dtype=torch.bool, device=device)
        self.blk_remasks = torch.zeros(B, **long)
        self.rem_table = torch.zeros(cfg.num_blocks, B, **long)
        self.base, self.rem = torch.zeros(B, **long), torch.zeros(B, **long)
        self.n_now, self.k_now = torch.zeros((), **long), torch.zeros((), **long)
        self.u_gumbel = torch.zeros(B, self.Lb, c.vocab_size, dtype=torch.float64, device=device) \
            if cfg.temperature > 0 and rule is None else None
        self.u_conf = torch.zeros(B, self.Lb, dtype=torch.float64, device=device) \
            if cfg.strategy in RANDOM_STRATEGIES and rule is None else None
        self.noise = {} if rule is None else {name: torch.zeros((B,) + shape, dtype=dt, device=device)
                                              for name, shape, dt in rule.draws(self.Lb, c.vocab_size)}
        self.capture = capture
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle() if capture and device.type == "cuda" else None
        self.cfg = cfg

    # ---------------------------------------------------------------------------- host-side driving
    def reset(self, cfg: SamplerConfig, x: torch.Tensor, attn: Optional[torch.Tensor]) -> None:
        """Start a generation: the laid-out sequence, its padding mask, fresh row state."""
        self.cfg = cfg  # the fields graphs bake in are part of the signature; steps etc. may differ
        self.K = unmask_schedule(self.Lb, cfg.steps_per_block)
        self.x.copy_(x)
        if attn is not None:
            am = attn if self.R == self.B else torch.cat([attn, attn], 0)
            self.keys.copy_(am.to(torch.bool))
        else:
            self.keys.fill_(True)
        if self.causal and cfg.cache == "none":
            self.mask.copy_(prefix_mask(self.P, self.T - self.P, self.Lb, self.keys[:, :self.P], batch_size=self.R,
                                        device=self.device))
        elif self.mask is not None:
            self.mask.copy_(self.keys[:, None, None, :])
        self.forwards = 0
        self.live.fill_(True)
        self.rem_table.zero_()
        self.blocks: list[list[int]] = []

    def begin_block(self, blk: int, lo: int, hi: int, active: list[int]) -> None:
        c, s = self.lm.config, self.cfg.steps_per_block
        self.blk, self.lo, self.hi, self.active = blk, lo, hi, active
        self.pos_blk.copy_(self.pos_full[lo:hi])
        for buf, t in zip(self.rope_blk, rope_tables(c.head_dim, c.rope_theta, lo, self.Lb, self.device)):
            buf.copy_(t)
        m = (self.x[:, lo:hi] == self.ids.mask).sum(1)  # (B,) masked at the block start
        self.base.copy_(m // s)
        self.rem.copy_(m % s)
        self.run.copy_(self.live)
        self.blk_remasks.zero_()
        if self.causal and self.cache is not None:
            if blk == 0:  # the prompt alone, once (it sees only itself)
                self._set_key_mask(self.P)
                self._forward_only("prefill")
            self._set_key_mask(hi)  # the block sees [prompt | blocks 0..blk]

    def _set_key_mask(self, end: int) -> None:
        self.mask.copy_((self.keys & (self.pos_full < end))[:, None, None, :])

    def step(self, n: int, full: bool, step_gens, running: list[bool]) -> StepOut:
        cfg = self.cfg
        drawing = [(self.active[j], g) for j, g in enumerate(step_gens) if g is not None]
        if self.u_gumbel is not None:
            for b, g in drawing:
                _fill_uniform(self.u_gumbel[b], g)
        if self.u_conf is not None:
            for b, g in drawing:
                _fill_uniform(self.u_conf[b], g)
        for b, g in drawing:  # a PolicyRule's uniforms: each row draws them in the rule's order
            for buf in self.noise.values():
                _fill_uniform(buf[b], g)
        if cfg.threshold is None:
            (self.k_now if cfg.remasks or self.rule else self.n_now).fill_(self.K[n] if cfg.remasks or self.rule else n)
        if self.causal:  # block-causal: the block alone against the cache, or the whole masked sequence
            key = "full" if self.cache is None else "dual"
        elif full or self.cache is None:
            key = "full"
        else:
            key = "dual" if cfg.cache == "dual" else ("prefix", self.lo)
        self.forwards += 1
        return self._run(key)

    def row(self, j: int, b: int) -> int:
        return b

    def generated(self) -> torch.Tensor:
        return self.x[:, self.P:]

    def still_running(self) -> list[bool]:
        r = self.run.tolist()  # threshold decoding's one host read per step
        return [r[b] for b in self.active]

    def end_block(self, eos_gating: bool) -> Optional[list[bool]]:
        self.rem_table[self.blk].copy_(self.blk_remasks)
        if self.causal and self.cache is not None and self.hi < self.T:
            self._forward_only("commit")  # the finished block's keys/values in its final state
        self.blocks.append(self.active)
        if not eos_gating:
            return None
        done = self.live & (self.x[:, self.lo:self.hi] == self.ids.eos).any(1)  # (B,)
        self.x[:, self.hi:].masked_fill_(done[:, None], self.ids.eos)
        self.live &= ~done
        d = done.tolist()  # the block's one host read
        return [d[b] for b in self.active]

    def finish(self) -> tuple[list[list[int]], list[list[int]]]:
        rows, table = self.x[:, self.P:].tolist(), self.rem_table.tolist()
        return rows, [[table[k][b] for b in act] for k, act in enumerate(self.blocks)]

    # --------------------------------------------------------------------- the step (graph content)
    def _forward(self, key):
        cfg, c = self.cfg, self.lm.config
        if key == "full":
            inp, rope, out_index, out_slice, pos = self.x, self.rope_full, self.pos_blk, None, None
        elif key == "dual":
            inp, rope, out_index, out_slice, pos = self.x.index_select(1, self.pos_blk), self.rope_blk, None, \
                None, self.pos_blk
        else:  # ("prefix", lo): the block and everything after it
            lo = key[1]
            inp, out_index, out_slice, pos = self.x[:, lo:], None, slice(0, self.Lb), self.pos_full[lo:]
            rope = rope_tables(c.head_dim, c.rope_theta, lo, self.T - lo, self.device)
        if self.cache is not None:
            self.cache.pos = pos
        if cfg.cfg_scale > 0:
            un = inp.clone()
            if key == "full":
                un[:, :self.P] = self.ids.mask  # unconditional copy: the prompt fully masked
            inp = torch.cat([inp, un], 0)
        logits, ups, hidden = static_forward(self.lm, self.head, inp, rope, self.mask, self.cache, out_index,
                                             out_slice, with_hidden=True)
        if cfg.cfg_scale > 0:
            cond, unc = logits.float().chunk(2, 0)
            logits = unc + (cfg.cfg_scale + 1) * (cond - unc)
            ups = None if ups is None else ups.chunk(2, 0)[0]
            hidden = hidden.chunk(2, 0)[0]
        else:
            logits = logits.float()
        return logits, ups, hidden

    def _forward_only(self, key: str) -> None:
        """The block-causal cache's extra forwards: ``prefill`` (the prompt) and ``commit`` (a finished block).
        Their keys/values land in the cache; the outputs are dropped."""
        if key == "prefill":
            self.cache.pos = self.pos_full[:self.P]
            inp, rope = self.x[:, :self.P], tuple(t[:self.P] for t in self.rope_full)
        else:
            self.cache.pos = self.pos_blk
            inp, rope = self.x.index_select(1, self.pos_blk), self.rope_blk
        self.forwards += 1
        if key == "prefill" or not self.capture:  # the prefill runs once a generation: not worth a graph
            static_forward(self.lm, self.head, inp, rope, self.mask, self.cache, out_slice=slice(0, 0))
            return
        self._run(key, lambda: static_forward(self.lm, self.head, self.x.index_select(1, self.pos_blk), self.rope_blk,
                                              self.mask, self.cache, out_slice=slice(0, 0)))

    def _decide(self, logits, ups, hidden) -> StepOut:
        cfg, ids = self.cfg, self.ids
        logits = prepare_logits(logits, cfg, ids)
        cur = self.x.index_select(1, self.pos_blk)  # (B, Lb)
        if self.rule is not None:
            out = policy_decide(self.rule, ids, logits, ups, cur, self.noise, self.k_now.expand(self.B), hidden,
                                self.scorer)
            self.x.index_copy_(1, self.pos_blk, out.new)
            self.blk_remasks += out.remasked.sum(1)
            return out
        x0 = logits.argmax(-1) if self.u_gumbel is None else gumbel_argmax(logits, self.u_gumbel, cfg.temperature)
        if cfg.threshold is not None:
            k = None
        elif cfg.remasks:
            k = self.k_now.expand(self.B)
        else:
            k = self.base + (self.n_now < self.rem).long()
        new, masked, remasked, score = decide(cfg, ids, logits, ups, cur, x0, self.u_conf, k, self.run[:, None],
                                              rank_select, hidden=hidden, scorer=self.scorer)
        self.x.index_copy_(1, self.pos_blk, new)
        self.blk_remasks += remasked.sum(1)
        if cfg.threshold is not None:
            self.run &= (new == ids.mask).any(1)
        return StepOut(masked, new, remasked, score)

    def _run(self, key, fn=None):
        if fn is None:
            def fn():
                return self._decide(*self._forward(key))

        if not self.capture:
            return fn()
        if key not in self.graphs:
            self.graphs[key] = self._capture(key, fn)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, key, fn):
        state = [self.x, self.blk_remasks, self.run]  # what a step changes (the cache is rewritten first)
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                fn()
                for t, v in zip(state, saved):
                    t.copy_(v)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()
        except Exception as e:
            raise RuntimeError(f"CUDA graph capture of the decoding step {key!r} failed: {e}. Decode with "
                               "graph_capture=False (the same static step, uncaptured) or without graphs") from e
        return graph, out


# ------------------------------------------------------------------------------------ decoder cache
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def can_capture(device: torch.device) -> bool:
    """CUDA graphs exist on CUDA devices only (elsewhere the static step runs uncaptured)."""
    return device.type == "cuda"


def check_static_model(model) -> None:
    if not isinstance(model, RemeDiLM):
        raise ValueError(f"--graphs needs a RemeDiLM (its blocks are run directly), got {type(model).__name__}; "
                         f"decode without --graphs")


def _signature(model, cfg: SamplerConfig, ids: SpecialIds, x: torch.Tensor, attn, P: int, capture: bool,
               rule: Optional[PolicyRule] = None):
    """Everything the buffers' shapes or a graph's baked-in constants depend on. Parameter addresses are
    included: a graph reads the weights where they were at capture (in-place updates are seen)."""
    params = tuple(p.data_ptr() for p in model.parameters())
    return (tuple(x.shape), P, cfg.block_length, cfg.num_blocks, attn is not None, cfg.strategy, cfg.temperature,
            cfg.cfg_scale, cfg.logits_eos_inf, cfg.confidence_eos_eot_inf, cfg.cache, cfg.threshold,
            cfg.remask_threshold, capture, cfg.compile, (ids.mask, ids.eos, ids.eot), str(x.device), params,
            cfg.layout, rule, id(ups_scorer(model)))  # a graph bakes in the scorer's code and buffers


def static_decoder(model: RemeDiLM, cfg: SamplerConfig, ids: SpecialIds, x: torch.Tensor,
                   attn: Optional[torch.Tensor], P: int, rule: Optional[PolicyRule] = None) -> StaticDecoder:
    """The model's decoder for this signature (created, or reused with its graphs), reset to ``x``."""
    capture = cfg.graph_capture and can_capture(x.device)
    key = _signature(model, cfg, ids, x, attn, P, capture, rule)
    kept = _DECODERS.setdefault(model, OrderedDict())
    dec = kept.pop(key, None)
    if dec is None:
        while len(kept) >= MAX_DECODERS:
            kept.popitem(last=False)  # free the oldest buffers and graphs before allocating new ones
        B, T = x.shape
        dec = StaticDecoder(model, cfg, ids, B, P, T, attn is not None, capture, rule)
    kept[key] = dec
    dec.reset(cfg, x, attn)
    return dec


def release_decoders(model=None) -> None:
    """Drop the static decoders (buffers and graphs) of ``model``, or of every model."""
    if model is None:
        _DECODERS.clear()
    else:
        _DECODERS.pop(model, None)


def decoders_of(model) -> int:
    """How many static decoders ``model`` holds (for tests and benchmarks)."""
    return len(_DECODERS.get(model, ()))
