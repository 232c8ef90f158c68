"""Fast decoding: block KV cache (prefix / dual), parallel threshold decoding, --compile.

* The cache's bookkeeping is exact: a partial forward through a cache filled from the same sequence gives
  the full forward's logits (float tolerance).
* Refreshing the cache every step equals the uncached sampler token for token over the strategy grid (CFG,
  stream UPS, eos_gating, padded batches, threshold mode).
* The approximate modes (refresh only at block starts) agree with the uncached sampler above a stated level.
* Threshold decoding equals a slow per-row reference, commits at least one token per step (net), and
  finishes every block within block_length steps.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from remedi.model.loading import SpecialIds
from remedi.model.llada import KVCache
from remedi.decoding.sampler import (LLADA_STRATEGIES, RANDOM_STRATEGIES, REMASK_STRATEGIES, STRATEGIES, SamplerConfig,
                            compile_model, generate, layout_batch)
from remedi.decoding.reference import _row_logits, score_one

from tests.helpers.sampler import GRID, IDS, PROMPTS, FakeModel, Spy, _gens, _model, _scfg
from tests.helpers.sampler import TGRID, _tcfg  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a, b, conf_ulps: bool = False):
    """Two lists of Generation records are identical (tokens, NFE, remasks, trajectories).

    conf_ulps: trajectory confidences need only agree to 1e-12 (the static decoder with eos_gating keeps
    finished rows in its batch where the eager one drops them, so scores may move by an ulp)."""
    assert [(x.tokens, x.nfe, x.remasks_per_block) for x in a] == [(x.tokens, x.nfe, x.remasks_per_block) for x in b]
    for x, y in zip(a, b):
        assert (x.trajectory is None) == (y.trajectory is None)
        if x.trajectory is None:
            continue
        if not conf_ulps:
            assert x.trajectory == y.trajectory
            continue
        assert [{k: v for k, v in s.items() if k != "conf"} for s in x.trajectory] == \
               [{k: v for k, v in s.items() if k != "conf"} for s in y.trajectory]
        for s, t in zip(x.trajectory, y.trajectory):
            assert s["conf"] == pytest.approx(t["conf"], rel=1e-12, abs=1e-15)


def agreement(a, b, G: int) -> float:
    """Fraction of identical generated tokens (the cut-off tails count as EOS)."""
    same = sum(sum(u == v for u, v in zip(x.tokens + [IDS.eos] * (G - len(x.tokens)),
                                          y.tokens + [IDS.eos] * (G - len(y.tokens)))) for x, y in zip(a, b))
    return same / (G * len(a))


# ------------------------------------------------------------------------------------ cache mechanics
@pytest.mark.parametrize("arch", ["head", "stream"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_partial_forward_through_cache_matches_full(model, stream_model, arch, mode):
    """Same sequence, cache filled by a full forward: the block's logits / UPS logits are the full ones."""
    m = model if arch == "head" else stream_model
    x, attn, P = layout_batch(PROMPTS, 16, IDS, "cpu")
    x[:, P + 3:P + 9] = torch.randint(0, 90, (3, 6), generator=torch.Generator().manual_seed(0))
    x, attn = torch.cat([x, x]), torch.cat([attn, attn])  # as with CFG: 2B rows in one cache
    x[3:, :P] = IDS.mask
    lo, hi = P + 8, P + 16
    with torch.inference_mode():
        cache = KVCache()
        full = m(x, attn, cache=cache, out_slice=slice(lo, hi))
        part = m(x[:, lo:], attn, cache=cache, start=lo, out_slice=slice(0, hi - lo)) if mode == "prefix" else \
            m(x[:, lo:hi], attn, cache=cache, start=lo)
    torch.testing.assert_close(part.logits, full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.ups_logits, full.ups_logits, rtol=1e-5, atol=1e-5)


class KwSpy(Spy):
    """Records (input shape, start, out_slice, whether a cache was passed) of every forward."""

    def record(self, input_ids, attention_mask, kw):
        return tuple(input_ids.shape), kw.get("start", 0), kw.get("out_slice"), "cache" in kw


