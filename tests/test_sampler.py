"""Sampler: LLaDA mode vs an independent re-implementation, fast vs slow reference, invariants, remasking."""
from __future__ import annotations

import random

import pytest
import torch

from remedi.model.checkpoint import add_stream
from remedi.model.config import get_config
from remedi.model.loading import SpecialIds
from remedi.model.llada import ModelOutput, RemeDiLM, UPSHead, init_weights
from remedi.decoding.sampler import (LLADA_STRATEGIES, REMASK_STRATEGIES, STRATEGIES, SamplerConfig, generate, select_top_k,
                            transfer_counts, unmask_schedule)
from remedi.decoding.reference import generate_ref

from .llada_generate_ref import llada_generate
from tests.helpers.sampler import CFG, IDS, PROMPTS, GRID, _model, _stream_model, _gens, _scfg, Spy, FakeModel  # noqa: F401



pytestmark = pytest.mark.usefixtures("one_thread")










def _full(gen, G):
    """Generation tokens padded back to gen_length with EOS (the cut-off tail)."""
    return gen.tokens + [IDS.eos] * (G - len(gen.tokens))


# --------------------------------------------------------------------------------- schedule / ranking
def test_schedules():
    assert transfer_counts(torch.tensor([8, 5, 2]), 3).tolist() == [[3, 3, 2], [2, 2, 1], [1, 1, 0]]
    assert unmask_schedule(8, 3) == [3, 6, 8]
    assert unmask_schedule(4, 6) == [1, 2, 3, 4, 4, 4]
    assert unmask_schedule(32, 32) == list(range(1, 33))


def test_select_top_k_matches_python_sort():
    rng = random.Random(0)
    for _ in range(200):
        B, L = rng.randint(1, 4), rng.randint(1, 9)
        vals = [[rng.choice([0.1, 0.5, 0.9, float("-inf"), rng.random()]) for _ in range(L)] for _ in range(B)]
        elig = [[rng.random() < 0.7 for _ in range(L)] for _ in range(B)]
        k = [rng.randint(0, sum(e)) for e in elig]
        got = select_top_k(torch.tensor(vals, dtype=torch.float64), torch.tensor(elig), torch.tensor(k)).tolist()
        for b in range(B):
            want = set(sorted((i for i in range(L) if elig[b][i]), key=lambda i: (-vals[b][i], i))[:k[b]])
            assert {i for i in range(L) if got[b][i]} == want


