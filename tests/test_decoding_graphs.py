"""Static-buffer decoding (``SamplerConfig.graphs``, remedi/decoding/graphs.py) on CPU, CUDA graphs where a GPU is.

* The pieces are exact: the static forward equals the model's forward bit for bit (full, dual and prefix
  steps through the static cache, head and stream UPS, padding, CFG rows), the sort-free ranking equals
  select_top_k, the in-place uniform draws equal torch.rand.
* The static decoder equals the eager decoder token for token (and NFE, remasks, trajectories) over the
  strategy x option x cache grid, in step and threshold mode.
* No host synchronisation inside a block: a spy on every Python-level way to read a tensor on the host
  counts zero from a block's first step to its end (one per step in threshold mode, one at the block's
  end with eos_gating); the same spy sees the eager decoder's per-step syncs.
* On CUDA (skipped without one): captured graphs equal the uncaptured static step, and
  torch.cuda.set_sync_debug_mode("error") passes through every replayed block.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from remedi.decoding import graphs
from remedi.decoding.graphs import StaticDecoder, rank_select, static_forward
from remedi.model.kv_cache import StaticKVCache
from remedi.decoding.sampler import (STRATEGIES, EagerDecoder, SamplerConfig,
                                     generate, layout_batch, select_top_k, threshold_step)
from remedi.model.llada import KVCache, rope_tables

from tests.helpers.sampler import TGRID, _tcfg
from tests.helpers.sampler import GRID, IDS, PROMPTS, Spy, _gens, _model, _scfg
from tests.helpers.sync import SyncSpy, _per_block, _watch  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(gens, conf=True):
    """Everything a generation reports; trajectories without their confidences when ``conf`` is False."""
    def traj(t):
        return None if t is None else [{k: v for k, v in s.items() if conf or k != "conf"} for s in t]
    return [(x.tokens, x.nfe, x.remasks, x.remasks_per_block, traj(x.trajectory)) for x in gens]


def assert_same(got, want, cfg):
    """Identical generations. With eos_gating the eager decoder drops finished rows from its batch and the
    static one freezes them, so the batch shapes differ and UPS/TPS scores may move by an ulp (as between
    batch sizes); tokens, NFE and remasks must still be identical, confidences equal to 1e-12."""
    if not cfg.eos_gating:
        assert _records(got) == _records(want)
        return
    assert _records(got, conf=False) == _records(want, conf=False)
    for x, y in zip(got, want):
        for a, b in zip(x.trajectory or [], y.trajectory or []):
            assert a["conf"] == pytest.approx(b["conf"], rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------------------------------ pieces
def test_rank_select_equals_select_top_k():
    rng = random.Random(0)
    for _ in range(300):
        B, L = rng.randint(1, 4), rng.randint(1, 12)
        pool = [0.1, 0.5, 0.9, float("-inf"), 0.0]
        vals = torch.tensor([[rng.choice(pool + [rng.random()]) for _ in range(L)] for _ in range(B)],
                            dtype=torch.float64)
        elig = torch.tensor([[rng.random() < 0.7 for _ in range(L)] for _ in range(B)])
        k = torch.tensor([rng.randint(0, L + 1) for _ in range(B)])
        assert torch.equal(rank_select(vals, elig, k), select_top_k(vals, elig, k))


def test_threshold_step_with_rank_select():
    rng = random.Random(1)
    for strategy, rthr in [("tps_prob", 0.3), ("llada_low_confidence", None), ("entropy", 0.5)]:
        cfg = SamplerConfig(strategy=strategy, threshold=0.6, remask_threshold=rthr)
        for _ in range(50):
            score = torch.tensor([[rng.choice([0.2, 0.7, rng.random()]) for _ in range(8)] for _ in range(3)],
                                 dtype=torch.float64)
            if strategy == "entropy":
                score = -score
            masked = torch.tensor([[rng.random() < 0.5 for _ in range(8)] for _ in range(3)])
            masked[:, 0] = True
            a = threshold_step(cfg, score, masked)
            b = threshold_step(cfg, score, masked, rank_select)
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_in_place_uniform_draws_equal_torch_rand():
    buf = torch.zeros(3, 4, 7, dtype=torch.float64)
    graphs._fill_uniform(buf[1], torch.Generator().manual_seed(5))
    want = torch.rand((4, 7), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(buf[1], want) and not buf[0].any() and not buf[2].any()


@pytest.mark.parametrize("arch", ["head", "stream"])
@pytest.mark.parametrize("cfg_rows", [False, True])
def test_static_forward_equals_the_model_bit_for_bit(model, stream_model, arch, cfg_rows):
    """Full forward into the static cache, then dual and prefix partial forwards: logits and UPS logits
    identical to RemeDiLM.forward through a KVCache (padded rows; optionally the CFG copy with its prompt
    masked, as the sampler batches it)."""
    m = model if arch == "head" else stream_model
    x, attn, P = layout_batch(PROMPTS, 16, IDS, "cpu")
    x[:, P + 3:P + 9] = torch.randint(0, 90, (3, 6), generator=torch.Generator().manual_seed(0))
    if cfg_rows:
        x, attn = torch.cat([x, x]), torch.cat([attn, attn])
        x[3:, :P] = IDS.mask
    R, T = x.shape
    c = m.config
    lo, hi = P + 8, P + 16
    mask = attn.bool()[:, None, None, :]
    blocks = list(m.model.transformer.blocks) + list(getattr(m.model, "blocks_upm", []))
    sc = StaticKVCache([b.layer_id for b in blocks], (R, c.n_kv_heads, T, c.head_dim), torch.float32, "cpu")
    with torch.inference_mode():
        ref_cache = KVCache()
        want = m(x, attn, cache=ref_cache, out_slice=slice(lo, hi))
        sc.pos = None
        got = static_forward(m.model, m.ups_head, x, rope_tables(c.head_dim, c.rope_theta, 0, T, "cpu"), mask, sc,
                             out_index=torch.arange(lo, hi))
        assert torch.equal(got[0], want.logits) and torch.equal(got[1], want.ups_logits)
        x2 = x.clone()
        x2[:, lo:hi] = torch.randint(0, 90, (R, hi - lo), generator=torch.Generator().manual_seed(1))
        # dual: the block alone, positions as a device tensor
        want = m(x2[:, lo:hi], attn, cache=ref_cache, start=lo)
        sc.pos = torch.arange(lo, hi)
        got = static_forward(m.model, m.ups_head, x2.index_select(1, sc.pos),
                             rope_tables(c.head_dim, c.rope_theta, lo, hi - lo, "cpu"), mask, sc)
        assert torch.equal(got[0], want.logits) and torch.equal(got[1], want.ups_logits)
        for layer in ref_cache.k:
            assert torch.equal(sc.k[layer], ref_cache.k[layer]) and torch.equal(sc.v[layer], ref_cache.v[layer])
        # prefix: the block and the suffix
        want = m(x2[:, lo:], attn, cache=ref_cache, start=lo, out_slice=slice(0, hi - lo))
        sc.pos = torch.arange(lo, T)
        got = static_forward(m.model, m.ups_head, x2[:, lo:], rope_tables(c.head_dim, c.rope_theta, lo, T - lo, "cpu"),
                             mask, sc, out_slice=slice(0, hi - lo))
        assert torch.equal(got[0], want.logits) and torch.equal(got[1], want.ups_logits)


# ------------------------------------------------------------------------------ static == eager
def static_equals_eager(model, cfg) -> None:
    want = generate(model, PROMPTS, cfg, IDS, _gens(3))
    got = generate(model, PROMPTS, dataclasses.replace(cfg, graphs=True), IDS, _gens(3))
    assert_same(got, want, cfg)


# mode: (config builder, its option grid, the (cache, cache_refresh) pairs, the strategies, fixed options)
MODES = {
    "steps": (_scfg, GRID, [("none", 0), ("prefix", 0), ("dual", 0), ("dual", 2), ("prefix", 1)], STRATEGIES, {}),
    "eos_gating": (_scfg, GRID, [("none", 0), ("dual", 0), ("prefix", 0)],
                   ["llada_low_confidence", "llada_random", "ups", "tps_prob", "random"], {"eos_gating": True}),
    "threshold": (_tcfg, TGRID, [("none", 0), ("dual", 0), ("prefix", 0), ("dual", 1)], STRATEGIES, {}),
}
CASES = [pytest.param(mode, strategy, g, cache, refresh, id=f"{mode}-{strategy}-{i}-{cache}{refresh}")
         for mode, (_, grid, caches, strategies, _) in MODES.items()
         for strategy in strategies for i, g in enumerate(grid) for cache, refresh in caches]


@pytest.mark.parametrize("mode,strategy,g,cache,refresh", CASES)
def test_static_equals_eager(model, mode, strategy, g, cache, refresh):
    build, _, _, _, options = MODES[mode]
    static_equals_eager(model, build(strategy, g, record_trajectory=True, cache=cache, cache_refresh=refresh,
                                     **options))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("kw", [dict(strategy="ups", steps=6),
                                dict(strategy="ups", threshold=0.6, remask_threshold=0.3),
                                dict(strategy="random", steps=6, temperature=0.8),
                                dict(strategy="llada_low_confidence", threshold=0.3)])
def test_static_equals_eager_stream_cfg(stream_model, cache, kw):
    cfg = SamplerConfig(gen_length=12, block_length=4, cfg_scale=1.5, eos_gating=True, record_trajectory=True,
                        cache=cache, **kw)
    want = generate(stream_model, PROMPTS, cfg, IDS, _gens(3))
    got = generate(stream_model, PROMPTS, dataclasses.replace(cfg, graphs=True), IDS, _gens(3))
    assert_same(got, want, cfg)


def test_static_batched_equals_solo(model):
    cfg = SamplerConfig(strategy="random", steps=8, gen_length=16, block_length=8, temperature=0.9, cache="dual",
                        eos_gating=True, graphs=True)
    batched = generate(model, PROMPTS, cfg, IDS, _gens(3, seed=4))
    for b, p in enumerate(PROMPTS):
        solo = generate(model, [p], cfg, IDS, [_gens(3, seed=4)[b]])[0]
        assert (solo.tokens, solo.nfe, solo.remasks_per_block) == \
               (batched[b].tokens, batched[b].nfe, batched[b].remasks_per_block)


# ----------------------------------------------------------------------------- decoder bookkeeping
def test_decoders_are_reused_bounded_and_follow_the_weights():
    m = _model()
    cfg = SamplerConfig(strategy="ups", steps=8, gen_length=16, block_length=8, cache="dual", graphs=True)
    first = generate(m, PROMPTS, cfg, IDS)
    assert graphs.decoders_of(m) == 1
    dec = next(iter(graphs._DECODERS[m].values()))
    again = generate(m, PROMPTS, dataclasses.replace(cfg, steps=4), IDS)  # steps do not change the graphs
    assert graphs.decoders_of(m) == 1 and next(iter(graphs._DECODERS[m].values())) is dec
    assert [x.tokens for x in generate(m, PROMPTS, cfg, IDS)] == [x.tokens for x in first]
    assert [x.nfe for x in again] == [4, 4, 4]
    for G in (8, 24, 32, 40):
        generate(m, PROMPTS, dataclasses.replace(cfg, gen_length=G, steps=G), IDS)
    assert graphs.decoders_of(m) == graphs.MAX_DECODERS
    before = graphs._DECODERS[m].copy()
    with torch.no_grad():  # new parameter tensors (not an in-place update): a new decoder
        m.model.transformer.ff_out.weight = torch.nn.Parameter(m.model.transformer.ff_out.weight * 0.5)
    halved = generate(m, PROMPTS, cfg, IDS)
    assert all(d is not next(reversed(graphs._DECODERS[m].values())) for d in before.values())
    assert [x.tokens for x in halved] == [x.tokens for x in generate(m, PROMPTS, dataclasses.replace(cfg, graphs=False),
                                                                      IDS)]
    graphs.release_decoders(m)
    assert graphs.decoders_of(m) == 0


def test_graphs_need_a_remedi_model(model):
    with pytest.raises(ValueError, match="--graphs needs a RemeDiLM"):
        generate(Spy(model), PROMPTS, SamplerConfig(strategy="ups", graphs=True), IDS)


# ------------------------------------------------------------------------------ host synchronisation


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("kw", [dict(strategy="ups"), dict(strategy="llada_low_confidence", cfg_scale=0.5),
                                dict(strategy="random", temperature=0.8, eos_gating=True),
                                dict(strategy="tps_prob", eos_gating=True, cache_refresh=3)])
def test_no_host_sync_inside_a_block(model, monkeypatch, cache, kw):
    """Static path, padded batch: zero host reads from a block's first step to its end; eos_gating reads
    one (B,) flag at the block's end. The eager decoder, under the same spy, syncs every step."""
    if kw.get("cache_refresh") and cache == "none":
        pytest.skip("cache_refresh needs a cache")
    cfg = SamplerConfig(steps=8, gen_length=16, block_length=8, cache=cache, **kw)
    want = generate(model, PROMPTS, cfg, IDS, _gens(3))
    generate(model, PROMPTS, dataclasses.replace(cfg, graphs=True), IDS, _gens(3))  # decoder built outside the spy
    spy = SyncSpy(monkeypatch)
    static_events = _watch(monkeypatch, StaticDecoder, spy)
    eager_events = _watch(monkeypatch, EagerDecoder, spy)
    got = generate(model, PROMPTS, dataclasses.replace(cfg, graphs=True), IDS, _gens(3))
    assert [x.tokens for x in got] == [x.tokens for x in want]
    blocks = _per_block(static_events)
    assert blocks and all(inside == 0 for inside, *_ in blocks.values()), (blocks, spy.names)
    assert all(at_end == (1 if cfg.eos_gating else 0) for _, at_end, *_ in blocks.values()), blocks
    generate(model, PROMPTS, cfg, IDS, _gens(3))
    eager = _per_block(eager_events)
    assert all(inside >= steps for inside, _, steps, _ in eager.values()), eager  # the spy does see syncs


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_threshold_reads_the_host_once_per_step(model, monkeypatch, cache):
    cfg = SamplerConfig(strategy="ups", gen_length=16, block_length=8, threshold=0.4, remask_threshold=0.2,
                        cache=cache, graphs=True)
    generate(model, PROMPTS, cfg, IDS, _gens(3))
    spy = SyncSpy(monkeypatch)
    events = _watch(monkeypatch, StaticDecoder, spy)
    generate(model, PROMPTS, cfg, IDS, _gens(3))
    for inside, at_end, steps, polls in _per_block(events).values():
        assert polls == steps and inside == steps and at_end == 0
    steps_only = [(ev, c) for ev, _, c in events if ev in ("step", "step done")]
    assert all(a[1] == b[1] for a, b in zip(steps_only[::2], steps_only[1::2]))  # nothing inside a step