@pytest.mark.parametrize("mode,refresh", [("none", 0), ("prefix", 0), ("prefix", 2), ("dual", 0), ("dual", 2)])
def test_what_each_cache_mode_computes(model, mode, refresh):
    spy = KwSpy(model)
    G, Lb, S = 16, 8, 8
    cfg = SamplerConfig(strategy="ups", steps=S, gen_length=G, block_length=Lb, cache=mode, cache_refresh=refresh,
                        cfg_scale=1.0)
    generate(spy, PROMPTS, cfg, IDS, _gens(3))
    P = max(map(len, PROMPTS))
    T = P + G
    assert len(spy.calls) == S
    for i, (shape, start, out_slice, cached) in enumerate(spy.calls):
        blk, n = divmod(i, S // 2)
        lo = P + blk * Lb
        assert shape[0] == 6 and cached == (mode != "none")  # CFG: 2B rows, one cache
        if mode == "none" or n == 0 or (refresh and n % refresh == 0):
            assert (shape[1], start, out_slice) == (T, 0, slice(lo, lo + Lb))
        elif mode == "prefix":
            assert (shape[1], start, out_slice) == (T - lo, lo, slice(0, Lb))
        else:
            assert (shape[1], start, out_slice) == (Lb, lo, None)


# ------------------------------------------------------------------------ refresh every step == exact
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("g", GRID)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_refresh_every_step_equals_uncached(model, mode, g, strategy, graphs):
    """Against the uncached eager sampler (the reference), with the eager and the static (--graphs) decoder."""
    cfg = _scfg(strategy, g, record_trajectory=True, eos_gating=g[2] == 8)
    want = generate(model, PROMPTS, cfg, IDS, _gens(3))
    got = generate(model, PROMPTS, dataclasses.replace(cfg, cache=mode, cache_refresh=1, graphs=graphs), IDS, _gens(3))
    _same(got, want, conf_ulps=graphs and cfg.eos_gating)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("kw", [dict(strategy="ups"), dict(strategy="ups", threshold=0.6, remask_threshold=0.3),
                                dict(strategy="llada_low_confidence", threshold=0.3)])
def test_refresh_every_step_equals_uncached_stream_cfg(stream_model, mode, kw, graphs):
    cfg = SamplerConfig(steps=6, gen_length=12, block_length=4, cfg_scale=1.5, eos_gating=True,
                        record_trajectory=True, **kw)
    want = generate(stream_model, PROMPTS, cfg, IDS, _gens(3))
    got = generate(stream_model, PROMPTS, dataclasses.replace(cfg, cache=mode, cache_refresh=1, graphs=graphs), IDS,
                   _gens(3))
    _same(got, want, conf_ulps=graphs)


# ---------------------------------------------------------------------------- approximate agreement
# Random weights (std 0.2) give flat, chaotic distributions: the first flipped near-tie changes the rest of
# the block, so whole generations agree only partly. Measured on these 12 prompts (gen 32, block 8, 32
# steps): prefix 0.58-0.73, dual 0.54-0.59 over the three sources; a *different* random model with the
# same EOS boost agrees on 0.25-0.34 (mostly the EOS tails; 0.01 without the boost), and a dual cache
# whose partial forwards are written 3 positions too early on 0.43-0.47. Asserted: 0.5. On random weights
# this is a coarse regression pin; the cache's bookkeeping is checked exactly by
# test_partial_forward_through_cache_matches_full, and the meaningful level is the embedded model's below.
RANDOM_MODEL_AGREEMENT = 0.5


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("strategy", ["llada_low_confidence", "tps_prob", "ups"])
def test_cached_modes_agree_with_uncached_random_model(model, mode, strategy):
    prompts = [[(7 * i + 3 * j) % 90 + 1 for j in range(5 + i % 7)] for i in range(12)]
    cfg = SamplerConfig(strategy=strategy, steps=32, gen_length=32, block_length=8)
    base = generate(model, prompts, cfg, IDS, _gens(12))
    got = generate(model, prompts, dataclasses.replace(cfg, cache=mode), IDS, _gens(12))
    a = agreement(base, got, 32)
    assert a >= RANDOM_MODEL_AGREEMENT, a
    assert all(x.nfe == 32 for x in got)


def _embedded():
    from remedi.evaluation import data as D
    from remedi.session import default_ups_head
    from remedi.model.loading import EMBEDDED_MODEL, load_for_inference
    from remedi.decoding.args import SamplingArgs

    if not (EMBEDDED_MODEL / "config.json").is_file() or not (D.ARITH_DATA_DIR / "test.jsonl").is_file():
        pytest.skip(f"the embedded model {EMBEDDED_MODEL} (with its arith data) is not built")
    ups = default_ups_head(str(EMBEDDED_MODEL))
    loaded = load_for_inference(str(EMBEDDED_MODEL), ups, None, device="cpu", dtype="float32")
    s = SamplingArgs().resolve(EMBEDDED_MODEL)
    items = D.load_items(D.resolve_dataset("arith", split="test"))[:16]
    prompts = [D.encode(loaded.tokenizer, D.build_prompt(it.question, "gsm8k", D.ARITH), D.ARITH)[0]
               for it in items]
    return loaded, s, prompts


# Position-wise token agreement with the exact sampler on the embedded model, 16 test items, gen 96 /
# block 32 / 48 steps, measured 2026-11-26: prefix 0.83 / 0.87 / 0.78 and dual 0.72 / 0.79 / 0.70 for
# llada_low_confidence / tps_prob / ups. The measure is harsh (one inserted token shifts every later
# position); accuracy barely moves (BENCHMARKS.md). Asserted with margin: 0.65.
EMBEDDED_MODEL_AGREEMENT = 0.65


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_modes_agree_with_uncached_embedded_model(mode):
    loaded, s, prompts = _embedded()
    srcs = ["llada_low_confidence"] + (["ups"] if loaded.model.ups_arch else [])
    for src in srcs:
        cfg = dataclasses.replace(s.to_sampler_config(src), cache="none")  # the exact baseline, whatever defaults.json says
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(prompts))]  # noqa: E731
        base = generate(loaded.model, prompts, cfg, loaded.ids, gens())
        got = generate(loaded.model, prompts, dataclasses.replace(cfg, cache=mode), loaded.ids, gens())
        G = cfg.gen_length
        same = sum(sum(u == v for u, v in zip(x.tokens + [-1] * (G - len(x.tokens)),
                                              y.tokens + [-1] * (G - len(y.tokens)))) for x, y in zip(base, got))
        assert same / (G * len(prompts)) >= EMBEDDED_MODEL_AGREEMENT, (src, same / (G * len(prompts)))


