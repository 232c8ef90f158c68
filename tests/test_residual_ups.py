"""The residual UPS (remedi.model.residual): a zero residual is its anchor token for token, features match a slow
reference, the file round-trips through save_ups/load_ups (head and stream, 8B-like shapes), old files load."""
import dataclasses

import pytest
import torch

from remedi.decoding.sampler import SamplerConfig, generate, position_scores
from remedi.model.checkpoint import load_ups, read_ups_meta, save_ups
from remedi.model.config import get_config
from remedi.model.llada import RemeDiLM, UPSHead, init_weights
from remedi.model.features import (FEATURES, TYPE_DIGIT, TYPE_EQUALS, TYPE_SPACE, step_features,
                                    step_features_reference, token_types)
from remedi.model.residual import ResidualUPS, attach_policy, new_residual

pytestmark = pytest.mark.usefixtures("one_thread")


def _decode(loaded, prompts, strategy, **kw):
    cfg = SamplerConfig(strategy=strategy, gen_length=64, block_length=32, steps=32, **kw)
    return [g.tokens for g in generate(loaded.model, prompts, cfg, loaded.ids)], cfg


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("g", ["linear", "attention"])
def test_zero_residual_is_its_anchor_token_for_token(embedded, prompts, cache, g):
    """A fresh residual policy (output layer zero) decides exactly like --sources entropy, exact and cached."""
    want, _ = _decode(embedded, prompts, "entropy", cache=cache)
    policy = new_residual(embedded.model, embedded.tokenizer, features=FEATURES, hidden_rank=3, g=g)
    attach_policy(embedded.model, policy)
    try:
        got, _ = _decode(embedded, prompts, "ups", cache=cache)
        base, _ = _decode(embedded, prompts, "tps_prob", cache=cache)  # other sources ignore the policy
        policy.set_linear_weights(torch.randn(policy.weight.numel() + 1, generator=torch.Generator().manual_seed(1)))
        moved, _ = _decode(embedded, prompts, "ups", cache=cache)
    finally:
        attach_policy(embedded.model, None)
    assert got == want
    assert base == _decode(embedded, prompts, "tps_prob", cache=cache)[0]
    assert moved != want  # the weights do reach the decision


def test_unmask_only_twin_never_remasks(embedded, prompts):
    attach_policy(embedded.model, new_residual(embedded.model, embedded.tokenizer, unmask_only=True))
    try:
        cfg = SamplerConfig(strategy="ups", gen_length=64, block_length=32, steps=32)
        gens = generate(embedded.model, prompts, cfg, embedded.ids)
    finally:
        attach_policy(embedded.model, None)
    entropy = generate(embedded.model, prompts, SamplerConfig(strategy="entropy", gen_length=64, block_length=32,
                                                              steps=32), embedded.ids)
    assert all(g.remasks == 0 for g in gens) and sum(g.remasks for g in entropy) > 0


def test_residual_refuses_threshold(embedded, prompts):
    attach_policy(embedded.model, new_residual(embedded.model, embedded.tokenizer))
    try:
        with pytest.raises(ValueError, match="--threshold"):
            generate(embedded.model, prompts[:1], SamplerConfig(strategy="ups", gen_length=32, block_length=32,
                                                                threshold=0.9), embedded.ids)
    finally:
        attach_policy(embedded.model, None)