# ------------------------------------------------------------------------------- LLaDA exactness
@pytest.mark.parametrize("g", GRID)
@pytest.mark.parametrize("strategy", LLADA_STRATEGIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_llada_modes_match_reference_reimplementation(model, g, strategy, batch):
    prompts = PROMPTS[:batch] if batch == 3 else PROMPTS[2:]
    G, Lb, S, T, c, lei, ceei = g
    want = llada_generate(model, prompts, _gens(batch), S, G, Lb, temperature=T, cfg_scale=c,
                          remasking=strategy.removeprefix("llada_"), mask_id=IDS.mask, eos_id=IDS.eos,
                          eot_id=IDS.eot, pad_id=IDS.pad, logits_eos_inf=lei, confidence_eos_eot_inf=ceei)
    got = generate(model, prompts, _scfg(strategy, g), IDS, _gens(batch))
    assert [_full(x, G) for x in got] == [_cut_pad(r, G) for r in want.tolist()]
    assert all(x.remasks == 0 for x in got)


def _cut_pad(row, G):
    row = row[:row.index(IDS.eos)] if IDS.eos in row else row
    return row + [IDS.eos] * (G - len(row))


# ------------------------------------------------------------------------------- fast == reference
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("g", GRID)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_matches_slow_reference(model, g, strategy, graphs):
    cfg = _scfg(strategy, g, record_trajectory=True, eos_gating=g[2] == 8, graphs=graphs)
    fast = generate(model, PROMPTS, cfg, IDS, _gens(3))
    slow = generate_ref(model, PROMPTS, cfg, IDS, _gens(3))
    for f, s in zip(fast, slow):
        assert (f.tokens, f.nfe, f.remasks, f.remasks_per_block) == (s.tokens, s.nfe, s.remasks, s.remasks_per_block)
        assert len(f.trajectory) == len(s.trajectory)
        for a, b in zip(f.trajectory, s.trajectory):
            assert {k: a[k] for k in ("step", "block", "span", "unmasked", "remasked", "tokens")} == \
                   {k: b[k] for k in ("step", "block", "span", "unmasked", "remasked", "tokens")}
            assert a["conf"].keys() == b["conf"].keys()
            for p in a["conf"]:
                assert a["conf"][p] == pytest.approx(b["conf"][p], rel=1e-4, abs=1e-5)


def test_remask_strategies_do_remask_somewhere(model):
    total = {s: 0 for s in REMASK_STRATEGIES}
    for g in GRID:
        for s in REMASK_STRATEGIES:
            total[s] += sum(x.remasks for x in generate(model, PROMPTS, _scfg(s, g), IDS, _gens(3)))
    assert all(v > 0 for v in total.values()), total


def test_stream_ups_with_cfg_matches_reference():
    m = _stream_model()
    cfg = _scfg("ups", GRID[2])
    assert [x.tokens for x in generate(m, PROMPTS, cfg, IDS, _gens(3))] == \
           [x.tokens for x in generate_ref(m, PROMPTS, cfg, IDS, _gens(3))]




@pytest.mark.parametrize("g", GRID)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invariants(model, g, strategy):
    G, Lb, S, T, c, *_ = g
    spy = Spy(model)
    cfg = _scfg(strategy, g, record_trajectory=True)
    out = generate(spy, PROMPTS, cfg, IDS, _gens(3))
    P = max(map(len, PROMPTS))
    # NFE: one batched forward per step, 2B rows (one pass of 2 NFE per row) with CFG
    assert len(spy.calls) == S
    assert all(x.nfe == S * (2 if c > 0 else 1) for x in out)
    for ids_, am in spy.calls:
        assert ids_.shape[0] == 3 * (2 if c > 0 else 1)
        for b, p in enumerate(PROMPTS):  # the prompt is never touched; the unconditional copy has it masked
            assert ids_[b, P - len(p):P].tolist() == p
            assert (ids_[b, :P - len(p)] == IDS.pad).all() and am[b, :P - len(p)].sum() == 0
            if c > 0:
                assert (ids_[3 + b, :P] == IDS.mask).all()
    s = cfg.steps_per_block
    K = unmask_schedule(Lb, s)
    for x in out:
        traj = x.trajectory
        assert len(traj) == S and traj[-1]["tokens"].count(None) == 0  # no mask left
        assert IDS.mask not in x.tokens and len(x.tokens) <= G
        for n, st in enumerate(traj):
            lo, hi = st["block"] * Lb, (st["block"] + 1) * Lb
            assert st["span"] == [lo, hi]
            toks = st["tokens"]
            assert sum(t is not None for t in toks[lo:hi]) == K[n % s]  # K_n schedule (also for LLaDA)
            assert all(t is None for t in toks[hi:])  # later blocks untouched
            assert toks[:lo] == traj[-1]["tokens"][:lo]  # earlier blocks frozen
            assert all(lo <= p < hi for p in st["unmasked"] + st["remasked"])
            if strategy in LLADA_STRATEGIES:
                assert st["remasked"] == []
        assert x.remasks == sum(len(st["remasked"]) for st in traj) == sum(x.remasks_per_block)


@pytest.mark.parametrize("g", GRID)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batched_equals_solo(model, g, strategy):
    cfg = _scfg(strategy, g, eos_gating=True)
    batched = generate(model, PROMPTS, cfg, IDS, _gens(3, seed=5))
    for b, p in enumerate(PROMPTS):
        solo = generate(model, [p], cfg, IDS, [_gens(3, seed=5)[b]])[0]
        assert (solo.tokens, solo.nfe, solo.remasks_per_block) == \
               (batched[b].tokens, batched[b].nfe, batched[b].remasks_per_block)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in ("llada_random", "random")])
def test_temperature_zero_ignores_the_seed(model, strategy):
    cfg = _scfg(strategy, GRID[2])
    a = generate(model, PROMPTS, cfg, IDS, _gens(3, seed=1))
    b = generate(model, PROMPTS, cfg, IDS, _gens(3, seed=2))
    assert [x.tokens for x in a] == [x.tokens for x in b]


def test_seed_matters_when_sampling(model):
    cfg = _scfg("random", GRID[1])
    a = generate(model, PROMPTS, cfg, IDS, _gens(3, seed=1))
    b = generate(model, PROMPTS, cfg, IDS, _gens(3, seed=2))
    assert [x.tokens for x in a] != [x.tokens for x in b]


