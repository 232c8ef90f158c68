"""The Monte-Carlo ELBO of remedi.evaluation.likelihood, without lm-eval: exact where it must be, pinned to
the adapter's estimate before it moved out of harness.py, and LLaDA's unsupervised CFG."""
from __future__ import annotations

import pytest
import torch

from remedi.evaluation.likelihood import guided_logits, mc_loglikelihood, mc_mask_counts
from remedi.model.checkpoint import load_pretrained
from remedi.session import item_generator

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = 0  # <|mdm_mask|> of the tiny tokenizer
# two (context, continuation) pairs of the tiny tokenizer: "Janet has 3 apples" + " #### 7", "The answer is" + " 12"
PAIRS = [([47, 70, 83, 74, 89, 226, 77, 70, 88, 226, 24, 226, 70, 85, 85, 81, 74, 88], [226, 8, 8, 8, 8, 226, 28]),
         ([57, 77, 74, 226, 70, 83, 88, 92, 74, 87, 226, 78, 88], [226, 22, 23])]
# RemediLM.mc_loglikelihood on the same model, pairs and item ids (seed 0, mc_num 8) before the move
PINNED = [-53.8091904570659, -21.43625718355179]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu").eval()


def _gens(ids=("a", "b")):
    return [item_generator(0, f"ll:{i}") for i in ids]


def test_cfg_zero_is_the_pinned_estimate_for_any_forward_batch(model):
    for bs in (5, 32, 1):
        out = mc_loglikelihood(model, MASK, PAIRS, _gens(), mc_num=8, mc_batch_size=bs)
        assert [v for v, _ in out] == pytest.approx(PINNED, abs=1e-4), bs
        assert mc_loglikelihood(model, MASK, PAIRS, _gens(), mc_num=8, mc_batch_size=bs, cfg_scale=0.0) == out


def _log_p_last(model, ids, cfg_scale=0.0, lc=None):
    """log p of the last token with it masked; with cfg, guided by the copy whose context is masked too."""
    x = torch.tensor([ids[:-1] + [MASK]])
    with torch.no_grad():
        cond = model(x).logits[0, -1].double()
        if cfg_scale:
            un = x.clone()
            un[:, :lc] = MASK
            cond = guided_logits(cond, model(un).logits[0, -1].double(), cfg_scale)
    return torch.log_softmax(cond, -1)[ids[-1]].item()


def test_one_token_is_exact_with_and_without_cfg(model):
    ctx, cont = PAIRS[1][0], PAIRS[1][1][:1]
    exact0 = _log_p_last(model, ctx + cont)
    exact2 = _log_p_last(model, ctx + cont, cfg_scale=2.0, lc=len(ctx))
    (est0, _), = mc_loglikelihood(model, MASK, [(ctx, cont)], _gens("c"), mc_num=3)
    (est2, _), = mc_loglikelihood(model, MASK, [(ctx, cont)], _gens("c"), mc_num=3, cfg_scale=2.0)
    assert est0 == pytest.approx(exact0, abs=1e-4) and est2 == pytest.approx(exact2, abs=1e-4)
    assert abs(est2 - est0) > 1e-3  # guidance changes the score


def test_cfg_changes_the_estimate_and_keeps_the_draws(model):
    plain = mc_loglikelihood(model, MASK, PAIRS, _gens(), mc_num=8)
    stats: dict = {}
    guided = mc_loglikelihood(model, MASK, PAIRS, _gens(), mc_num=8, cfg_scale=1.0, stats=stats)
    assert all(abs(g - p) > 1e-3 for (g, _), (p, _) in zip(guided, plain))
    assert stats["rows"] == 2 * (8 + 8)  # every sample scored twice (with and without the context)
    with pytest.raises(ValueError, match="cfg_scale"):
        mc_loglikelihood(model, MASK, PAIRS, _gens(), cfg_scale=-1.0)
    with pytest.raises(ValueError, match="empty continuation"):
        mc_loglikelihood(model, MASK, [([1, 2], [])], _gens("e"))


def test_mc_mask_counts_are_stratified():
    g = torch.Generator().manual_seed(0)
    for L, n in ((1, 5), (3, 9), (5, 7), (4, 128)):
        counts = mc_mask_counts(L, n, g)
        assert len(counts) == n and all(1 <= c <= L for c in counts)
        per = [counts.count(v) for v in range(1, L + 1)]
        assert max(per) - min(per) <= 1, (L, n, per)  # spread evenly over {1..L}
