"""Fused q|k|v and gate|up projections (remedi/model/fused.py, ``RemeDiLM.fuse_projections``), CPU float32.

* The fused forward equals the unfused eager forward (full, padded, explicit positions, through a KV cache
  with full / dual / prefix slices; head and stream UPS; MHA and grouped KV heads) and takes 4 linear
  products per block instead of 7; generate() in its cached modes (eager and static decoders) decodes
  the same tokens.
* Parameters keep their names, values and checkpoints (state_dict tensors own their storage, so
  save_pretrained works and reloads equal); in-place edits reach the fused weights; replaced weights
  (.to(), load_state_dict(assign=True), a peft wrap) drop the fusion with a warning; unmerged LoRA is
  refused; a forward with autograd on runs unfused and its gradients equal the unfused ones.
* The fused block traces into one torch.compile graph (no break).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from remedi.decoding.sampler import SamplerConfig, generate
from remedi.model.checkpoint import load_pretrained, save_pretrained
from remedi.model.config import get_config
from remedi.model.fused import fused_view
from remedi.model.kv_cache import KVCache, StaticKVCache
from remedi.model.llada import RemeDiLM, UPSHead, init_weights, rope_tables

from .test_sampler import IDS, PROMPTS, _gens, _model

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = get_config("test-tiny")
GQA = CFG.replace(n_kv_heads=2)
STREAM = CFG.replace(ups_taps=(0, 2))
PROJ = ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj")


class CountLinear(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func is F.linear
        return func(*args, **(kwargs or {}))


def _pair(cfg=CFG, seed=0, head=True):
    """(unfused, fused) copies of one random model."""
    m = RemeDiLM(cfg)
    init_weights(m, std=0.2, generator=torch.Generator().manual_seed(seed))
    if head and not cfg.ups_taps:
        h = UPSHead(cfg.d_model, 8)
        init_weights(h, std=0.5, generator=torch.Generator().manual_seed(seed + 1))
        m.attach_head(h)
    if cfg.ups_taps:  # non-zero bridges, so the stream changes the backbone's outputs
        with torch.no_grad():
            for lin in m.model.backprop_linears:
                lin.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 2))
    m.eval()
    f = copy.deepcopy(m)
    f.fuse_projections()
    return m, f


def _close(a, b, what):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{what}: max abs diff {err}"


def _same_out(a, b, what):
    _close(a.logits, b.logits, what + " logits")
    _close(a.hidden, b.hidden, what + " hidden")
    assert (a.ups_logits is None) == (b.ups_logits is None)
    if a.ups_logits is not None:
        _close(a.ups_logits, b.ups_logits, what + " ups")


def _n_blocks(m):
    return len(m.backbone.all_blocks())


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("cfg", [CFG, GQA, STREAM], ids=["mha", "gqa", "stream"])
@torch.no_grad()
def test_fused_forward_equals_unfused(cfg):
    m, f = _pair(cfg)
    assert f.fused_blocks == _n_blocks(f) and m.fused_blocks == 0
    g = torch.Generator().manual_seed(3)
    B, T = 3, 24
    x = torch.randint(0, cfg.vocab_size - 3, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, :5] = 0  # left padding
    pos = torch.arange(T).repeat(B, 1) + torch.tensor([[0], [3], [7]])
    for kw in [{}, {"attention_mask": attn}, {"position_ids": pos}, {"out_slice": slice(8, 16)}]:
        kw = dict(kw)
        am = kw.pop("attention_mask", None)
        with CountLinear() as cu:
            a = m(x, am, **kw)
        with CountLinear() as cf:
            b = f(x, am, **kw)
        _same_out(b, a, f"full {sorted(kw)} mask={am is not None}")
        n = _n_blocks(f)
        assert cf.n == cu.n - 3 * n, (cf.n, cu.n)  # 4 products per block instead of 7
    # through a KV cache: a full forward, then the block alone (dual) and the block + suffix (prefix)
    for lo, L in [(8, 8), (8, T - 8)]:
        ca, cb = KVCache(), KVCache()
        _same_out(f(x, attn, cache=cb), m(x, attn, cache=ca), "cache fill")
        x2 = x.clone()
        x2[:, lo:lo + 4] = (x2[:, lo:lo + 4] + 1) % (cfg.vocab_size - 3)
        a = m(x2[:, lo:lo + L], attn, cache=ca, start=lo)
        b = f(x2[:, lo:lo + L], attn, cache=cb, start=lo)
        _same_out(b, a, f"cached slice {lo}+{L}")
        for layer in ca.k:
            _close(cb.k[layer], ca.k[layer], "cached keys")
            _close(cb.v[layer], ca.v[layer], "cached values")
            assert not fused_view(cb.v[layer])  # the dict cache holds v alone, not a view of q|k|v


@torch.no_grad()
def test_fused_block_through_static_cache():
    m, f = _pair()
    bm, bf = m.model.transformer.blocks[1], f.model.transformer.blocks[1]
    x = torch.randn(2, 12, CFG.d_model, generator=torch.Generator().manual_seed(0))
    rope = rope_tables(CFG.head_dim, CFG.rope_theta, 0, 12, x.device)
    caches = [StaticKVCache([1], (2, CFG.n_kv_heads, 12, CFG.head_dim), torch.float32, "cpu") for _ in range(2)]
    _close(bf(x, rope, None, caches[1]), bm(x, rope, None, caches[0]), "static full")
    for c in caches:
        c.pos = torch.arange(4, 8)
    rope4 = tuple(t[4:8] for t in rope)
    _close(bf(x[:, 4:8], rope4, None, caches[1]), bm(x[:, 4:8], rope4, None, caches[0]), "static partial")
    _close(caches[1].v[1], caches[0].v[1], "static values")


# ------------------------------------------------------------------------------------------ generate
CACHED = [dict(cache="dual"), dict(cache="prefix"), dict(cache="dual", graphs=True), dict(cache="prefix", graphs=True),
          dict(cache="dual", threshold=0.3)]


@pytest.mark.parametrize("extra", CACHED, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
def test_generate_fused_token_for_token(extra):
    m = _model()
    f = copy.deepcopy(m).fuse_projections()
    for strategy, temp in [("ups", 0.0), ("tps_prob", 0.7), ("llada_low_confidence", 0.0)]:
        cfg = SamplerConfig(strategy=strategy, steps=8, gen_length=16, block_length=8, temperature=temp,
                            record_trajectory=True, **extra)
        want = generate(m, PROMPTS, cfg, IDS, _gens(len(PROMPTS)))
        got = generate(f, PROMPTS, cfg, IDS, _gens(len(PROMPTS)))
        for x, y in zip(got, want):
            assert (x.tokens, x.nfe, x.remasks) == (y.tokens, y.nfe, y.remasks), (strategy, extra)
            for a, b in zip(x.trajectory, y.trajectory):
                assert a["conf"].keys() == b["conf"].keys()
                assert all(a["conf"][k] == pytest.approx(b["conf"][k], rel=1e-5, abs=1e-6) for k in a["conf"])
    assert f.fused_blocks == _n_blocks(f)


def test_generate_fused_stream_static():
    m, f = _pair(STREAM)
    cfg = SamplerConfig(strategy="ups", steps=8, gen_length=16, block_length=8, cache="dual", graphs=True)
    want = generate(m, PROMPTS, cfg, IDS, _gens(len(PROMPTS)))
    got = generate(f, PROMPTS, cfg, IDS, _gens(len(PROMPTS)))
    assert [g.tokens for g in got] == [g.tokens for g in want]


# ---------------------------------------------------------------------------------- names, storage
def test_names_values_and_checkpoints_unchanged(tmp_path):
    m, f = _pair()
    sm, sf = m.state_dict(), f.state_dict()
    assert list(sm) == list(sf)
    assert all(torch.equal(sm[k], sf[k]) for k in sm)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in f.named_parameters()]
    blk = f.model.transformer.blocks[0]
    assert all(fused_view(getattr(blk, n).weight) for n in PROJ)  # the parameters live in the fused tensors
    assert not any(fused_view(t) for t in sf.values())  # ... but the state_dict's tensors own their storage
    with f.without_peft():
        save_pretrained(f, tmp_path / "ckpt")  # safetensors refuses shared storage: this would fail without the hook
    back = load_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert all(torch.equal(back.model.state_dict()[k], f.model.state_dict()[k]) for k in back.model.state_dict())
    assert f.fused_blocks == _n_blocks(f)  # saving did not disturb the fusion


@torch.no_grad()
def test_in_place_edits_reach_the_fused_weights():
    m, f = _pair()
    for model in (m, f):  # an in-place edit as load_state_dict (copy_), a LoRA merge or an optimiser makes
        blk = model.model.transformer.blocks[2]
        blk.q_proj.weight.mul_(1.7)
        blk.up_proj.weight.add_(0.05)
    m.load_state_dict(m.state_dict())
    f.load_state_dict(m.state_dict())  # copy_ into the views
    assert f.fused_blocks == _n_blocks(f)
    x = torch.randint(0, 90, (2, 16))
    _same_out(f(x), m(x), "after in-place edits")


def test_replaced_weights_drop_the_fusion_with_a_warning():
    m, f = _pair()
    x = torch.randint(0, 90, (2, 16))
    m64, f64 = m.to(torch.float64), f.to(torch.float64)
    with pytest.warns(UserWarning, match="fused projections dropped"):
        with torch.no_grad():
            out = f64(x)
    assert f64.fused_blocks == 0
    with torch.no_grad():
        _same_out(out, m64(x), "after .to(float64)")
    _, f = _pair()
    new = {k: v.clone() * 1.01 for k, v in f.state_dict().items()}
    f.load_state_dict(new, assign=True)
    with pytest.warns(UserWarning, match="fused projections dropped"):
        assert f.fused_blocks == 0
    f.fuse_projections()  # fusing again works on the new weights
    assert f.fused_blocks == _n_blocks(f)


def test_unfuse_restores_own_storage():
    m, f = _pair()
    f.unfuse_projections()
    assert f.fused_blocks == 0
    assert not any(fused_view(p) for p in f.parameters())
    x = torch.randint(0, 90, (2, 16))
    with torch.no_grad(), CountLinear() as c:
        _same_out(f(x), m(x), "unfused")
    assert c.n == 2 * (7 * _n_blocks(f) + 1 + 2)  # both models unfused: 7 per block, the LM head, the head MLP


def test_training_forward_runs_unfused_with_equal_gradients():
    m, f = _pair()
    x = torch.randint(0, 90, (2, 16))
    for model in (m, f):
        model.train()
        model(x).logits.square().mean().backward()
    for (n, a), (_, b) in zip(m.named_parameters(), f.named_parameters()):
        if a.grad is None:
            assert b.grad is None, n
            continue
        _close(b.grad, a.grad, n)
    assert f.model.transformer.blocks[0].q_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- LoRA
def _lora(model, init_b=True):
    from peft import LoraConfig, get_peft_model

    from remedi.model.loading import LORA_AUTO_TARGET

    model.model = get_peft_model(model.model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_AUTO_TARGET))
    if init_b:  # non-zero adapters (seeded by name), so that bypassing them would show
        with torch.no_grad():
            for n, p in model.model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


def test_unmerged_lora_is_refused_merged_lora_fuses():
    m = _lora(_pair()[0])
    with pytest.raises(ValueError, match="unmerged LoRA adapters.*merge_and_unload"):
        m.fuse_projections()
    assert m.backbone.refresh_fused() == 0 and not any(fused_view(p) for p in m.parameters())  # nothing changed
    x = torch.randint(0, 90, (2, 16))
    with torch.no_grad():
        want = m(x)
    m.model = m.model.merge_and_unload()
    m.fuse_projections()
    with torch.no_grad():
        _same_out(m(x), want, "merged LoRA, fused")


def test_wrapping_after_fusing_drops_the_fusion():
    m, f = _pair()
    m, f = _lora(m), _lora(f)  # the same adapters (seeded by name)
    x = torch.randint(0, 90, (2, 16))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = f(x)
    assert any("fused projections dropped" in str(e.message) for e in w)
    with torch.no_grad():
        _same_out(out, m(x), "LoRA wrapped after fusing: the adapters act")
    sd = f.model.state_dict()
    assert not any(fused_view(t) for t in sd.values())  # base_layer weights still viewing the old fused rows


# ----------------------------------------------------------------------------------------- compile
@torch.no_grad()
def test_fused_block_compiles_without_graph_breaks():
    torch._dynamo.reset()
    _, f = _pair()
    blk = f.model.transformer.blocks[0]
    x = torch.randn(1, 8, CFG.d_model)
    rope = rope_tables(CFG.head_dim, CFG.rope_theta, 0, 8, x.device)
    eager = blk(x, rope)
    with CountLinear() as c:
        compiled = torch.compile(blk, backend="eager", fullgraph=True)(x, rope)
    _close(compiled, eager, "compiled")
    assert c.n == 4  # the traced graph uses the fused products
    torch._dynamo.reset()



# --------------------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_bench_step_smoke(tmp_path, capsys):
    """bench/bench_step.py --smoke: both variants in every mode, ratios, floor, the table last, the JSON."""
    import json

    from .test_fast_decoding import _bench

    rec = _bench("bench_step").main(["--smoke", "--batches", "1,2", "--profile", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "step.json").read_text())
    assert "partial" not in saved and not saved["skipped"] and saved["rows"] == json.loads(json.dumps(rec["rows"]))
    rows = rec["rows"]
    assert [(r["mode"], r["batch"], r["variant"]) for r in rows] == [
        (m, b, v) for m in ("eager", "graphs") for b in (1, 2) for v in ("unfused", "fused")]
    assert not any("error" in r or "probe_error" in r for r in rows), rows
    assert all(r["tok_s"] > 0 and r["step_ms"] > 0 and r["full_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert all(r["x_unfused"] == 1.0 for r in rows if r["variant"] == "unfused")
    assert all(r["match"] == 1.0 for r in rows if r["variant"] == "fused")  # float32: the same tokens
    assert all("tokens" not in r and r["launches_step"] == 0 for r in rows)
    assert rec["floors"]["2"]["flops"] == 2 * rec["floors"]["1"]["flops"]
    last = capsys.readouterr().out.strip().splitlines()
    assert last[-len(rows) - 1].split()[:3] == ["mode", "batch", "variant"]  # the table is printed last