def test_eos_options(model):
    g = (16, 8, 8, 0.0, 0.0, False, False)
    plain = generate(model, PROMPTS, _scfg("tps_prob", g, eos_gating=True), IDS)
    assert any(len(x.tokens) < 16 for x in plain), "fixture should predict EOS somewhere"
    stopped = [x for x in plain if len(x.tokens) < 8]  # EOS in the first block: the second never runs
    assert stopped and all(x.nfe == 4 and len(x.remasks_per_block) == 1 for x in stopped)
    assert all(x.nfe == 8 for x in plain if len(x.tokens) >= 8)
    no_eos = generate(model, PROMPTS, _scfg("llada_low_confidence", g[:5] + (True, False)), IDS)
    assert all(len(x.tokens) == 16 and IDS.eos not in x.tokens for x in no_eos)
    # confidence_eos_eot_inf: EOS/EOT are committed last within their block
    traj = generate(model, PROMPTS, _scfg("tps_prob", g[:5] + (False, True), record_trajectory=True), IDS)
    for x in traj:
        for st in x.trajectory:
            stop_cands = [p for p in st["unmasked"] if st["tokens"][p] in (IDS.eos, IDS.eot)]
            if stop_cands:
                finite = [p for p, v in st["conf"].items() if v != float("-inf") and p not in st["unmasked"]]
                still_masked_finite = [p for p in finite if st["tokens"][p] is None]
                assert not still_masked_finite




@pytest.mark.parametrize("strategy", ["ups", "tps_prob"])
def test_remask_strategy_corrects_a_wrong_token(strategy):
    m = FakeModel(P=2)
    ids = SpecialIds(mask=7, eos=6, pad=6)
    cfg = SamplerConfig(strategy=strategy, steps=4, gen_length=4, block_length=4, record_trajectory=True)
    out = generate(m, [[1, 2]], cfg, ids)[0]
    assert out.trajectory[0]["tokens"][0] == FakeModel.W
    assert out.trajectory[1]["remasked"] == [0]
    assert out.tokens == FakeModel.RIGHT and out.remasks == 1
    assert generate_ref(m, [[1, 2]], cfg, ids)[0].tokens == FakeModel.RIGHT
    llada = generate(m, [[1, 2]], SamplerConfig(strategy="llada_low_confidence", steps=4, gen_length=4,
                                                block_length=4), ids)[0]
    assert llada.tokens[0] == FakeModel.W and llada.remasks == 0


# --------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, flag", [
    (dict(gen_length=10, block_length=4), "--block_length"),
    (dict(gen_length=16, block_length=4, steps=6), "--steps"),
    (dict(steps=0), "--steps"),
    (dict(temperature=-1.0), "--temperature"),
    (dict(cfg_scale=-0.5), "--cfg_scale"),
    (dict(strategy="confidence"), "unknown strategy"),
    (dict(cache="paged"), "--cache"),
    (dict(cache_refresh=1), "--cache_refresh 1 needs --cache"),
    (dict(cache="dual", cache_refresh=-1), "--cache_refresh"),
    (dict(threshold=0.0), "--threshold"),
    (dict(threshold=1.5), "--threshold"),
    (dict(remask_threshold=0.1), "also pass --threshold"),
    (dict(strategy="ups", threshold=0.5, remask_threshold=0.6), "--remask_threshold"),
])
def test_validate_rejects(kw, flag):
    with pytest.raises(ValueError, match=flag):
        SamplerConfig(**kw).validate()


def test_validate_context_checks(model):
    with pytest.raises(ValueError, match="--ups_head"):
        SamplerConfig(strategy="ups").validate(has_ups=False)
    with pytest.raises(ValueError, match="max_sequence_length 256"):
        SamplerConfig(gen_length=64, block_length=32).validate(model_max_len=256, prompt_len=200)
    with pytest.raises(ValueError, match="max_sequence_length"):
        generate(model, [[1] * 250], SamplerConfig(), IDS)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 2], []], SamplerConfig(), IDS)
    plain = RemeDiLM(CFG)
    with pytest.raises(ValueError, match="needs a UPS"):
        generate(plain, [[1, 2]], SamplerConfig(strategy="ups"), IDS)
