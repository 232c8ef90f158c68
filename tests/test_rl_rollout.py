"""Remask-RL rollouts: recorded trajectories are self-consistent, cache == exact mode, rows batch-independent."""
import pytest
import torch

from remedi.model.loading import SpecialIds
from remedi.rl.policy import plackett_luce_logprob, token_logprob
from remedi.rl.rollout import GrowingKVCache, RolloutConfig, policy_logits, rollout
from tests.helpers.block_causal import cached_reference, make
from tests.helpers.rl import IDS, PROMPTS, gens, cfg  # noqa: F401

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
