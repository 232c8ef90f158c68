"""Remask SFT noise: rates match the formulas, sets partition the answer, replacements are valid."""
import math

import pytest
import torch

from remedi.training.noise import (R_INCORRECT_MAX, answer_block_index, check_r_incorrect, inject_noise, ordinary_ids,
                          rho_incorrect, rho_mask, total_noise)

SPECIAL = [0, 1, 2, 3, 4, 5]
V = 40


def batch(B=2000, L=48, prompt=8, gen=None):
    x0 = torch.randint(6, V, (B, L), generator=gen)
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, prompt:] = True
    return x0, answer


@pytest.mark.parametrize("schedule", ["linear", "llada"])
@pytest.mark.parametrize("t_val", [0.1, 0.5, 0.9])
def test_rates_match_formulas(schedule, t_val, gen):
    x0, answer = batch(gen=gen)
    r = 0.2
    t = torch.full(x0.shape, t_val)
    nz = inject_noise(x0, answer, mask_id=0, r_incorrect=r, generator=gen, vocab_size=V, special_ids=SPECIAL,
                      schedule=schedule, t=t)
    n_ans = int(answer.sum())
    pm = float(rho_mask(torch.tensor(t_val), schedule))
    pi = float(rho_incorrect(torch.tensor(t_val), r))
    frac_mask = nz.masked.sum().item() / n_ans
    assert abs(frac_mask - pm) < 5 * math.sqrt(pm * (1 - pm) / n_ans)
    n_unmasked = n_ans - nz.masked.sum().item()
    frac_inc = nz.incorrect.sum().item() / n_unmasked
    assert abs(frac_inc - pi) < 5 * math.sqrt(pi * (1 - pi) / n_unmasked) + 1e-9


def test_sets_partition_answer_and_prompt_untouched(gen):
    x0, answer = batch(B=64, gen=gen)
    nz = inject_noise(x0, answer, mask_id=0, r_incorrect=0.25, generator=gen, vocab_size=V, special_ids=SPECIAL)
    sets = [nz.masked, nz.incorrect, nz.clean]
    assert torch.equal(sets[0] | sets[1] | sets[2], answer)
    assert not (sets[0] & sets[1]).any() and not (sets[0] & sets[2]).any() and not (sets[1] & sets[2]).any()
    assert torch.equal(nz.x_t[~answer], x0[~answer])
    assert (nz.x_t[nz.masked] == 0).all() and torch.equal(nz.x_t[nz.clean], x0[nz.clean])
    assert (nz.x_t[nz.incorrect] != x0[nz.incorrect]).all()
    assert nz.incorrect.any() and nz.masked.any()


def test_t_is_uniform_per_row(gen):
    x0, answer = batch(B=4000, L=12, gen=gen)
    nz = inject_noise(x0, answer, mask_id=0, r_incorrect=0.1, generator=gen, vocab_size=V, special_ids=SPECIAL)
    t = nz.t[:, 0]
    assert (nz.t == t[:, None]).all()
    assert abs(t.mean().item() - 0.5) < 0.02 and abs(t.var().item() - 1 / 12) < 0.01
    assert torch.allclose(nz.p_mask, nz.t)