# --------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True])
def test_compile_flag_traces_few_graphs_and_changes_nothing(graphs):
    """--compile with the eager backend (dynamo's tracing and guards without code generation, fast on
    CPU): results equal the uncompiled sampler's and the cached modes stay under dynamo's recompile
    limit (a traced KVCache.update would recompile for every layer and every block start); with
    --graphs too, the static step through compiled blocks gives the same tokens."""
    import torch._dynamo

    plain = _model()
    comp = _model()
    compile_model(comp, backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for mode in ("none", "prefix", "dual"):
        cfg = SamplerConfig(strategy="ups", steps=8, gen_length=32, block_length=8, cache=mode, cfg_scale=0.5)
        want = generate(plain, PROMPTS, cfg, IDS, _gens(3))
        got = generate(comp, PROMPTS, dataclasses.replace(cfg, compile=True, graphs=graphs), IDS, _gens(3))
        assert [x.tokens for x in got] == [x.tokens for x in want]
    stats = torch._dynamo.utils.counters["stats"]
    assert 0 < stats["unique_graphs"] <= (12 if not graphs else 1000), dict(stats)
    assert not torch._dynamo.utils.counters["frames"].get("recompile_limit_hit"), dict(torch._dynamo.utils.counters)


# ------------------------------------------------------------------------------------- threshold mode
def _ref_scores(cfg, logits, ups, seq, block, mask_id, rand_conf, cand):
    """{position: score} as remedi.decoding.reference ranks them (python, float64)."""
    stops = (IDS.eos, IDS.eot)
    score = {}
    for j, i in enumerate(block):
        was_masked = seq[i] == mask_id
        if cfg.strategy not in REMASK_STRATEGIES and not was_masked:
            continue
        token = cand[i] if was_masked else seq[i]
        row = logits[i].clone()
        row[mask_id] = -math.inf
        if cfg.logits_eos_inf:
            row[IDS.eos] = -math.inf
        sc = score_one(cfg.strategy, row, token, None if ups is None else ups[i],
                       rand_conf[j] if rand_conf is not None else None)
        if cfg.confidence_eos_eot_inf and was_masked and cand[i] in stops:
            sc = -math.inf
        score[i] = sc
    return score


@torch.inference_mode()
def threshold_ref(model, prompt, cfg: SamplerConfig, g: torch.Generator):
    """Slow per-row threshold decoding: (tokens, nfe, remasks_per_block, per-step (unmasked, remasked))."""
    P, Lb, mask = len(prompt), cfg.block_length, IDS.mask
    seq = list(prompt) + [mask] * cfg.gen_length
    nfe, per_block, steps = 0, [], []
    for blk in range(cfg.num_blocks):
        block = range(P + blk * Lb, P + (blk + 1) * Lb)
        n_rem = 0
        while any(seq[i] == mask for i in block):
            logits, ups = _row_logits(model, seq, P, cfg, IDS)
            nfe += 2 if cfg.cfg_scale > 0 else 1
            gumbel = torch.rand((Lb, logits.shape[-1]), generator=g, dtype=torch.float64) if cfg.temperature else None
            rand_conf = torch.rand((Lb,), generator=g, dtype=torch.float64).tolist() \
                if cfg.strategy in RANDOM_STRATEGIES else None
            cand = {}
            for j, i in enumerate(block):
                row = logits[i].clone()
                row[mask] = -math.inf
                if cfg.logits_eos_inf:
                    row[IDS.eos] = -math.inf
                cand[i] = int((row.double().exp() / (-torch.log(gumbel[j])) ** cfg.temperature).argmax()) \
                    if cfg.temperature else int(row.argmax())
            score = _ref_scores(cfg, logits, ups, seq, block, mask, rand_conf, cand)
            conf = {i: (math.exp(v) if cfg.strategy == "entropy" else v) for i, v in score.items()}
            masked = [i for i in block if seq[i] == mask]
            best = min(masked, key=lambda i: (-score[i], i))
            unmask = {i for i in masked if conf[i] >= cfg.threshold} | {best}
            remask = []
            if cfg.remask_threshold is not None and cfg.strategy in REMASK_STRATEGIES:
                low = sorted((i for i in block if seq[i] != mask and conf[i] < cfg.remask_threshold),
                             key=lambda i: (score[i], i))
                remask = low[:len(unmask) - 1]
            for i in unmask:
                seq[i] = cand[i]
            for i in remask:
                seq[i] = mask
            n_rem += len(remask)
            steps.append((sorted(i - P for i in unmask), sorted(i - P for i in remask)))
        per_block.append(n_rem)
        if cfg.eos_gating and any(seq[i] == IDS.eos for i in block):
            break
    gen = seq[P:]
    return (gen[:gen.index(IDS.eos)] if IDS.eos in gen else gen), nfe, per_block, steps






@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("t", TGRID)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threshold_matches_slow_reference(model, strategy, t, graphs):
    cfg = _tcfg(strategy, t, record_trajectory=True, graphs=graphs)
    fast = generate(model, PROMPTS, cfg, IDS, _gens(3))
    for f, p, g in zip(fast, PROMPTS, _gens(3)):
        tokens, nfe, per_block, steps = threshold_ref(model, p, cfg, g)
        assert (f.tokens, f.nfe, f.remasks_per_block) == (tokens, nfe, per_block)
        assert [(st["unmasked"], st["remasked"]) for st in f.trajectory] == steps


@pytest.mark.parametrize("t", TGRID)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threshold_progress_and_bounds(model, strategy, t):
    """Every step leaves at least one mask fewer in its block (>= 1 commit, remasks <= commits - 1), so a
    block takes at most block_length steps and the generation at most gen_length; NFE counts the steps."""
    cfg = _tcfg(strategy, t, record_trajectory=True)
    G, Lb = cfg.gen_length, cfg.block_length
    for x in generate(model, PROMPTS, cfg, IDS, _gens(3)):
        traj = x.trajectory
        assert len(traj) <= G and x.nfe == len(traj) * (2 if cfg.cfg_scale > 0 else 1)
        assert [st["step"] for st in traj] == list(range(len(traj)))
        per_block = {}
        for st in traj:
            per_block[st["block"]] = per_block.get(st["block"], 0) + 1
            assert len(st["unmasked"]) >= 1 and len(st["remasked"]) <= len(st["unmasked"]) - 1
            if strategy in LLADA_STRATEGIES or cfg.remask_threshold is None:
                assert st["remasked"] == []
            lo, hi = st["span"]
            assert all(lo <= p < hi for p in st["unmasked"] + st["remasked"])
            thr_conf = {p: (math.exp(v) if strategy == "entropy" else v) for p, v in st["conf"].items()}
            masked_before = [p for p in range(lo, hi) if st["tokens"][p] is None or p in st["unmasked"]]
            masked_before = [p for p in masked_before if p not in st["remasked"]]
            for p in masked_before:  # everything over the threshold was committed
                if thr_conf[p] >= cfg.threshold:
                    assert p in st["unmasked"]
        assert all(v <= Lb for v in per_block.values())
        done = traj[-1]["span"][1]  # eos_gating: later blocks are never computed
        assert traj[-1]["tokens"][:len(x.tokens)] == x.tokens and None not in traj[-1]["tokens"][:done]
        assert x.remasks == sum(len(st["remasked"]) for st in traj)


def test_threshold_one_is_one_token_per_step(model):
    """threshold 1.0 commits only the best position per step: LLaDA's schedule with steps = gen_length."""
    g = (16, 8, 16, 0.0, 0.0, False, False)
    want = generate(model, PROMPTS, _scfg("llada_low_confidence", g), IDS)
    got = generate(model, PROMPTS, _scfg("llada_low_confidence", g, threshold=1.0), IDS)
    assert [(x.tokens, x.nfe) for x in got] == [(x.tokens, x.nfe) for x in want]


@pytest.mark.parametrize("strategy", ["llada_low_confidence", "tps_prob", "margin", "entropy", "ups", "random"])
def test_tiny_threshold_takes_one_step_per_block(model, strategy):
    cfg = SamplerConfig(strategy=strategy, gen_length=16, block_length=8, threshold=1e-9)
    assert all(x.nfe == 2 for x in generate(model, PROMPTS, cfg, IDS))


@pytest.mark.parametrize("strategy", ["random", "llada_random", "tps_prob", "ups"])
def test_threshold_batched_equals_solo(model, strategy):
    """Rows finish blocks at different steps: finished rows draw nothing, so each row is batch-independent."""
    cfg = SamplerConfig(strategy=strategy, gen_length=16, block_length=8, temperature=0.9, threshold=0.35,
                        remask_threshold=0.3 if strategy in REMASK_STRATEGIES else None, eos_gating=True)
    batched = generate(model, PROMPTS, cfg, IDS, _gens(3, seed=4))
    assert len({x.nfe for x in batched}) > 1, "fixture should make rows take different step counts"
    for b, p in enumerate(PROMPTS):
        solo = generate(model, [p], cfg, IDS, [_gens(3, seed=4)[b]])[0]
        assert (solo.tokens, solo.nfe, solo.remasks_per_block) == \
               (batched[b].tokens, batched[b].nfe, batched[b].remasks_per_block)


class ThresholdFake(FakeModel):
    """Vocabulary 8, one block of 4. The fresh block confidently predicts a wrong token W at position 0
    (everything else unsure); then positions 1-3 become sure, W is judged wrong (low TPS probability and
    UPS), and once remasked position 0 is predicted right."""

    FILL, VISIBLE = -9.0, 5.0

    def masked_scores(self, fresh: bool, j: int, right: int):
        pred, sure = (self.W, True) if fresh and j == 0 else (right, not fresh)
        return pred, (5.0 if sure else 0.3), (5.0 if sure else -1.0)


@pytest.mark.parametrize("strategy", ["ups", "tps_prob"])
def test_threshold_remasking_corrects_a_wrong_token(strategy):
    m, ids = ThresholdFake(P=2), SpecialIds(mask=7, eos=6, pad=6)
    cfg = SamplerConfig(strategy=strategy, gen_length=4, block_length=4, threshold=0.9, remask_threshold=0.5,
                        record_trajectory=True)
    out = generate(m, [[1, 2]], cfg, ids)[0]
    t = out.trajectory
    assert t[0]["unmasked"] == [0] and t[0]["tokens"][0] == ThresholdFake.W
    assert t[1]["unmasked"] == [1, 2, 3] and t[1]["remasked"] == [0]
    assert t[2]["unmasked"] == [0] and out.tokens == ThresholdFake.RIGHT and (out.remasks, out.nfe) == (1, 3)
    without = generate(m, [[1, 2]], dataclasses.replace(cfg, remask_threshold=None), ids)[0]
    assert without.tokens[0] == ThresholdFake.W and without.remasks == 0


# ------------------------------------------------------------------------------------- the two scripts
def test_scripts_take_the_fast_decoding_flags(tiny_model_dir, tmp_path):
    """infer_compare.py and eval_gsm_math.py pass --cache/--cache_refresh/--threshold/--remask_threshold to the
    sampler (through SamplingArgs); refresh every step gives the uncached tokens."""
    import json

    from remedi import eval_gsm_math, infer_compare

    common = ["--model_name", str(tiny_model_dir), "--prompt", "Janet has 3 apples.", "--prompt", "Hi",
              "--gen_length", "16", "--block_length", "8", "--sources", "tps_prob,llada_low_confidence",
              "--threshold", "0.2", "--remask_threshold", "0.1", "--batch_size", "2"]
    exact = infer_compare.main(common)
    cached = infer_compare.main(common + ["--cache", "dual", "--cache_refresh", "1"])
    assert [r["generated_ids"] for r in cached] == [r["generated_ids"] for r in exact]
    assert all(r["nfe"] <= 16 for r in exact)
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 4?", "answer": f"#### {i + 4}"}) + "\n"
                            for i in range(2)))
    summary = eval_gsm_math.main(["--model_name", str(tiny_model_dir), "--dataset", str(data), "--output_dir",
                                  str(tmp_path / "ev"), "--gen_length", "8", "--block_length", "4", "--steps", "8",
                                  "--sources", "tps_prob", "--cache", "prefix", "--threshold", "0.5"])
    assert summary["config"]["cache"] == "prefix" and summary["config"]["threshold"] == 0.5
    records = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(1 <= r["nfe"] <= 8 for r in records)


