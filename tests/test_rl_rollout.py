"""Remask-RL rollouts: recorded trajectories are self-consistent, cache == exact mode, rows batch-independent."""
from dataclasses import replace

import pytest
import torch

from remedi.rl.policy import plackett_luce_logprob, token_logprob
from remedi.model.kv_cache import GrowingKVCache
from remedi.rl.rollout import policy_logits, rollout
from tests.helpers.block_causal import cached_reference, make
from tests.helpers.rl import IDS, PROMPTS, gens, cfg, residual_for  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")







@pytest.mark.parametrize("arch", ["head", "stream"])
def test_trajectory_is_self_consistent(arch):
    m = make(arch)
    c = cfg()
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    N, nb, S, Lb = b.states.shape
    assert (N, nb, S, Lb) == (4, 2, 4, 8) and b.final.shape == (4, 16) and c.schedule == [2, 4, 6, 8]
    assert not (b.final == IDS.mask).any()
    for j in range(nb):
        assert (b.states[:, j, 0] == IDS.mask).all()  # every block starts fully masked
        for n in range(S):
            cur, xh, order = b.states[:, j, n], b.tokens[:, j, n], b.orders[:, j, n]
            K = c.schedule[n]
            assert (order[:, :K] >= 0).all() and (order[:, K:] == -1).all()
            keep = torch.zeros_like(cur, dtype=torch.bool).scatter_(1, order[:, :K], True)
            masked = cur == IDS.mask
            assert torch.equal(xh[~masked], cur[~masked])  # visible tokens are copied
            assert not (xh == IDS.mask).any()  # the mask is never sampled
            assert torch.equal(b.new_mask[:, j, n], keep & masked)
            nxt = torch.where(keep, xh, torch.full_like(cur, IDS.mask))
            if n + 1 < S:
                assert torch.equal(b.states[:, j, n + 1], nxt)  # the next input state is this step's output
                assert ((nxt != IDS.mask).sum(1) == K).all()
            else:
                assert torch.equal(b.final[:, j * Lb:(j + 1) * Lb], nxt)
            assert (b.tok_logp[:, j, n][~b.new_mask[:, j, n]] == 0).all()
            assert (b.tok_logp[:, j, n][b.new_mask[:, j, n]] < 0).all()
    assert (b.pl_logp < 0).all() and (b.pl_entropy > 0).all()
    # remasks = positions that held a token before a step and were masked after it
    vis = b.states != IDS.mask
    nxt_masked = torch.cat([b.states[:, :, 1:], b.final.view(N, nb, 1, Lb)], 2) == IDS.mask
    assert torch.equal(b.remasks, (vis & nxt_masked).sum((2, 3)))
    assert b.forwards == 1 + nb * S + (nb - 1)


