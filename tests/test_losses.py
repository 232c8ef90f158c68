"""TPS/UPS losses against hand-computed values; AUROC against the pairwise definition."""
import math

import pytest
import torch

from remedi.training.losses import (UPSMetrics, auroc, auroc_reference, tps_loss, true_token_logprob, ups_labels,
                           ups_loss)


def test_tps_loss_hand_computed():
    # one row, 4 positions: prompt, masked, masked, clean answer token; V = 2
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0], [5.0, 0.0]]])
    x0 = torch.tensor([[1, 0, 1, 0]])
    answer = torch.tensor([[False, True, True, True]])
    masked = torch.tensor([[False, True, True, False]])
    p_mask = torch.full((1, 4), 0.5)
    logp, ok = true_token_logprob(logits, x0, masked)
    # p(x0=0 | logits log3, 0) = 3/4; p(x0=1 | 0, 0) = 1/2
    assert torch.allclose(logp, torch.tensor([[0.0, math.log(0.75), math.log(0.5), 0.0]]))
    assert ok.tolist() == [[False, True, False, False]]  # the tie argmax is 0 != 1
    expected = (-math.log(0.75) / 0.5 - math.log(0.5) / 0.5) / 3  # sum CE / p_mask, over answer length 3
    assert tps_loss(logp, masked, p_mask, answer).item() == pytest.approx(expected, rel=1e-6)


def test_tps_loss_batch_mean_and_reference_loop(gen):
    B, L, V = 3, 9, 7
    logits = torch.randn(B, L, V, generator=gen)
    x0 = torch.randint(0, V, (B, L), generator=gen)
    answer = torch.zeros(B, L, dtype=torch.bool)
    for b, start in enumerate([2, 4, 6]):
        answer[b, start:] = True
    masked = answer & (torch.rand(B, L, generator=gen) < 0.6)
    p_mask = torch.rand(B, 1, generator=gen).expand(B, L) * 0.9 + 0.1
    logp, _ = true_token_logprob(logits, x0, masked)
    ref = 0.0
    for b in range(B):
        s = 0.0
        for i in range(L):
            if masked[b, i]:
                s += -torch.log_softmax(logits[b, i], -1)[x0[b, i]].item() / p_mask[b, i].item()
        ref += s / answer[b].sum().item()
    assert tps_loss(logp, masked, p_mask, answer).item() == pytest.approx(ref / B, rel=1e-5)


def test_tps_loss_has_no_nan_gradient_where_p_mask_is_zero():
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    x0 = torch.tensor([[1, 2, 3]])
    masked = torch.tensor([[False, True, False]])
    p_mask = torch.tensor([[0.0, 0.5, 0.0]])
    logp, _ = true_token_logprob(logits, x0, masked)
    tps_loss(logp, masked, p_mask, torch.ones(1, 3, dtype=torch.bool)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0].abs().sum() == 0


def test_ups_labels_and_smoothing():
    clean = torch.tensor([[True, False, False, False]])
    inc = torch.tensor([[False, True, False, False]])
    masked = torch.tensor([[False, False, True, False]])
    p = torch.tensor([[0.3, 0.3, 0.4, 0.3]], requires_grad=True)
    y = ups_labels(clean, inc, masked, p)
    assert y[0].tolist() == pytest.approx([1.0, 0.0, 0.4, 0.0])
    assert not y.requires_grad  # stop-gradient on p(x0 | x_t)
    ys = ups_labels(clean, inc, masked, p, smoothing=True)
    assert ys[0].tolist() == pytest.approx([0.95, 0.05, 0.05 + 0.9 * 0.4, 0.0])


def test_ups_loss_hand_computed():
    h = torch.tensor([[0.0, 2.0, -1.0, 9.0]])
    y = torch.tensor([[1.0, 0.0, 0.25, 0.0]])
    answer = torch.tensor([[True, True, True, False]])  # the last position is prompt: excluded

    def bce(h, y):
        s = 1 / (1 + math.exp(-h))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    expected = (bce(0.0, 1.0) + bce(2.0, 0.0) + bce(-1.0, 0.25)) / 3
    assert ups_loss(h, y, answer).item() == pytest.approx(expected, rel=1e-6)


def test_auroc_matches_pairwise_definition(gen):
    for n in [5, 40, 200]:
        scores = torch.randint(0, 6, (n,), generator=gen).float()  # many ties
        pos = torch.rand(n, generator=gen) < 0.4
        if pos.all() or not pos.any():
            continue
        assert auroc(scores, pos) == pytest.approx(auroc_reference(scores, pos), abs=1e-12)
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, True, True])) == 1.0
    assert auroc(torch.tensor([3.0, 2.0]), torch.tensor([True, False])) == 1.0


def test_ups_metrics_by_set():
    m = UPSMetrics()
    h = torch.tensor([[3.0, 2.0, -1.0, -2.0, 1.0, -1.0, 0.5]])
    clean = torch.tensor([[True, True, False, False, False, False, False]])
    inc = torch.tensor([[False, False, True, True, False, False, False]])
    masked = torch.tensor([[False, False, False, False, True, True, True]])
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.9, 0.2, 0.1]])
    ok = torch.tensor([[False, False, False, False, True, False, False]])
    m.update(h, labels, clean, inc, masked, ok)
    out = m.compute()
    assert out["ups_acc_clean"] == 1.0 and out["ups_acc_incorrect"] == 1.0
    assert out["ups_acc_masked"] == pytest.approx(2 / 3)  # 0.5 scored >= 0 but label 0.1
    assert out["auroc_unmasked"] == 1.0 and out["auroc_masked"] == 1.0
    assert out["n_masked"] == 3 and out["tps_acc_masked"] == pytest.approx(1 / 3)
    assert m.compute()["n_clean"] == 0  # compute resets