# ------------------------------------------------------------------------------------ bench smoke tests
def _bench(name):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_bench_sampler_runs_on_cpu(tmp_path):
    """The GPU benchmark's code paths end to end on the tiny config (timings mean nothing here): the
    reference, exact, cached, threshold and static-buffer runs, the steady-state probe, the table, the JSON."""
    import json

    rec = _bench("bench_sampler").main(["--smoke", "--batches", "2", "--ups", "head,stream", "--caches", "none,dual",
                                        "--modes", "eager,graphs", "--probe_steps", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "sampler.json").read_text())
    assert "partial" not in saved and not saved["skipped"] and len(saved["rows"]) == len(rec["rows"])
    rows = rec["rows"]
    # eager: reference, exact, head none/dual, threshold, stream none/dual; graphs: the same without the reference
    assert len(rows) == 7 + 6 and not any("error" in r for r in rows), [r.get("error") for r in rows]
    assert all(r["tok_s"] > 0 and r["step_ms"] > 0 and r["launches_step"] == 0 for r in rows if "step_ms" in r)
    assert {r["scaled_x"] for r in rows if r["cache"] == "none"} == {2.0}
    assert {(r["run"], r["mode"]) for r in rows if r["threshold"]} == {("ups/head thr0.9", "eager"),
                                                                        ("ups/head thr0.9", "graphs")}
    assert all(r["x_ref"] is not None and r["x_exact"] is not None for r in rows)
    checked = [r for r in rows if r["mode"] == "graphs" and not r["threshold"]]
    assert checked and all(r["match_uncaptured"] == 1.0 and r["match_eager"] == 1.0 for r in checked)  # float32
    assert sorted((c["cache"], c["mode"]) for c in rec["stream_costs"]) == \
        [("dual", "eager"), ("dual", "graphs"), ("none", "eager"), ("none", "graphs")]


def test_bench_threshold_runs_on_the_tiny_model(tiny_model_dir, tmp_path):
    import json

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 4?", "answer": f"#### {i + 4}"}) + "\n"
                            for i in range(3)))
    rec = _bench("bench_threshold").main(["--model_name", str(tiny_model_dir), "--dataset", str(data), "--n_items",
                                          "2", "--gen_length", "16", "--block_length", "8", "--sources",
                                          "llada_low_confidence,tps_prob", "--steps_list", "2,16", "--thresholds",
                                          "0.3,0.9", "--remask_threshold", "0.2", "--out", str(tmp_path / "t")])
    assert len(rec["points"]) == 8 and (tmp_path / "t" / "accuracy_vs_nfe.png").is_file()
    assert all(1 <= p["nfe"] <= 16 for p in rec["points"])
    assert all("speedup_equal_acc" in p for p in rec["points"] if p["kind"] == "threshold")