# ------------------------------------------------------------------------- capture semantics on CPU
class TracedGraph:
    """A CUDA graph's contract on CPU: the step traced once by make_fx on the real tensors (so every Python
    value -- ints, floats, branches, slices -- is frozen as it was at capture, and the buffers are used by
    identity), each replay re-runs the trace and writes into the outputs returned at capture."""

    def __init__(self, gm, out):
        self.gm, self.out = gm, out
        self.replays = 0

    def replay(self):
        for a, b in zip(self.out, self.gm()):
            a.copy_(b)
        self.replays += 1


@pytest.fixture
def traced_graphs(monkeypatch):
    from torch.fx.experimental.proxy_tensor import make_fx

    from remedi.decoding.sampler import StepOut

    def capture(self, key, fn):
        state = [self.x, self.blk_remasks, self.run]
        saved = [t.clone() for t in state]
        gm = make_fx(lambda: (lambda o: (o.masked, o.new, o.remasked, o.score))(fn()))()  # runs the step once
        out = [torch.empty_like(t) for t in gm()]  # and once more, for the outputs
        for t, v in zip(state, saved):  # a capture does not run the step: undo both
            t.copy_(v)
        return TracedGraph(gm, out), StepOut(*out)

    graphs.release_decoders()  # uncaptured decoders of earlier tests
    monkeypatch.setattr(graphs, "can_capture", lambda device: True)
    monkeypatch.setattr(StaticDecoder, "_capture", capture)
    yield
    graphs.release_decoders()


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("kw", [
    dict(strategy="ups", steps=8),
    dict(strategy="llada_low_confidence", steps=8, cfg_scale=1.0, confidence_eos_eot_inf=True),
    dict(strategy="random", steps=8, temperature=0.8, eos_gating=True),
    dict(strategy="tps_prob", steps=12, temperature=0.7, logits_eos_inf=True, cache_refresh=3),
    dict(strategy="margin", threshold=0.3, remask_threshold=0.2, eos_gating=True),
    dict(strategy="llada_random", threshold=0.5, temperature=0.9),
])
@pytest.mark.slow
def test_captured_step_semantics_equal_eager(model, traced_graphs, cache, kw):
    """The static step replayed as a frozen trace (what a CUDA graph does) equals the eager decoder, in two
    generate calls reusing the same captures (different prompts of the same shape the second time)."""
    if kw.get("cache_refresh") and cache == "none":
        pytest.skip("cache_refresh needs a cache")
    cfg = SamplerConfig(gen_length=16, block_length=8, record_trajectory=True, cache=cache, **kw)
    for prompts in (PROMPTS, [p[::-1] for p in PROMPTS]):
        want = generate(model, prompts, cfg, IDS, _gens(3))
        got = generate(model, prompts, dataclasses.replace(cfg, graphs=True), IDS, _gens(3))
        assert_same(got, want, cfg)
    dec = next(reversed(graphs._DECODERS[model].values()))  # the one just used
    assert dec.capture
    n_blocks = cfg.gen_length // cfg.block_length
    want_keys = {"full"} | ({"dual"} if cache == "dual" else set()) | \
        ({("prefix", dec.P + b * cfg.block_length) for b in range(n_blocks)} if cache == "prefix" else set())
    assert set(dec.graphs) == want_keys and all(g.replays > 0 for g, _ in dec.graphs.values())


