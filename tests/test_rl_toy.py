"""The RL update as the project computes it moves a toy position policy the right way, and the wrong way with
the advantage's sign flipped.

A linear residual scorer over synthetic per-position features, score = anchor + features @ theta with theta
initialised to zero (a fresh policy is its anchor), keeps K of L positions by a Plackett-Luce draw
(``rl.policy.sample_plackett_luce``); the reward is the share of kept positions whose hidden label is good
(a linear function of the features the anchor does not see). One update: G items x n rollouts, advantages
from ``rl.advantages``, the PL log-probs of the kept orders (``plackett_luce_logprob``) into ``grpo_loss``
(no token terms), one Adam step. Deterministic (explicit generators) and a fraction of a second on CPU.
"""
from __future__ import annotations

import pytest
import torch

from remedi.rl.advantages import advantages, zero_advantage_share
from remedi.rl.policy import grpo_loss, plackett_luce_logprob, sample_plackett_luce

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops

L, D, K = 16, 4, 4  # positions, features, kept
ITEMS, GROUP, UPDATES, T_POS = 8, 8, 20, 0.5
W_TRUE = torch.tensor([1.0, 0.0, -0.7, 0.4])  # the hidden label: good = features @ W_TRUE > 0


def _items(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, L, D, generator=g)  # (n, L, D)
    anchor = 0.5 * f[..., 1]  # a heuristic on a feature unrelated to the label
    good = (f @ W_TRUE > 0).float()  # (n, L)
    return f, anchor, good


def _reward(order: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    return good.gather(1, order).mean(1)  # (N,) share of kept positions that are good


def _greedy_reward(theta: torch.Tensor, f, anchor, good) -> torch.Tensor:
    order = (anchor + f @ theta).topk(K, dim=1).indices  # (n, K) the evaluated (greedy) decision
    return _reward(order, good)


def _train(baseline: str, sign: float = 1.0, updates: int = UPDATES):
    theta = torch.zeros(D, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.1)
    zero_shares = []
    for u in range(updates):
        f, anchor, good = _items(ITEMS, seed=1000 + u)
        f, anchor, good = (t.repeat_interleave(GROUP, 0) for t in (f, anchor, good))  # (N, ...) groups
        gen = torch.Generator().manual_seed(10_000 + u)
        with torch.no_grad():
            order = sample_plackett_luce(anchor + f @ theta, K, gen, temperature=T_POS)  # (N, K)
            old = plackett_luce_logprob(anchor + f @ theta, order, temperature=T_POS)  # (N,)
            rewards = _reward(order, good)
            greedy = _greedy_reward(theta, f[::GROUP], anchor[::GROUP], good[::GROUP]) if baseline == "greedy" \
                else None
        adv = sign * advantages(rewards, GROUP, baseline, greedy=greedy)  # (N,)
        zero_shares.append(zero_advantage_share(adv, GROUP))
        new = plackett_luce_logprob(anchor + f @ theta, order, temperature=T_POS)  # (N,)
        N = new.shape[0]
        none = torch.zeros(N, 1, 1)
        loss, st = grpo_loss(none, none, torch.zeros(N, 1, 1, dtype=torch.bool), new[:, None], old[:, None],
                             torch.ones(N, 1, dtype=torch.bool), adv)
        assert st["pl_ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one step per rollout batch: ratio 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta.detach(), zero_shares


EVAL = _items(512, seed=7)


@pytest.mark.parametrize("baseline", ["group", "loo", "greedy"])
def test_rl_update_improves_a_toy_reward_and_fails_with_the_sign_flipped(baseline):
    start = float(_greedy_reward(torch.zeros(D), *EVAL).mean())
    theta, zero_shares = _train(baseline)
    trained = float(_greedy_reward(theta, *EVAL).mean())
    flipped_theta, _ = _train(baseline, sign=-1.0)
    flipped = float(_greedy_reward(flipped_theta, *EVAL).mean())
    assert 0.35 < start < 0.65  # the anchor knows nothing about the label
    assert trained > start + 0.25, (start, trained)
    assert flipped < start - 0.2, (start, flipped)
    # the learned direction is the hidden one
    assert torch.nn.functional.cosine_similarity(theta, W_TRUE, dim=0) > 0.8
    # at the start every group carries signal; as the policy sharpens, groups agree (zero advantage) except
    # with the greedy baseline, which compares them with the evaluated decision instead of with each other
    assert zero_shares[0] < 0.25
