"""Remask-RL loss: block-causal re-scoring reproduces the rollout's log-probs (ratio 1), and the per-step passes
add up to the gradient of the whole GRPO loss, with the right sign."""
import pytest
import torch

from remedi.rl.loss import StepStats, clean_prefix_cache, step_logprobs, step_loss
from remedi.rl.policy import grpo_loss
from remedi.rl.rollout import rollout
from tests.helpers.block_causal import make
from tests.helpers.rl import IDS, PROMPTS, cfg, gens

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model():
    from peft import LoraConfig, get_peft_model

    from remedi.model.loading import LORA_AUTO_TARGET

    m = make("head")
    m.model = get_peft_model(m.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_AUTO_TARGET))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B: the adapters change the policy
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


MODELS = {"head": lambda: make("head"), "stream": lambda: make("stream"), "lora": lora_model}


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("layout, cache", [("block_causal", "prefix"), ("block_causal", "none"),
                                           ("bidirectional", "none")])
def test_recomputed_logprobs_equal_recorded(arch, layout, cache):
    m = MODELS[arch]()
    c = cfg(cache=cache, layout=layout, gen_length=24, steps=12)  # 3 blocks of 8, 4 steps each
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for i in range(c.steps_per_block):
        with torch.no_grad():
            tok, pl = step_logprobs(m, b, i, c, IDS.mask)
        fresh = b.new_mask[:, :, i]
        assert fresh.any()
        assert (tok[fresh] - b.tok_logp[:, :, i][fresh]).abs().max() < 1e-5
        assert (pl - b.pl_logp[:, :, i]).abs().max() < 1e-5
        _, st = step_loss(m, b, i, adv, c, IDS.mask, normaliser=4.0)
        for k in ("tok_ratio_min", "tok_ratio_max", "pl_ratio_min", "pl_ratio_max"):
            assert abs(st[k] - 1) < 1e-5, (k, st[k])
        assert st["tok_clip_frac"] == 0 and st["pl_clip_frac"] == 0


def test_shared_prefix_cache_gives_the_same_logprobs_and_gradients():
    """Head UPS on a frozen backbone: [prompt | final] computed once for all step passes."""
    m = make("head")
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("ups_head."))
    c = cfg(gen_length=24, steps=12)
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    cache = clean_prefix_cache(m, b)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grads = []
    for use in (None, cache):
        m.zero_grad(set_to_none=True)
        for i in range(c.steps_per_block):
            tok, pl = step_logprobs(m, b, i, c, IDS.mask, cache=use)
            fresh = b.new_mask[:, :, i]
            assert (tok[fresh] - b.tok_logp[:, :, i][fresh]).abs().max() < 1e-5
            assert (pl - b.pl_logp[:, :, i]).abs().max() < 1e-5
            step_loss(m, b, i, adv, c, IDS.mask, normaliser=4.0, cache=use)[0].backward()
        grads.append(_grads(m))
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode, layout", [("separate", "block_causal"), ("joint", "block_causal"),
                                          ("separate", "bidirectional")])
def test_per_step_passes_sum_to_the_full_loss_gradient(mode, layout):
    m = make("stream")
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith(("model.blocks_upm", "model.backprop", "model.ln_f_upm", "model.linear_conf")))
    c = cfg(layout=layout, cache="none" if layout == "bidirectional" else "prefix")
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    adv = torch.tensor([1.0, -0.3, 0.7, -1.4])
    S = c.steps_per_block
    for i in range(S):  # one backward per step index, as the trainer does
        loss, _ = step_loss(m, b, i, adv, c, IDS.mask, mode=mode, normaliser=4.0)
        loss.backward()
    per_step = _grads(m)
    m.zero_grad(set_to_none=True)
    outs = [step_logprobs(m, b, i, c, IDS.mask) for i in range(S)]  # every step in one graph
    tok = torch.stack([o[0] for o in outs], 2).flatten(1, 2)  # (N, nb*S, Lb), step-major within a block
    pl = torch.stack([o[1] for o in outs], 2).flatten(1, 2)
    full, _ = grpo_loss(tok, b.tok_logp.flatten(1, 2), b.new_mask.flatten(1, 2), pl, b.pl_logp.flatten(1, 2),
                        torch.ones_like(pl, dtype=torch.bool), adv, mode=mode, normaliser=4.0)
    full.backward()
    whole = _grads(m)
    assert per_step.keys() == whole.keys() and len(whole) > 5
    for n in whole:
        torch.testing.assert_close(per_step[n], whole[n], atol=1e-6, rtol=1e-4)


def test_gradient_step_raises_the_logprob_of_a_rewarded_trajectory():
    """The sign: one SGD step on a rollout with A > 0 makes its actions more likely, with A < 0 less."""
    c = cfg()
    for sign in (1.0, -1.0):
        m = make("head")
        head = list(m.ups_head.parameters())
        for p in m.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        b = rollout(m, PROMPTS[:1], c, IDS, gens(1))
        before = b.pl_logp.sum()
        for i in range(c.steps_per_block):
            loss, _ = step_loss(m, b, i, torch.tensor([sign]), c, IDS.mask, normaliser=1.0)
            loss.backward()
        with torch.no_grad():
            for p in head:
                p -= 1e-3 * p.grad
            after = sum(step_logprobs(m, b, i, c, IDS.mask)[1].sum() for i in range(c.steps_per_block))
        assert (after - before) * sign > 0