# ------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("kw", [dict(strategy="ups", cache="dual"), dict(strategy="ups", cache="prefix", cfg_scale=1.0),
                                dict(strategy="llada_low_confidence", cache="none"),
                                dict(strategy="random", temperature=0.8, cache="dual", eos_gating=True),
                                dict(strategy="tps_prob", threshold=0.3, remask_threshold=0.2, cache="dual")])
def test_cuda_graphs_equal_the_uncaptured_step(kw):
    m = _model().cuda()
    cfg = SamplerConfig(steps=8, gen_length=16, block_length=8, graphs=True, graph_capture=False, **kw)
    gens = lambda: [torch.Generator(device="cuda").manual_seed(i) for i in range(3)]  # noqa: E731
    want = generate(m, PROMPTS, cfg, IDS, gens())
    got = generate(m, PROMPTS, dataclasses.replace(cfg, graph_capture=True), IDS, gens())
    assert _records(got) == _records(want)
    assert any(d.graphs for d in graphs._DECODERS[m].values())
    eager = generate(m, PROMPTS, dataclasses.replace(cfg, graphs=False), IDS, gens())
    assert [x.tokens for x in got] == [x.tokens for x in eager]


@cuda
def test_cuda_replayed_blocks_never_synchronise(monkeypatch):
    m = _model().cuda()
    cfg = SamplerConfig(strategy="ups", steps=8, gen_length=16, block_length=8, cache="dual", graphs=True)
    gens = lambda: [torch.Generator(device="cuda").manual_seed(i) for i in range(3)]  # noqa: E731
    generate(m, PROMPTS, cfg, IDS, gens())  # captures
    orig_begin, orig_end = StaticDecoder.begin_block, StaticDecoder.end_block

    def begin(self, *a):
        orig_begin(self, *a)
        torch.cuda.set_sync_debug_mode("error")

    def end(self, *a):
        torch.cuda.set_sync_debug_mode("default")
        return orig_end(self, *a)
    monkeypatch.setattr(StaticDecoder, "begin_block", begin)
    monkeypatch.setattr(StaticDecoder, "end_block", end)
    try:
        generate(m, PROMPTS, cfg, IDS, gens())
    finally:
        torch.cuda.set_sync_debug_mode("default")