def test_block_times(gen):
    B, L, P, bl = 6, 40, 5, 8
    x0 = torch.randint(6, V, (B, L), generator=gen)
    answer = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        answer[b, P + b:] = True  # rows with different prompt lengths
    nz = inject_noise(x0, answer, mask_id=0, r_incorrect=0.1, generator=gen, vocab_size=V, special_ids=SPECIAL,
                      block_length=bl, schedule="llada")
    blk = answer_block_index(answer, bl)
    for b in range(B):
        start = P + b
        for k in range(0, (L - start + bl - 1) // bl):
            seg = nz.t[b, start + k * bl: start + (k + 1) * bl]
            assert (seg == seg[0]).all()
            assert (blk[b, start + k * bl: start + (k + 1) * bl] == k).all()
        assert len({float(v) for v in nz.t[b, start:]}) > 1  # blocks draw their own times
    assert torch.allclose(nz.p_mask, (1 - 1e-3) * nz.t + 1e-3)


@pytest.mark.parametrize("source", ["vocab", "batch"])
def test_replacements_valid(source, gen):
    x0, answer = batch(B=400, gen=gen)
    x0[:, -4:] = 1  # EOS padding inside the answer (a special token in x0)
    x0[:, 10:30] = 7  # make 7 frequent
    nz = inject_noise(x0, answer, mask_id=0, r_incorrect=0.25, generator=gen, vocab_size=V, special_ids=SPECIAL,
                      incorrect_source=source, t=torch.full(x0.shape, 0.5))
    rep = nz.x_t[nz.incorrect]
    assert (rep != x0[nz.incorrect]).all()
    assert not torch.isin(rep, torch.tensor(SPECIAL)).any()
    assert ((rep >= 0) & (rep < V)).all()
    if source == "batch":
        assert torch.isin(rep, torch.unique(x0[answer])).all()
        counts = torch.bincount(rep, minlength=V).float()
        assert counts[7] > 3 * counts[8:].mean()  # unigram weighting
    else:
        counts = torch.bincount(rep, minlength=V).float()
        others = torch.cat([counts[6:7], counts[8:]])  # 7 fills 20 columns, so it is rarely a replacement
        assert others.min() > 0.5 * others.mean()  # roughly uniform over the ordinary vocabulary


def test_batch_source_with_one_token_falls_back_to_vocab(gen):
    x0 = torch.full((4, 30), 9)
    answer = torch.ones_like(x0, dtype=torch.bool)
    nz = inject_noise(x0, answer, mask_id=0, r_incorrect=0.25, generator=gen, vocab_size=V, special_ids=SPECIAL,
                      incorrect_source="batch", t=torch.full(x0.shape, 0.5))
    assert nz.incorrect.any() and (nz.x_t[nz.incorrect] != 9).all()


def test_deterministic_given_generator():
    x0, answer = batch(B=8, gen=torch.Generator().manual_seed(0))
    a = inject_noise(x0, answer, mask_id=0, r_incorrect=0.1, generator=torch.Generator().manual_seed(5),
                     vocab_size=V, special_ids=SPECIAL)
    b = inject_noise(x0, answer, mask_id=0, r_incorrect=0.1, generator=torch.Generator().manual_seed(5),
                     vocab_size=V, special_ids=SPECIAL)
    c = inject_noise(x0, answer, mask_id=0, r_incorrect=0.1, generator=torch.Generator().manual_seed(6),
                     vocab_size=V, special_ids=SPECIAL)
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t)
    assert not torch.equal(a.x_t, c.x_t)


def test_monotonicity_condition():
    t = torch.linspace(0, 1, 10001, dtype=torch.float64)
    for r in [0.0, 0.05, 0.1, 0.2, R_INCORRECT_MAX]:
        tot = total_noise(t, r, "linear")
        assert (tot.diff() >= -1e-12).all(), r
        assert (tot <= 1 + 1e-12).all() and (rho_incorrect(t, r) <= r + 1e-12).all()
    for r in [0.26, 0.5]:
        assert not (total_noise(t, r, "linear").diff() >= 0).all()
        with pytest.raises(ValueError, match="r_incorrect"):
            check_r_incorrect(r)
    with pytest.raises(ValueError, match="r_incorrect"):
        check_r_incorrect(-0.01)
    # llada's schedule keeps the condition for r <= (1 - eps) / 4
    assert (total_noise(t, (1 - 1e-3) / 4, "llada").diff() >= -1e-12).all()


def test_ordinary_ids():
    ids = ordinary_ids(10, [0, 3, None, 99])
    assert ids.tolist() == [1, 2, 4, 5, 6, 7, 8, 9]