@pytest.mark.parametrize("arch", ["head", "stream"])
def test_recorded_logprobs_are_those_of_the_step_forward(arch):
    """Old log-probs equal token_logprob / plackett_luce_logprob of the block's forward on the stored state."""
    m = make(arch)
    c = cfg()
    b = rollout(m, PROMPTS[:2], c, IDS, gens(2))
    Lb, j, n = c.block_length, 1, 2
    assert b.prompt_mask is not None  # the two prompts have different lengths: left padding is exercised
    with torch.no_grad():
        blocks = [b.final[:, i * Lb:(i + 1) * Lb] for i in range(j)] + [b.states[:, j, n]]
        out = cached_reference(m, b.prompt, b.prompt_mask, blocks)
    lp = token_logprob(policy_logits(out.logits, IDS.mask), b.tokens[:, j, n], c.temperature)
    fresh = b.new_mask[:, j, n]
    torch.testing.assert_close(lp[fresh], b.tok_logp[:, j, n][fresh], atol=1e-5, rtol=1e-5)
    K = c.schedule[n]
    pl = plackett_luce_logprob(out.ups_logits, b.orders[:, j, n, :K], temperature=c.ups_temperature)
    torch.testing.assert_close(pl, b.pl_logp[:, j, n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["head", "stream"])
def test_cache_and_exact_modes_agree(arch):
    m = make(arch)
    a = rollout(m, PROMPTS, cfg(cache="prefix"), IDS, gens(4))
    e = rollout(m, PROMPTS, cfg(cache="none"), IDS, gens(4))
    assert torch.equal(a.final, e.final) and torch.equal(a.orders, e.orders)
    torch.testing.assert_close(a.tok_logp, e.tok_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pl_logp, e.pl_logp, atol=1e-5, rtol=1e-5)
    assert e.forwards == 2 * 4  # no prefill, no commit forwards


@pytest.mark.parametrize("arch", ["head", "stream"])
def test_bidirectional_layout_at_zero_temperature_is_the_samplers_ups_strategy(arch):
    """layout=bidirectional sees what remedi.decoding.sampler sees: at T -> 0 it decodes the same tokens."""
    from remedi.decoding.sampler import SamplerConfig, cut_at_eos, generate

    m = make(arch)
    c = cfg(layout="bidirectional", cache="none", gen_length=24, steps=12, temperature=1e-6, ups_temperature=1e-6)
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    ref = generate(m, PROMPTS, SamplerConfig(strategy="ups", steps=12, gen_length=24, block_length=8), IDS)
    assert [cut_at_eos(row, IDS.eos) for row in b.final.tolist()] == [g.tokens for g in ref]
    assert b.remasks.sum(1).tolist() == [g.remasks for g in ref]
    # and it is a different view from the block-causal one
    bc = rollout(m, PROMPTS, cfg(gen_length=24, steps=12, temperature=1e-6, ups_temperature=1e-6), IDS, gens(4))
    assert not torch.equal(bc.final, b.final)


def test_rows_do_not_depend_on_the_batch():
    m = make("head")
    batch = rollout(m, PROMPTS, cfg(), IDS, gens(4))
    alone = rollout(m, [PROMPTS[2]], cfg(), IDS, [torch.Generator().manual_seed(2)])
    assert torch.equal(batch.final[2], alone.final[0])
    torch.testing.assert_close(batch.pl_logp[2], alone.pl_logp[0], atol=1e-5, rtol=1e-5)
    # a different seed gives a different rollout
    other = rollout(m, [PROMPTS[2]], cfg(), IDS, [torch.Generator().manual_seed(99)])
    assert not torch.equal(other.final[0], alone.final[0])


def test_select_and_commit_steps():
    m = make("head")
    b = rollout(m, PROMPTS, cfg(), IDS, gens(4))
    sub = b.select([1, 3])
    assert torch.equal(sub.final, b.final[[1, 3]]) and sub.prompt_mask.shape == (2, b.prompt.shape[1])
    when = b.commit_steps()
    assert when.shape == (4, 16) and (when >= 0).all() and (when <= 3).all()
    assert (when.view(4, 2, 8) == 3).any(-1).all()  # the last step always unmasks something


def test_growing_cache_appends_and_overwrites():
    c = GrowingKVCache()
    k = torch.zeros(1, 1, 3, 2)
    c.update(0, 0, k, k)
    c.update(0, 3, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert c.k[0].shape[2] == 5
    c.update(0, 3, torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 2.0))
    assert c.k[0].shape[2] == 5 and c.k[0][0, 0, 3:, 0].tolist() == [2.0, 2.0]
    with pytest.raises(RuntimeError, match="gap"):
        c.update(0, 7, k, k)


@pytest.mark.parametrize("kw, msg", [({"steps": 3}, "multiple of the number of blocks"),
                                     ({"block_length": 5}, "must divide"), ({"temperature": 0.0}, "> 0"),
                                     ({"steps": 32}, "at most one step per position"), ({"cache": "dual"}, "cache"),
                                     ({"layout": "bidirectional"}, "no exact KV cache"), ({"layout": "x"}, "layout")])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cfg(**kw).validate()


def test_model_without_ups_is_refused():
    from remedi.model.config import get_config
    from remedi.model.llada import RemeDiLM

    with pytest.raises(ValueError, match="no UPS"):
        rollout(RemeDiLM(get_config("test-tiny")).eval(), PROMPTS[:1], cfg(), IDS, gens(1))


# --------------------------------------------------------------------- the rollout on the sampler's engine
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("arch", ["head", "stream"])
def test_greedy_tokens_and_top_k_positions_are_the_eval_sampler(arch, graphs):
    """Greedy tokens + the zero-temperature position rule = the eval sampler's ups strategy, token for token
    (eager, and the static-buffer decoder, which runs uncaptured on CPU)."""
    from remedi.decoding.sampler import SamplerConfig, cut_at_eos, generate

    m = make(arch)
    c = cfg(layout="bidirectional", cache="none", gen_length=24, steps=12, tokens="greedy", positions="top_k",
            temperature=0.0, ups_temperature=0.0, graphs=graphs)
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    ref = generate(m, PROMPTS, SamplerConfig(strategy="ups", steps=12, gen_length=24, block_length=8, graphs=graphs),
                   IDS)
    assert [cut_at_eos(row, IDS.eos) for row in b.final.tolist()] == [g.tokens for g in ref]
    assert b.remasks.sum(1).tolist() == [g.remasks for g in ref] and sum(g.remasks for g in ref) > 0
    assert (b.tok_logp == 0).all() and (b.pl_logp == 0).all()  # no random action, no log-probs
    # the seed plays no part
    assert torch.equal(rollout(m, PROMPTS, c, IDS, gens(4, seed=7)).final, b.final)


@pytest.mark.parametrize("layout, cache", [("block_causal", "prefix"), ("block_causal", "none"),
                                           ("bidirectional", "none")])
@pytest.mark.parametrize("arch", ["head", "stream"])
def test_static_decoder_rollout_equals_eager(arch, layout, cache):
    """The static-buffer decoder (the CUDA-graph step, uncaptured on CPU) records the same rollout as eager."""
    m = make(arch)
    c = cfg(layout=layout, cache=cache, gen_length=24, steps=12, record_hidden=True)
    e = rollout(m, PROMPTS, c, IDS, gens(4))
    s = rollout(m, PROMPTS, replace(c, graphs=True), IDS, gens(4))
    for name in ("final", "states", "tokens", "orders", "new_mask", "remasks"):
        assert torch.equal(getattr(e, name), getattr(s, name)), name
    for name in ("tok_logp", "pl_logp", "pl_entropy", "ups", "hidden"):
        torch.testing.assert_close(getattr(e, name), getattr(s, name), atol=1e-5, rtol=1e-5)
    assert e.forwards == s.forwards == (1 + 3 * 4 + 2 if cache == "prefix" else 3 * 4)  # 3 blocks x 4 steps


def test_greedy_tokens_leave_only_the_positions_random():
    m = make("head")
    c = cfg(tokens="greedy", temperature=0.0)
    a, b = rollout(m, PROMPTS, c, IDS, gens(4)), rollout(m, PROMPTS, c, IDS, gens(4, seed=50))
    assert not torch.equal(a.orders, b.orders)  # positions still sampled
    assert (a.tok_logp == 0).all() and (a.pl_logp < 0).all()
    # every committed token is the argmax of its step's forward: tokens differ only through the positions
    first = a.states[:, 0, 0]  # block 0, step 0: the same input state for both seeds
    assert torch.equal(first, b.states[:, 0, 0]) and torch.equal(a.tokens[:, 0, 0], b.tokens[:, 0, 0])
    with pytest.raises(ValueError, match="temperature"):
        cfg(tokens="sample", temperature=0.0).validate()
    cfg(positions="top_k", ups_temperature=0.0).validate()  # the zero-temperature rule needs no T_pos


def test_sorted_pl_logprob_equals_the_sequential_one():
    from remedi.decoding.step import pl_logprob_sorted

    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 9, generator=g) * 4
    order = torch.stack([torch.randperm(9, generator=g) for _ in range(5)])
    k = torch.tensor([0, 1, 4, 8, 9])
    got = pl_logprob_sorted(h / 0.7, order, k)
    ref = plackett_luce_logprob(h, torch.where(torch.arange(9)[None] < k[:, None], order, -1), temperature=0.7)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert got[0] == 0 and got[1] < 0