def test_step_stats_weights_by_counts():
    s = StepStats("separate")
    base = dict(loss=0.5, tok_abs_log_ratio_sum=0.0, pl_abs_log_ratio_sum=0.0)
    s.add({**base, "n_tok": 1.0, "n_pl": 2.0, "tok_ratio_mean": 1.0, "tok_ratio_min": 1.0, "tok_ratio_max": 1.0,
           "pl_ratio_mean": 1.0, "pl_ratio_min": 0.9, "pl_ratio_max": 1.0, "tok_clip_frac": 0.0, "pl_clip_frac": 0.0})
    s.add({**base, "n_tok": 3.0, "n_pl": 2.0, "tok_ratio_mean": 2.0, "tok_ratio_min": 1.5, "tok_ratio_max": 3.0,
           "pl_ratio_mean": 1.0, "pl_ratio_min": 1.0, "pl_ratio_max": 1.2, "tok_clip_frac": 1.0, "pl_clip_frac": 0.5})
    r = s.record()
    assert r["loss"] == 1.0 and r["tok_ratio_mean"] == 1.75 and r["tok_clip_frac"] == 0.75
    assert r["pl_ratio_min"] == 0.9 and r["pl_ratio_max"] == 1.2 and r["pl_clip_frac"] == 0.25
    assert r["tok_abs_log_ratio"] == 0.0
    assert set(StepStats("joint").record()) >= {"joint_ratio_mean", "joint_clip_frac", "tok_ratio_mean"}


@pytest.mark.parametrize("layout, cache", [("block_causal", "prefix"), ("bidirectional", "none")])
def test_cached_feature_loss_equals_the_recomputed_one(layout, cache):
    """Head UPS on a frozen backbone: the loss from the rollout's recorded hidden states (no second forward)
    has the recomputed loss's log-probs and gradients."""
    from remedi.rl.loss import cached_step_logprobs

    m = make("head")
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("ups_head."))
    c = cfg(gen_length=24, steps=12, layout=layout, cache=cache, record_hidden=True)
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    assert b.hidden.shape == (4, 3, 4, 8, m.config.d_model)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grads = []
    for features in (False, True):
        m.zero_grad(set_to_none=True)
        for i in range(c.steps_per_block):
            if features:
                tok, pl = cached_step_logprobs(m, b, i, c)
                assert torch.equal(tok, b.tok_logp[:, :, i])
                assert (pl - b.pl_logp[:, :, i]).abs().max() < 1e-5
            step_loss(m, b, i, adv, c, IDS.mask, normaliser=4.0, features=features)[0].backward()
        grads.append(_grads(m))
    assert grads[0] and set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="record_hidden"):
        cached_step_logprobs(m, rollout(m, PROMPTS, cfg(), IDS, gens(4)), 0, cfg())


def test_greedy_token_rollouts_train_the_positions_only():
    """tokens=greedy: no token terms in the loss, the PL terms carry the gradient."""
    m = make("head")
    c = cfg(gen_length=24, steps=12, tokens="greedy", temperature=0.0)
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, st = step_loss(m, b, 1, adv, c, IDS.mask, normaliser=4.0)
    assert st["n_tok"] == 0 and st["n_pl"] == 4 * 3 and abs(st["pl_ratio_mean"] - 1) < 1e-5
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "ups_head" in n)
    with pytest.raises(ValueError, match="no random action"):
        step_loss(m, b, 1, adv, cfg(tokens="greedy", positions="top_k"), IDS.mask, normaliser=4.0)


@pytest.mark.parametrize("layout, cache", [("block_causal", "prefix"), ("bidirectional", "none")])
def test_residual_ups_loss_trains_g_and_cached_features_equal_the_recomputed_scores(layout, cache):
    """A residual UPS attached: ups_modules() is the residual (what RL trains); the PL log-probs of its scores,
    recomputed by a loss forward or from the rollout's recorded features, equal the rollout's, and the loss
    gradient reaches g's weights (the same from both paths) and nothing else."""
    from remedi.rl.loss import cached_step_logprobs
    from tests.helpers.rl import residual_for

    m = make("head")
    policy = residual_for(m, seed=3, g="attention")
    assert m.ups_modules() == [policy]
    for p in m.parameters():
        p.requires_grad_(False)
    for mod in m.ups_modules():
        for p in mod.parameters():
            p.requires_grad_(True)
    c = cfg(gen_length=24, steps=12, layout=layout, cache=cache)
    b = rollout(m, PROMPTS, c, IDS, gens(4))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grads = []
    for features in (False, True):
        m.zero_grad(set_to_none=True)
        for i in range(c.steps_per_block):
            tok, pl = (cached_step_logprobs(m, b, i, c) if features else step_logprobs(m, b, i, c, IDS.mask))
            torch.testing.assert_close(pl, b.pl_logp[:, :, i], atol=5e-5, rtol=1e-5)  # ratio 1 before any update
            step_loss(m, b, i, adv, c, IDS.mask, normaliser=4.0, features=features)[0].backward()
        grads.append(_grads(m))
    assert set(grads[0]) == set(grads[1]) == {"ups_policy.weight", "ups_policy.bias", "ups_policy.inp",
                                              "ups_policy.qk", "ups_policy.out"}
    assert grads[0]["ups_policy.weight"].abs().sum() > 0 and grads[0]["ups_policy.out"].abs().sum() > 0
    for n in grads[0]:  # the loss forward's logits (hence features) differ from the rollout's by float32 rounding
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=2e-5, rtol=2e-3)
    # a small SGD step on g raises the advantage-weighted log-prob of the rollouts' position choices
    with torch.no_grad():
        before = torch.stack([cached_step_logprobs(m, b, i, c)[1] for i in range(c.steps_per_block)]).sum((0, 2))
        for n, p in policy.named_parameters():
            p -= 1e-3 * grads[1][f"ups_policy.{n}"]
        after = torch.stack([cached_step_logprobs(m, b, i, c)[1] for i in range(c.steps_per_block)]).sum((0, 2))
    assert ((after - before) * adv).sum() > 0