@pytest.mark.slow
@pytest.mark.parametrize("g", ["linear", "attention"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_static_decoder_equals_eager_with_a_nonzero_residual(embedded, prompts, g, cache):
    """--graphs runs the residual (its score is pure tensor code inside the static step): token for token and
    remask for remask the eager decoder's, for a residual that moves the decisions (hidden projection too)."""
    policy = new_residual(embedded.model, embedded.tokenizer, features=FEATURES, hidden_rank=3, g=g)
    policy.set_linear_weights(torch.randn(policy.weight.numel() + 1, generator=torch.Generator().manual_seed(2)))
    if g == "attention":
        with torch.no_grad():
            policy.out.copy_(torch.randn(policy.attn_dim, generator=torch.Generator().manual_seed(3)))
    entropy, _ = _decode(embedded, prompts, "entropy", cache=cache)
    attach_policy(embedded.model, policy)
    try:
        cfg = SamplerConfig(strategy="ups", gen_length=64, block_length=32, steps=32, cache=cache)
        eager = generate(embedded.model, prompts, cfg, embedded.ids)
        static = generate(embedded.model, prompts, dataclasses.replace(cfg, graphs=True, graph_capture=False),
                          embedded.ids)
    finally:
        attach_policy(embedded.model, None)
    assert [x.tokens for x in static] == [x.tokens for x in eager]
    assert [x.remasks_per_block for x in static] == [x.remasks_per_block for x in eager]
    assert [x.tokens for x in eager] != entropy  # the residual is not its anchor here


def test_slip_oracle_flags_false_results_and_refuses_graphs(embedded, prompts):
    from remedi.policy.slip import SlipOracle, false_result_positions

    assert false_result_positions(["1", "2", "+", "3", "=", "1", "6"]) == [5, 6]
    assert false_result_positions(["1", "2", "+", "3", "=", "1", "5"]) == []
    oracle = SlipOracle(embedded.tokenizer, embedded.model.config.vocab_size)
    attach_policy(embedded.model, oracle)
    try:
        with pytest.raises(ValueError, match="without --graphs"):
            generate(embedded.model, prompts[:1], SamplerConfig(strategy="ups", gen_length=32, block_length=32,
                                                                steps=16, graphs=True), embedded.ids)
        tok = embedded.tokenizer("7 + 5 = 13 and 2 + 2 = 4")["input_ids"]
        logits = torch.zeros(2, len(tok), embedded.model.config.vocab_size)
        tokens = torch.tensor([tok, tok[::-1]])
        score = oracle.score(logits, tokens, torch.zeros_like(tokens, dtype=torch.bool), None)
    finally:
        attach_policy(embedded.model, None)
    low = (score[0] < -1e5).nonzero().squeeze(1).tolist()
    pieces = [embedded.tokenizer.decode([t]) for t in tok]
    assert "".join(pieces[i] for i in low).strip() == "13"
    assert not (score[1] < -1e5).any()


def test_token_types_and_features_match_the_slow_reference(embedded):
    table = token_types(embedded.tokenizer)
    tok = embedded.tokenizer
    ids = tok("12 + 3 = 15. x")["input_ids"]
    types = [int(table[i]) for i in ids]
    assert types[0] == TYPE_DIGIT and TYPE_EQUALS in types and TYPE_SPACE in types
    g = torch.Generator().manual_seed(0)
    B, Lb, V = 3, 12, table.numel()
    logits = torch.randn(B, Lb, V, generator=g) * 4
    logits[..., 0] = -torch.inf  # the mask id, as prepare_logits leaves it
    tokens = torch.tensor([(ids * 3)[:Lb], (ids[::-1] * 3)[:Lb], torch.randint(1, V, (Lb,), generator=g).tolist()])
    logits[2, 3, tokens[2, 3]] = -torch.inf  # a visible token the model gives p = 0 (floored)
    masked = torch.rand(B, Lb, generator=g) < 0.5
    keep = torch.tensor([4, 8, 12])
    mf = torch.randn(B, Lb, 3, generator=g)
    fast = step_features(FEATURES, logits, tokens, masked, keep, table, mf, hidden_rank=2)
    slow = step_features_reference(FEATURES, logits, tokens, masked, keep, table, mf, hidden_rank=2)
    assert fast.shape == (B, Lb, len(FEATURES) + 1)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    col = FEATURES.index("result_digit")
    assert fast[0, :, col].sum() >= 1  # "15" after "=" is a result digit
    ent = step_features(("entropy",), logits, tokens, masked, keep, table, None)[..., 0]
    assert torch.equal(-ent, position_scores("entropy", logits, tokens, None, None))


def _eightb_like(stream: bool) -> RemeDiLM:
    """LLaDA-8B's vocabulary, head layout and ids, with a small width and depth (CPU-sized)."""
    cfg = get_config("llada-8b", d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=256,
                     ups_taps=(0, 2) if stream else ())
    m = RemeDiLM(cfg, None if stream else UPSHead(cfg.d_model, 16))
    init_weights(m, generator=torch.Generator().manual_seed(0))
    return m.eval()


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_residual_file_round_trip_8b_shapes(tmp_path, stream, embedded):
    model = _eightb_like(stream)
    V = model.config.vocab_size
    policy = ResidualUPS(model.config.d_model, token_types(embedded.tokenizer, V), features=FEATURES, hidden_rank=4)
    policy.set_linear_weights(torch.linspace(-1, 1, policy.weight.numel() + 1))
    attach_policy(model, policy)
    path = save_ups(tmp_path / "residual.pt", model, extra_meta={"note": "test"})
    meta = read_ups_meta(path)
    assert meta["kind"] == "residual" and meta["ups_arch"] == ("stream" if stream else "head")
    assert meta["residual"]["anchor"] == "entropy" and meta["residual"]["features"] == list(FEATURES)

    fresh = RemeDiLM(model.config.replace(ups_taps=()))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("model.transformer.")},
                          strict=False)
    load_ups(path, fresh)
    assert torch.equal(fresh.ups_policy.linear_weights(), policy.linear_weights())
    x = torch.randint(1, V - 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    x[:, 24:] = model.config.mask_token_id
    a, b = model(x), fresh.eval()(x)
    assert a.ups_logits.shape == (2, 40)  # the forward is the base UPS's; the residual scores in decide()
    torch.testing.assert_close(a.ups_logits, b.ups_logits)
    masked, keep = x == model.config.mask_token_id, torch.full((2,), 20)
    sa = policy.score(a.logits, x, masked, keep, a.ups_logits, a.hidden)
    sb = fresh.ups_policy.score(b.logits, x, masked, keep, b.ups_logits, b.hidden)
    torch.testing.assert_close(sa, sb)
    assert sa.dtype == torch.float64 and not torch.equal(sa, position_scores("entropy", a.logits, x, None, None))
    # a plain head file (no residual) still loads and leaves no policy
    plain = RemeDiLM(model.config.replace(ups_taps=()), UPSHead(model.config.d_model, 0))
    head_path = save_ups(tmp_path / "head.pt", plain)
    other = RemeDiLM(model.config.replace(ups_taps=()))
    load_ups(head_path, other)
    assert other.ups_policy is None and other.ups_arch == "head"


def test_residual_file_refusals(tmp_path, embedded):
    model = _eightb_like(False)
    attach_policy(model, ResidualUPS(model.config.d_model, token_types(embedded.tokenizer, model.config.vocab_size)))
    path = save_ups(tmp_path / "r.pt", model)
    small = RemeDiLM(get_config("test-tiny", d_model=64))
    with pytest.raises(ValueError, match="hidden size"):
        load_ups(path, small)
    with pytest.raises(ValueError, match="unknown residual features"):
        ResidualUPS(8, torch.zeros(10), features=("entropy", "nope"))
    with pytest.raises(ValueError, match="hidden_rank"):
        ResidualUPS(8, torch.zeros(10), features=("hidden",), hidden_rank=0)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_residual_static_step_reads_nothing_from_the_host(cache):
    """The residual's score runs inside the static step without a host read (what CUDA-graph capture needs):
    zero reads from a block's first step to its end, and the same tokens as the eager decoder."""
    from tests.helpers.sampler import _model
    from tests.helpers.sync import assert_static_equals_eager_without_host_reads

    m = _model()
    V = m.config.vocab_size
    policy = ResidualUPS(m.config.d_model, torch.randint(0, 5, (V,), generator=torch.Generator().manual_seed(0)),
                         features=FEATURES, hidden_rank=2, g="attention")
    policy.set_linear_weights(torch.randn(policy.weight.numel() + 1, generator=torch.Generator().manual_seed(1)))
    attach_policy(m, policy)
    assert_static_equals_eager_without_host_reads(m, SamplerConfig(strategy="ups", steps=8, gen_length=16,
                                                                   block_length=8, cache=cache))


def test_logs_name_the_policy_on_top_of_the_ups(embedded):
    assert embedded.model.ups_description == "head"
    attach_policy(embedded.model, new_residual(embedded.model, embedded.tokenizer, features=("entropy",)))
    try:
        assert embedded.model.ups_description == "head + residual policy"
    finally:
        attach_policy(embedded.model, None)
    assert embedded.model.ups_description == "head"