@pytest.mark.parametrize("kw, msg", [({"tokens": "x"}, "rollout_tokens"), ({"positions": "x"}, "rollout_positions")])
def test_rule_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cfg(**kw).validate()


# --------------------------------------------------------------------- a residual UPS policy (remedi.policy)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("arch", ["head", "stream"])
def test_residual_rollout_with_greedy_tokens_and_top_k_is_the_eval_sampler(arch, graphs):
    """With a residual UPS attached, greedy tokens + top_k positions rank by anchor + g exactly as the eval
    sampler's ups source with that residual does: the same tokens and remasks (eager and static decoder)."""
    from remedi.decoding.sampler import SamplerConfig, cut_at_eos, generate

    m = make(arch)
    c = cfg(layout="bidirectional", cache="none", gen_length=24, steps=12, tokens="greedy", positions="top_k",
            temperature=0.0, ups_temperature=0.0, graphs=graphs)
    plain = rollout(m, PROMPTS, c, IDS, gens(4))
    residual_for(m)
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    ref = generate(m, PROMPTS, SamplerConfig(strategy="ups", steps=12, gen_length=24, block_length=8, graphs=graphs),
                   IDS)
    assert [cut_at_eos(row, IDS.eos) for row in b.final.tolist()] == [g.tokens for g in ref]
    assert b.remasks.sum(1).tolist() == [g.remasks for g in ref]
    assert not torch.equal(b.final, plain.final)  # the residual, not the head, made the decisions
    assert b.features.shape == (4, 3, 4, 8, m.ups_policy.weight.numel()) and b.anchor.shape == (4, 3, 4, 8)
    s = m.ups_policy.score_from(b.features, b.anchor, b.states == IDS.mask)
    torch.testing.assert_close(s.float(), b.ups)  # the recorded scores are the residual's


@pytest.mark.parametrize("layout, cache", [("block_causal", "prefix"), ("bidirectional", "none")])
def test_residual_static_rollout_equals_eager(layout, cache):
    m = make("head")
    residual_for(m, g="attention")
    c = cfg(gen_length=24, steps=12, layout=layout, cache=cache)
    want = rollout(m, PROMPTS, c, IDS, gens(4))
    got = rollout(m, PROMPTS, replace(c, graphs=True, graph_capture=False), IDS, gens(4))
    for name in ("states", "tokens", "orders", "final", "remasks"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("pl_logp", "ups", "features", "anchor"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5)


def test_unmask_only_residual_has_no_plackett_luce_rollout():
    from remedi.model.residual import ResidualUPS, attach_policy

    m = make("head")
    attach_policy(m, ResidualUPS(m.config.d_model, torch.zeros(m.config.vocab_size), unmask_only=True))
    with pytest.raises(ValueError, match="unmask_only"):
        rollout(m, PROMPTS, cfg(), IDS, gens(4))
