"""Remask RL policy terms (remedi.rl.policy): PL log-probs against brute-force enumeration, samplers against
exact probabilities, advantages and clipped losses against hand-computed values and autograd."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from remedi.rl.policy import (clipped_surrogate, group_advantages, grpo_loss, kl_k3, order_to_mask,
                              plackett_luce_logprob, sample_plackett_luce, sample_tokens, token_logprob)


def G(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_pl_prob(scores: list, eligible: list, order: tuple, temperature: float = 1.0) -> float:
    """Sequential draws without replacement, one position at a time, in plain Python floats (float64)."""
    remaining = [j for j, e in enumerate(eligible) if e]
    p = 1.0
    for u in order:
        w = {j: math.exp(scores[j] / temperature) for j in remaining}
        p *= w[u] / sum(w.values())
        remaining.remove(u)
    return p


def all_orders(eligible_row: list, k: int):
    return list(itertools.permutations([j for j, e in enumerate(eligible_row) if e], k))


def pad(order: tuple, K: int) -> list:
    return list(order) + [-1] * (K - len(order))


def tv(p: dict, q: dict) -> float:
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(x, 0.0) - q.get(x, 0.0)) for x in keys)


# --------------------------------------------------------------------------------- Plackett-Luce log-prob

SCORES5 = [[0.3, -1.2, 2.0, 0.5, -0.4], [1.5, 0.1, -0.7, 3.0, 0.0]]
ELIG5 = [[True, False, True, True, True], [True, True, False, True, False]]


def test_pl_logprob_matches_brute_force_enumeration():
    Kmax = 3
    for b in range(2):
        for k in range(1, Kmax + 1):
            orders = all_orders(ELIG5[b], k)
            n = len(orders)
            scores = torch.tensor([SCORES5[b]] * n, dtype=torch.float64)
            eligible = torch.tensor([ELIG5[b]] * n)
            # padded to Kmax columns: rows with k < Kmax exercise the -1 padding
            order = torch.tensor([pad(o, Kmax) for o in orders])
            logp = plackett_luce_logprob(scores, order, eligible)
            assert logp.dtype == torch.float64 and logp.shape == (n,)
            assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
            naive = torch.tensor([naive_pl_prob(SCORES5[b], ELIG5[b], o) for o in orders], dtype=torch.float64)
            assert torch.allclose(logp.exp(), naive, rtol=1e-12, atol=0)


def test_pl_logprob_mixed_rows_padding_and_stability():
    # row 0 draws every eligible position, row 1 nothing, row 2 one position
    scores = torch.tensor([SCORES5[0], SCORES5[1], SCORES5[1]], dtype=torch.float64)
    eligible = torch.tensor([ELIG5[0], ELIG5[1], ELIG5[1]])
    order = torch.tensor([[2, 0, 4, 3], [-1, -1, -1, -1], [3, -1, -1, -1]])
    logp = plackett_luce_logprob(scores, order, eligible)
    assert logp[0].exp().item() == pytest.approx(naive_pl_prob(SCORES5[0], ELIG5[0], (2, 0, 4, 3)), rel=1e-12)
    assert logp[1].item() == 0.0
    assert logp[2].exp().item() == pytest.approx(naive_pl_prob(SCORES5[1], ELIG5[1], (3,)), rel=1e-12)
    # huge scores: float32 exp would overflow; the log-sum-exp does not, and the result is shift invariant
    big = torch.tensor([[800.0, 790.0, 805.0, 799.0]])
    o = torch.tensor([[2, 0]])
    got = plackett_luce_logprob(big, o)
    ref = math.log(naive_pl_prob([v - 800.0 for v in big[0].tolist()], [True] * 4, (2, 0)))
    assert torch.isfinite(got).all() and got.item() == pytest.approx(ref, abs=1e-5)


def test_pl_logprob_gradient_is_finite_and_matches_finite_differences():
    # rows: all eligible drawn; no draw; two draws; all 3 eligible drawn then padding; nothing eligible
    scores = torch.tensor([SCORES5[0], SCORES5[1], SCORES5[1], SCORES5[1], SCORES5[0]], dtype=torch.float64,
                          requires_grad=True)
    eligible = torch.tensor([ELIG5[0], ELIG5[1], ELIG5[1], ELIG5[1], [False] * 5])
    order = torch.tensor([[2, 0, 4, 3], [-1, -1, -1, -1], [3, 1, -1, -1], [3, 0, 1, -1], [-1, -1, -1, -1]])
    assert torch.autograd.gradcheck(lambda s: plackett_luce_logprob(s, order, eligible), (scores,))
    logp = plackett_luce_logprob(scores, order, eligible)
    assert logp[4].item() == 0.0
    logp.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[~eligible] == 0).all()  # ineligible positions carry no probability, hence no gradient
    assert (scores.grad[1] == 0).all()
    assert scores.grad[3].abs().max() > 1e-3  # drawing every eligible position still depends on the order
    # K = 1: d log softmax / dz = onehot - softmax over the eligible positions
    q = torch.softmax(scores[2].detach().masked_fill(~eligible[2], float("-inf")), -1)
    s1 = scores.detach()[2:3].clone().requires_grad_()
    plackett_luce_logprob(s1, torch.tensor([[3]]), eligible[2:3]).sum().backward()
    assert torch.allclose(s1.grad[0], torch.nn.functional.one_hot(torch.tensor(3), 5).double() - q)


def test_pl_logprob_rejects_invalid_orders():
    scores = torch.tensor(SCORES5)
    eligible = torch.tensor(ELIG5)
    with pytest.raises(ValueError, match="not an eligible"):
        plackett_luce_logprob(scores, torch.tensor([[1, -1], [0, -1]]), eligible)  # row 0: position 1 ineligible
    with pytest.raises(ValueError, match="more than once"):
        plackett_luce_logprob(scores, torch.tensor([[2, 2], [0, 1]]), eligible)
    with pytest.raises(ValueError, match="trailing"):
        plackett_luce_logprob(scores, torch.tensor([[-1, 2], [0, 1]]), eligible)
    with pytest.raises(ValueError, match="range|positions in"):
        plackett_luce_logprob(scores, torch.tensor([[5, -1], [0, 1]]), eligible)
    with pytest.raises(ValueError):
        plackett_luce_logprob(scores, torch.tensor([[2, 3]]), eligible)  # batch mismatch
    with pytest.raises(ValueError):
        plackett_luce_logprob(scores, torch.tensor([[2], [0]]), eligible, temperature=0.0)


def test_pl_temperature_is_a_score_rescaling():
    scores = torch.randn(4, 7, generator=G(3))
    eligible = torch.rand(4, 7, generator=G(4)) > 0.3
    eligible[:, 0] = True
    k = torch.tensor([1, 0, 2, 1])
    for T in (0.37, 1.0, 2.5):
        order = sample_plackett_luce(scores, k, G(5), eligible, temperature=T)
        assert torch.equal(order, sample_plackett_luce(scores / T, k, G(5), eligible, temperature=1.0))
        a = plackett_luce_logprob(scores, order, eligible, temperature=T)
        b = plackett_luce_logprob(scores / T, order, eligible, temperature=1.0)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    order = sample_plackett_luce(scores, k, G(5), eligible)
    # the temperature matters: a real change of the log-probs (rows with draws)
    assert not torch.allclose(plackett_luce_logprob(scores, order, eligible, temperature=0.37)[k > 0],
                              plackett_luce_logprob(scores, order, eligible)[k > 0], atol=1e-3)


# ----------------------------------------------------------------------------------------- PL sampling


def test_pl_sampling_frequencies_match_pl_probabilities():
    row = [0.9, -0.5, 3.0, 0.2, 1.4]
    elig_row = [True, True, False, True, True]  # position 2 has the top score but is ineligible
    T, k, n = 0.8, 2, 20000
    scores = torch.tensor([row]).expand(n, 5)
    eligible = torch.tensor([elig_row]).expand(n, 5)
    order = sample_plackett_luce(scores, k, G(0), eligible, temperature=T)
    assert order.shape == (n, k) and order.dtype == torch.long
    assert not (order == 2).any() and not (order == -1).any()
    assert (order[:, 0] != order[:, 1]).all()
    emp = {o: c / n for o, c in Counter(map(tuple, order.tolist())).items()}
    orders = all_orders(elig_row, k)
    lp = plackett_luce_logprob(torch.tensor([row] * len(orders)), torch.tensor(orders),
                               torch.tensor([elig_row] * len(orders)), temperature=T)
    exact = dict(zip(orders, lp.exp().tolist()))
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    assert tv(emp, exact) < 0.02
    # the check has power: the PL law is far from uniform, and from PL at another temperature
    uniform = {o: 1 / len(orders) for o in orders}
    assert tv(exact, uniform) > 0.1
    lp1 = plackett_luce_logprob(torch.tensor([row] * len(orders)), torch.tensor(orders),
                                torch.tensor([elig_row] * len(orders)), temperature=1.6)
    assert tv(emp, dict(zip(orders, lp1.exp().tolist()))) > 0.05


def test_pl_sampling_per_row_k_padding_and_errors():
    scores = torch.randn(3, 6, generator=G(1))
    eligible = torch.tensor([[True] * 6, [True, False] * 3, [False, True, True, False, True, True]])
    k = torch.tensor([2, 0, 4])
    order = sample_plackett_luce(scores, k, [G(1), G(2), G(3)], eligible)
    assert order.shape == (3, 4)
    assert (order[0, 2:] == -1).all() and (order[0, :2] >= 0).all()
    assert (order[1] == -1).all()
    assert sorted(order[2].tolist()) == [1, 2, 4, 5]  # exactly the 4 eligible positions, in some order
    mask = order_to_mask(order, 6)
    assert mask.sum(-1).tolist() == [2, 0, 4] and not (mask & ~eligible).any()
    # the whole batch draws distinct, eligible positions; plackett_luce_logprob accepts the result
    assert torch.isfinite(plackett_luce_logprob(scores, order, eligible)).all()
    with pytest.raises(ValueError, match="only 3 are eligible"):
        sample_plackett_luce(scores, torch.tensor([2, 4, 1]), G(0), eligible)
    with pytest.raises(ValueError, match="row 1 asks for k = 5"):
        sample_plackett_luce(scores, 5, G(0), eligible)
    with pytest.raises(ValueError, match=">= 0"):
        sample_plackett_luce(scores, torch.tensor([1, -1, 1]), G(0), eligible)
    with pytest.raises(ValueError, match="generators for"):
        sample_plackett_luce(scores, 1, [G(0), G(1)], eligible)
    with pytest.raises(ValueError, match="explicit"):
        sample_plackett_luce(scores, 1, None, eligible)
    # temperature 0: deterministic top-k, the generator is not consumed
    g = G(9)
    state = g.get_state()
    greedy = sample_plackett_luce(scores, 3, g, temperature=0.0)
    assert torch.equal(greedy, scores.topk(3, dim=-1).indices) and torch.equal(g.get_state(), state)


def test_pl_sampling_per_row_generators_are_batch_independent():
    scores = torch.randn(4, 8, generator=G(2))
    eligible = torch.rand(4, 8, generator=G(3)) > 0.25
    eligible[:, :5] = True
    k = torch.tensor([3, 1, 5, 2])
    seeds = [11, 12, 13, 14]
    full = sample_plackett_luce(scores, k, [G(s) for s in seeds], eligible, temperature=1.3)
    for b in range(4):
        alone = sample_plackett_luce(scores[b:b + 1], k[b:b + 1], [G(seeds[b])], eligible[b:b + 1], temperature=1.3)
        assert alone[0].tolist() == full[b, :k[b]].tolist()
    rows = [2, 0]
    sub = sample_plackett_luce(scores[rows], k[rows], [G(seeds[r]) for r in rows], eligible[rows], temperature=1.3)
    for i, r in enumerate(rows):
        assert sub[i, :k[r]].tolist() == full[r, :k[r]].tolist()
    # the draws are random: other seeds give other orders
    draws = {tuple(sample_plackett_luce(scores[2:3], 5, [G(s)], eligible[2:3], 1.3)[0].tolist()) for s in range(20)}
    assert len(draws) > 5


# ------------------------------------------------------------------------------------------ token policy


def test_token_logprob_matches_manual_softmax():
    logits = torch.randn(2, 3, 5, generator=G(7), dtype=torch.float64) * 3
    tokens = torch.randint(0, 5, (2, 3), generator=G(8))
    T = 0.6
    got = token_logprob(logits, tokens, temperature=T)
    w = torch.exp(logits / T)
    manual = torch.log(w.gather(-1, tokens[..., None]).squeeze(-1) / w.sum(-1))
    assert got.shape == (2, 3) and torch.allclose(got, manual, rtol=1e-12)
    half = token_logprob(logits.to(torch.bfloat16), tokens)
    assert half.dtype == torch.float32
    assert torch.allclose(half, token_logprob(logits.to(torch.bfloat16).float(), tokens))
    with pytest.raises(ValueError):
        token_logprob(logits, tokens[:, :2])


def test_sample_tokens_argmax_at_zero_temperature_and_frequencies():
    logits = torch.randn(3, 4, 9, generator=G(1))
    g = G(5)
    state = g.get_state()
    assert torch.equal(sample_tokens(logits, 0.0, g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)  # the generator was not consumed
    assert torch.equal(sample_tokens(logits, 0.0, None), logits.argmax(-1))
    # frequencies match softmax(logits / T)
    row = torch.tensor([1.0, -0.3, 0.4, 2.0])
    n, T = 20000, 0.7
    draws = sample_tokens(row.expand(n, 4), T, G(2))
    emp = {i: c / n for i, c in Counter(draws.tolist()).items()}
    exact = dict(enumerate(torch.softmax(row / T, -1).tolist()))
    assert tv(emp, exact) < 0.02
    assert tv(emp, dict(enumerate(torch.softmax(row, -1).tolist()))) > 0.05  # T is applied
    # per-row generators: a row's draw does not depend on the rest of the batch
    full = sample_tokens(logits, 1.0, [G(21), G(22), G(23)])
    assert full.shape == (3, 4)
    assert torch.equal(sample_tokens(logits[1:2], 1.0, [G(22)])[0], full[1])
    other = sample_tokens(logits, 1.0, [G(31), G(32), G(33)])
    assert not torch.equal(full, other)  # the draws are random: other seeds, other tokens


# ------------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 1.0])
    a = group_advantages(r, 4)
    s1 = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    s3 = math.sqrt((2 ** 2 + 1 + 1 + 0) / 3)  # [3, 0, 0, 1]: mean 1
    expected = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 0, 0, 0, 0,
                2 / (s3 + 1e-4), -1 / (s3 + 1e-4), -1 / (s3 + 1e-4), 0.0]
    assert torch.allclose(a, torch.tensor(expected), atol=1e-6)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(group_advantages(torch.full((6,), 0.7), 3), torch.zeros(6))
    assert torch.equal(group_advantages(torch.ones(4), 1), torch.zeros(4))
    assert torch.allclose(group_advantages(r, 4, std="none"), torch.tensor(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 2, -1, -1, 0]))
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 2, -1, -1, 0])
    assert torch.allclose(group_advantages(r, 4, std="batch"), centred / (r.std() + 1e-4))
    assert torch.allclose(group_advantages(torch.tensor([True, False]), 2),
                          torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-4))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r, 5)
    with pytest.raises(ValueError):
        group_advantages(r, 0)
    with pytest.raises(ValueError):
        group_advantages(r.view(3, 4), 4)


# ------------------------------------------------------------------------------------------------ losses


def tiny_rollout(seed: int = 0):
    """A parametrised tiny policy and one recorded step: N=3 rollouts, S=2 steps, Lb=5 positions, V=4."""
    N, S, Lb, V = 3, 2, 5, 4
    theta = torch.randn(N, S, Lb, generator=G(seed), dtype=torch.float64, requires_grad=True)  # UPS scores
    phi = torch.randn(N, S, Lb, V, generator=G(seed + 1), dtype=torch.float64, requires_grad=True)  # logits
    with torch.no_grad():
        order = sample_plackett_luce(theta.reshape(N * S, Lb), torch.tensor([2, 3, 1, 2, 0, 4]), G(seed + 2))
        tokens = sample_tokens(phi, 1.0, G(seed + 3))  # (N, S, Lb)
        was_masked = torch.rand(N, S, Lb, generator=G(seed + 4)) > 0.3
        tok_mask = order_to_mask(order, Lb).view(N, S, Lb) & was_masked
        pl_mask = (order >= 0).any(-1).view(N, S)
    adv = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)

    def logps():
        tok = token_logprob(phi, tokens)  # (N, S, Lb)
        pl = plackett_luce_logprob(theta.reshape(N * S, Lb), order).view(N, S)  # (N, S)
        return tok, pl

    return theta, phi, logps, tok_mask, pl_mask, adv


def test_ratio_one_gives_the_reinforce_gradient_in_both_modes():
    theta, phi, logps, tok_mask, pl_mask, adv = tiny_rollout()
    assert tok_mask.any() and not pl_mask.all()
    tok, pl = logps()
    reinforce = -(adv[:, None, None] * torch.where(tok_mask, tok, 0.0)).sum() - (adv[:, None] * torch.where(
        pl_mask, pl, 0.0)).sum()
    ref = torch.autograd.grad(reinforce, [theta, phi])
    for mode in ("separate", "joint"):
        tok, pl = logps()
        loss, st = grpo_loss(tok, tok.detach(), tok_mask, pl, pl.detach(), pl_mask, adv, clip=0.2, mode=mode,
                             normaliser=1.0)
        got = torch.autograd.grad(loss, [theta, phi])
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, ref)), mode
        assert st["tok_ratio_mean"] == st["tok_ratio_max"] == st["pl_ratio_min"] == 1.0
        clip_keys = ["tok_clip_frac", "pl_clip_frac"] if mode == "separate" else ["joint_clip_frac"]
        assert all(st[key] == 0.0 for key in clip_keys)
    # the default normaliser divides by the number of rollouts
    tok, pl = logps()
    loss, st = grpo_loss(tok, tok.detach(), tok_mask, pl, pl.detach(), pl_mask, adv)
    assert st["normaliser"] == 3.0
    assert all(torch.allclose(a, b / 3) for a, b in zip(torch.autograd.grad(loss, [theta, phi]), ref))
    assert any(g.abs().max() > 1e-3 for g in ref)  # a real gradient


def test_clipped_surrogate_zero_gradient_past_the_clip():
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -1.0], dtype=torch.float64)
    new = (old + torch.tensor([0.5, 0.5, -0.5, -0.5, 0.1], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    loss, st = clipped_surrogate(new, old, adv, 0.2)
    (grad,) = torch.autograd.grad(loss, new)
    r_hi, r_lo, r_in = math.exp(0.5), math.exp(-0.5), math.exp(0.1)
    # 0: r > 1.2, A > 0 -> clipped, no gradient; 1: r > 1.2, A < 0 -> unclipped, d(-rA)/dlogp = -A r
    # 2: r < 0.8, A > 0 -> unclipped; 3: r < 0.8, A < 0 -> clipped, no gradient; 4: inside -> -A r
    assert torch.allclose(grad, torch.tensor([0.0, r_hi, -r_lo, 0.0, -2 * r_in], dtype=torch.float64))
    expected = -(1.2 * 1 + r_hi * -1 + r_lo * 1 + 0.8 * -1 + r_in * 2)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert st["clip_frac"] == pytest.approx(2 / 5)
    assert st["ratio_max"] == pytest.approx(r_hi) and st["ratio_min"] == pytest.approx(r_lo)
    # asymmetric clip (eps_low, eps_high): entry 0 is no longer clipped with eps_high = 0.7
    _, st2 = clipped_surrogate(new, old, adv, (0.2, 0.7))
    assert st2["clip_frac"] == pytest.approx(1 / 5)
    # masked-out entries may hold -inf: neither value nor gradient sees them
    new2 = torch.tensor([-1.0, float("-inf")], dtype=torch.float64, requires_grad=True)
    l2, st3 = clipped_surrogate(new2, torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.ones(2),
                                0.2, mask=torch.tensor([True, False]))
    l2.backward()
    assert l2.item() == -1.0 and torch.isfinite(new2.grad).all() and st3["count"] == 1.0


def test_joint_and_separate_agree_at_ratio_one_and_differ_after():
    theta, phi, logps, tok_mask, pl_mask, adv = tiny_rollout(seed=5)
    a_tok = adv[:, None, None].expand(tok_mask.shape)
    a_pl = adv[:, None].expand(pl_mask.shape)
    step_mask = pl_mask | tok_mask.any(-1)
    # ratio 1: identical gradients; the values are -sum A over each mode's terms (separate has a token term too)
    tok, pl = logps()
    ls, _ = grpo_loss(tok, tok.detach(), tok_mask, pl, pl.detach(), pl_mask, adv, mode="separate", normaliser=1.0)
    tok, pl = logps()
    lj, _ = grpo_loss(tok, tok.detach(), tok_mask, pl, pl.detach(), pl_mask, adv, mode="joint", normaliser=1.0)
    assert ls.item() == pytest.approx(-(a_tok[tok_mask].sum() + a_pl[pl_mask].sum()).item(), rel=1e-12)
    assert lj.item() == pytest.approx(-a_pl[step_mask].sum().item(), rel=1e-12)
    gs = torch.autograd.grad(ls, [theta, phi])
    gj = torch.autograd.grad(lj, [theta, phi])
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(gs, gj))
    # without token terms the two modes coincide in value as well
    none = torch.zeros_like(tok_mask)
    tok, pl = logps()
    v_s, _ = grpo_loss(tok, tok.detach(), none, pl, pl.detach(), pl_mask, adv, mode="separate")
    v_j, _ = grpo_loss(tok, tok.detach(), none, pl, pl.detach(), pl_mask, adv, mode="joint")
    assert v_s.item() == pytest.approx(v_j.item(), rel=1e-12)

    # move the ratios: the rollout policy is an older, perturbed one
    tok, pl = logps()
    tok_old = tok.detach() - 0.15 * torch.randn(tok.shape, generator=G(1), dtype=torch.float64)
    pl_old = pl.detach() - 0.3 * torch.randn(pl.shape, generator=G(2), dtype=torch.float64)
    ls, sts = grpo_loss(tok, tok_old, tok_mask, pl, pl_old, pl_mask, adv, mode="separate", normaliser=1.0)
    tok, pl = logps()
    lj, stj = grpo_loss(tok, tok_old, tok_mask, pl, pl_old, pl_mask, adv, mode="joint", normaliser=1.0)
    gs = torch.autograd.grad(ls, [theta, phi])
    gj = torch.autograd.grad(lj, [theta, phi])
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gs, gj))
    # the joint ratio of a (block, step) is exp(sum of its token log-ratios + its PL log-ratio)
    with torch.no_grad():
        jlr = torch.where(tok_mask, tok - tok_old, 0.0).sum(-1) + torch.where(pl_mask, pl - pl_old, 0.0)
        r = jlr.exp()[step_mask]
        A = a_pl[step_mask]
        surr = torch.minimum(r * A, r.clamp(0.8, 1.2) * A)
    assert lj.item() == pytest.approx(-surr.sum().item(), rel=1e-10)
    assert stj["joint_ratio_max"] == pytest.approx(r.max().item()) and stj["joint_ratio_min"] == pytest.approx(
        r.min().item())
    assert sts["tok_ratio_max"] == pytest.approx(stj["tok_ratio_max"])  # the per-factor diagnostics agree
    assert abs(ls.item() - lj.item()) > 1e-3
    assert 0 < stj["joint_clip_frac"] < 1
    with pytest.raises(ValueError, match="mode"):
        grpo_loss(tok, tok_old, tok_mask, pl, pl_old, pl_mask, adv, mode="both")


def test_kl_k3_and_kl_term_in_grpo_loss():
    assert kl_k3(torch.tensor(-1.0), torch.tensor(-1.5)).item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    assert kl_k3(torch.tensor(-2.0), torch.tensor(-2.0)).item() == 0.0
    # unbiased for KL(new || ref) when actions are drawn from new: E_new[k3] = KL, computed exactly
    p = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=torch.float64), -1)
    q = torch.softmax(torch.tensor([1.0, 0.5, -0.5, 0.0], dtype=torch.float64), -1)
    exp_k3 = (p * kl_k3(p.log(), q.log())).sum()
    assert exp_k3.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-12)
    assert exp_k3.item() != pytest.approx((q * (q / p).log()).sum().item(), rel=1e-3)  # not the reverse KL

    theta, phi, logps, tok_mask, pl_mask, adv = tiny_rollout(seed=2)
    tok, pl = logps()
    tok_ref = tok.detach() + 0.2
    pl_ref = pl.detach() - 0.4
    base, _ = grpo_loss(tok, tok.detach(), tok_mask, pl, pl.detach(), pl_mask, adv)
    with_kl, st = grpo_loss(tok, tok.detach(), tok_mask, pl, pl.detach(), pl_mask, adv, kl=(tok_ref, pl_ref),
                            kl_coef=0.05)
    k_tok = kl_k3(tok, tok_ref)[tok_mask].sum()
    k_pl = kl_k3(pl, pl_ref)[pl_mask].sum()
    assert (with_kl - base).item() == pytest.approx(0.05 * (k_tok + k_pl).item() / 3, rel=1e-10)
    assert st["kl_tok"] == pytest.approx(math.expm1(0.2) - 0.2) and st["kl_pl"] == pytest.approx(
        math.expm1(-0.4) + 0.4)
    only_stats, st0 = grpo_loss(tok, tok.detach(), tok_mask, pl, pl.detach(), pl_mask, adv, kl=(tok_ref, pl_ref))
    assert only_stats.item() == pytest.approx(base.item()) and st0["kl_pl"] > 0
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(tok, tok.detach(), tok_mask, pl, pl.detach(), pl_mask, adv, kl_coef=0.1)


# ---------------------------------------------------------------------------------- end-to-end learning


def train_first_pick(sign: float, iters: int = 150, group: int = 16, seed: int = 0) -> tuple:
    """A 6-position PL policy plus a token policy; reward 1 when position 2 is drawn first. Each iteration
    samples a group, takes two clipped policy-gradient steps on it (so ratios leave 1), returns q_2 before/after."""
    L, V = 6, 3
    theta = torch.zeros(L, requires_grad=True)
    phi = torch.zeros(L, V, requires_grad=True)
    opt = torch.optim.SGD([theta, phi], lr=0.5)
    gen = G(seed)
    start = torch.softmax(theta.detach(), -1)[2].item()
    for _ in range(iters):
        with torch.no_grad():
            order = sample_plackett_luce(theta.expand(group, L), 2, gen)  # (G, 2)
            tokens = sample_tokens(phi.expand(group, L, V), 1.0, gen)  # (G, L)
            adv = group_advantages((order[:, 0] == 2).float(), group)  # (G,)
            tok_mask = order_to_mask(order, L)[:, None]  # (G, 1, L)
            pl_old = plackett_luce_logprob(theta.expand(group, L), order)[:, None]  # (G, 1)
            tok_old = token_logprob(phi.expand(group, L, V), tokens)[:, None]  # (G, 1, L)
        for _ in range(2):
            pl_new = plackett_luce_logprob(theta.expand(group, L), order)[:, None]
            tok_new = token_logprob(phi.expand(group, L, V), tokens)[:, None]
            loss, _ = grpo_loss(tok_new, tok_old, tok_mask, pl_new, pl_old, torch.ones(group, 1, dtype=torch.bool),
                                adv, clip=0.2)
            opt.zero_grad()
            (sign * loss).backward()
            opt.step()
    return start, torch.softmax(theta.detach(), -1)[2].item()


@pytest.mark.slow
def test_grpo_loss_learns_to_draw_position_2_first():
    start, end = train_first_pick(+1.0)
    assert start == pytest.approx(1 / 6)
    assert end > 0.8
    # the sign matters: minimising the negated loss drives the probability down instead
    _, flipped = train_first_pick(-1.0, iters=40)
    assert flipped < start
