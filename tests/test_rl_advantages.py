"""Remask-RL advantages: exact values of every baseline and of per-block credit, and the decision statistics."""
from __future__ import annotations

import pytest
import torch

from remedi.rl import policy
from remedi.rl.advantages import (advantages, block_advantages, decision_stats, greedy_advantages,
                                  group_advantages, kept_from_orders, loo_advantages, reward_to_go,
                                  zero_advantage_share)
from remedi.rl.policy import grpo_loss


def test_group_advantages_moved_and_reexported():
    assert policy.group_advantages is group_advantages
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # mean 0.25, sample std 0.5: (0.75 / 0.5001, -0.25 / 0.5001, ...)
    assert torch.allclose(group_advantages(r, 4), torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001)


def test_loo_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.8])
    a = loo_advantages(r, 4)
    # group 1: 1 - (0 + 0 + 1) / 3 = 2/3; 0 - 2/3; 0 - 2/3; 1 - 1/3
    # group 2: 0.5 - 1.5/3 = 0; 0; 0.2 - 1.8/3 = -0.4; 0.8 - 1.2/3 = 0.4
    want = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, -0.4, 0.4])
    assert torch.allclose(a, want, atol=1e-6)
    # RLOO is the group-centred reward scaled by n / (n - 1)
    assert torch.allclose(a, group_advantages(r, 4, std="none") * 4 / 3, atol=1e-6)
    assert torch.equal(loo_advantages(torch.full((6,), 0.3), 3), torch.zeros(6))
    assert loo_advantages(r.double(), 4).dtype == torch.float64
    with pytest.raises(ValueError, match="group_size >= 2"):
        loo_advantages(r, 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        loo_advantages(r, 3)


def test_greedy_baseline_hand_computed():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    greedy = torch.tensor([1.0, 0.0])  # item 0's greedy rollout is right, item 1's wrong
    assert torch.equal(greedy_advantages(r, greedy, 3), torch.tensor([0.0, 0.0, -1.0, 0.0, 1.0, 0.0]))
    # a group whose rollouts all agree still learns when they differ from greedy
    same = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert torch.equal(greedy_advantages(same, greedy, 3), torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="one row per group"):
        greedy_advantages(r, torch.zeros(6), 3)
    block = torch.arange(12.0).view(6, 2)
    gb = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    want = block - torch.tensor([[1.0, 2.0]] * 3 + [[10.0, 20.0]] * 3)
    assert torch.equal(greedy_advantages(block, gb, 3), want)


def test_reward_to_go():
    r = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.0]])
    assert torch.allclose(reward_to_go(r), torch.tensor([[0.6, 0.5, 0.3], [1.0, 0.0, 0.0]]))
    assert torch.allclose(reward_to_go(r, gamma=0.5), torch.tensor([[0.1 + 0.1 + 0.075, 0.2 + 0.15, 0.3],
                                                                     [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="num_blocks"):
        reward_to_go(torch.zeros(3))


def test_block_advantages_hand_computed():
    # 2 groups of 2 rollouts, 3 blocks
    br = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    togo = torch.tensor([[1.0, 1.0, 0.5], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(reward_to_go(br), togo)
    # loo on the reward-to-go, per column: with n = 2, A_i = R_i - R_other
    want = torch.tensor([[0.5, 0.5, 0.0], [-0.5, -0.5, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    assert torch.allclose(block_advantages(br, 2, "loo"), want)
    # own credit: the block's own reward, no sum over later blocks
    want_own = torch.tensor([[0.0, 0.5, 0.0], [0.0, -0.5, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    assert torch.allclose(block_advantages(br, 2, "loo", credit="own"), want_own)
    # group baseline per column: +-d / (std + eps) with std = |d| * sqrt(2) / 2 ... equal columns give 0
    g = block_advantages(br, 2, "group")
    for j in range(3):
        assert torch.allclose(g[:, j], group_advantages(togo[:, j], 2))
    assert g[0, 2] == 0 and g[2, 1] == 0
    # greedy per block: the greedy rollout's reward-to-go is subtracted
    greedy = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 1.0]])  # to-go [[0.5, 0, 0], [1, 1, 1]]
    want_g = togo - torch.tensor([[0.5, 0.0, 0.0]] * 2 + [[1.0, 1.0, 1.0]] * 2)
    assert torch.allclose(block_advantages(br, 2, "greedy", greedy=greedy), want_g)
    with pytest.raises(ValueError, match="greedy rollout"):
        block_advantages(br, 2, "greedy")
    with pytest.raises(ValueError, match="credit"):
        block_advantages(br, 2, credit="future")


def test_advantages_dispatch():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    assert torch.equal(advantages(r, 2), group_advantages(r, 2))
    assert torch.equal(advantages(r, 2, "loo"), loo_advantages(r, 2))
    assert torch.equal(advantages(r, 2, "greedy", greedy=torch.tensor([1.0, 0.0])),
                       torch.tensor([0.0, -1.0, 0.5, 0.5]))
    br = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.25, 0.25], [0.5, 0.0]])
    a = advantages(r, 2, "loo", credit="block", block_rewards=br)
    assert a.shape == (4, 2)
    assert torch.allclose(a, torch.tensor([[1.0, 0.5], [-1.0, -0.5], [0.0, 0.25], [0.0, -0.25]]))
    with pytest.raises(ValueError, match="add up"):
        advantages(r, 2, credit="block", block_rewards=br * 2)
    with pytest.raises(ValueError, match="per-block rewards"):
        advantages(r, 2, credit="block")
    with pytest.raises(ValueError, match="--advantage 'mean'"):
        advantages(r, 2, "mean")
    with pytest.raises(ValueError, match="--credit 'token'"):
        advantages(r, 2, credit="token")
    with pytest.raises(ValueError, match="baseline is 'loo'"):
        advantages(r, 2, "loo", greedy=torch.zeros(2))


def test_block_advantages_reach_the_loss_per_block():
    """grpo_loss broadcasts (N, nb) advantages over a step's (N, nb, Lb) token and (N, nb) position terms
    (the layout of rl.loss.step_loss): at ratio 1 the gradient on block j's log-probs is -A[:, j] / N."""
    N, nb, Lb = 2, 3, 4
    tok = torch.zeros(N, nb, Lb, requires_grad=True)
    pl = torch.zeros(N, nb, requires_grad=True)
    fresh = torch.zeros(N, nb, Lb, dtype=torch.bool)
    fresh[..., 0] = True
    adv = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    loss, _ = grpo_loss(tok, tok.detach(), fresh, pl, pl.detach(), torch.ones(N, nb, dtype=torch.bool), adv)
    loss.backward()
    assert torch.allclose(pl.grad, -adv / N)
    assert torch.allclose(tok.grad[..., 0], -adv / N)
    assert torch.equal(tok.grad[..., 1:], torch.zeros(N, nb, Lb - 1))


def test_zero_advantage_share():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert zero_advantage_share(group_advantages(r, 2), 2) == pytest.approx(2 / 3)
    assert zero_advantage_share(loo_advantages(r, 2), 2) == pytest.approx(2 / 3)
    assert zero_advantage_share(torch.tensor([[0.0, 0.0], [0.0, 1e-3]]), 1) == 0.5


def test_kept_from_orders():
    orders = torch.tensor([[2, -1, -1, -1], [3, 0, -1, -1], [0, 1, 2, 3]])
    want = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(kept_from_orders(orders), want)


def _slow_decision_stats(kept, tokens):
    """Reference: walk every (rollout, block, position) through the steps one by one."""
    N, nb, S, Lb = kept.shape
    remasks = recommits = same = 0
    for b in range(N):
        for j in range(nb):
            for i in range(Lb):
                held = None
                for s in range(S):
                    if s and kept[b, j, s - 1, i] and not kept[b, j, s, i]:
                        remasks += 1
                        held = int(tokens[b, j, s - 1, i])
                    elif held is not None and kept[b, j, s, i]:
                        recommits += 1
                        same += int(tokens[b, j, s, i]) == held
                        held = None
    return remasks, recommits, same


def test_decision_stats_hand_example():
    # one block of 3 positions, 4 steps; position 0: kept, remasked at step 2, re-committed with the same token
    # at step 3; position 1: kept at step 1, remasked at step 2, back with another token at step 3; position 2:
    # committed at step 3 only
    kept = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool).view(1, 1, 4, 3)
    tokens = torch.tensor([[7, 5, 5], [7, 8, 5], [7, 8, 5], [7, 9, 4]]).view(1, 1, 4, 3)
    st = decision_stats(kept, tokens)
    assert st["remasks"] == 2 and st["recommits"] == 2 and st["remasks_per_block"] == 2.0
    assert st["same_token_recommit_share"] == 0.5
    none = decision_stats(torch.ones(1, 2, 2, 3, dtype=torch.bool), torch.zeros(1, 2, 2, 3, dtype=torch.long))
    assert none["remasks"] == 0 and none["same_token_recommit_share"] != none["same_token_recommit_share"]  # NaN


def test_decision_stats_match_slow_reference():
    g = torch.Generator().manual_seed(0)
    N, nb, S, Lb = 3, 2, 6, 5
    kept = torch.rand(N, nb, S, Lb, generator=g) < 0.5
    kept[:, :, -1] = True  # every position ends committed
    tokens = torch.randint(0, 3, (N, nb, S, Lb), generator=g)
    st = decision_stats(kept, tokens)
    remasks, recommits, same = _slow_decision_stats(kept, tokens)
    assert remasks > 5 and 0 < same < recommits  # the random case exercises both outcomes
    assert (st["remasks"], st["recommits"]) == (remasks, recommits)
    assert st["same_token_recommit_share"] == pytest.approx(same / recommits)
    assert st["remasks_per_block"] == pytest.approx(remasks / (N * nb))
    with pytest.raises(ValueError, match="both be"):
        decision_stats(kept[0], tokens[0])
