"""The learned count of extra hidden positions (a residual UPS's hide threshold tau, remedi.model.residual): off it
decides exactly as before; on, kept positions scoring below tau are hidden anyway (more remasks, fewer visible after a
non-final step) and every block still ends fully decoded; eager == static decoder with no host read; the UPS file
keeps tau and older files load without it; Remask RL refuses it; the search's --learn_hide adds one dimension whose
start is the off policy's decisions."""
import dataclasses
import json

import pytest
import torch

from remedi.decoding.sampler import SamplerConfig, generate
from remedi.decoding.step import decide, rank_select, select_top_k, unmask_schedule
from remedi.model.checkpoint import build_residual, load_ups, read_ups, read_ups_meta, save_ups
from remedi.model.loading import EMBEDDED_MODEL, SpecialIds, load_for_inference
from remedi.model.residual import ResidualUPS, attach_policy, new_residual

pytestmark = pytest.mark.usefixtures("one_thread")
FEATS = ("entropy", "margin", "logp_tok", "masked", "pos", "progress", "digit", "result_digit", "base")


CFG = SamplerConfig(strategy="ups", gen_length=64, block_length=32, steps=32)  # 16 steps a block: K_n = 2n


def _run(loaded, prompts, policy, cfg=CFG):
    attach_policy(loaded.model, policy)
    try:
        return generate(loaded.model, prompts, cfg, loaded.ids)
    finally:
        attach_policy(loaded.model, None)


def _policy(loaded, tau=None, seed=None):
    """A residual over FEATS with tau (None: off) and, with a seed, small random linear weights."""
    pol = new_residual(loaded.model, loaded.tokenizer, features=FEATS, hide_threshold=tau)
    if seed is not None:
        w = 0.3 * torch.randn(pol.weight.numel() + 1, generator=torch.Generator().manual_seed(seed))
        pol.set_linear_weights(w)
    return pol


def _same(a, b):
    return [g.tokens for g in a] == [g.tokens for g in b] and \
        [g.remasks_per_block for g in a] == [g.remasks_per_block for g in b]


# --------------------------------------------------------------------------------------------- decide itself
def _step_inputs(eos_candidates=False):
    """One block of 6: positions 0 (confident) and 1 (uncertain) visible, 2..5 masked (2, 4 confident; 3, 5 not)."""
    V = 10
    ids = SpecialIds(mask=0, eos=1, pad=1)
    logits = torch.zeros(1, 6, V)
    logits[..., 0] = -torch.inf  # the mask, as prepare_logits leaves it
    for i, t in ((0, 3), (2, 5), (4, 6)):
        logits[0, i, t] = 30.0  # one-hot: entropy ~0
    if eos_candidates:  # 3 and 5 become confident EOS candidates (-inf under confidence_eos_eot_inf)
        logits[0, 3, 1] = logits[0, 5, 1] = 30.0
    cur = torch.tensor([[3, 4, 0, 0, 0, 0]])
    return ids, logits, cur, logits.argmax(-1)


@pytest.mark.parametrize("select", [select_top_k, rank_select])
def test_decide_hides_kept_positions_below_tau_except_when_k_covers_the_block(select):
    ids, logits, cur, x0 = _step_inputs()
    pol = ResidualUPS(4, torch.zeros(10), features=("entropy",), hide_threshold=-0.5)
    off = ResidualUPS(4, torch.zeros(10), features=("entropy",))
    cfg = SamplerConfig(strategy="ups", gen_length=6, block_length=6, steps=6)

    def step(policy, k, c=cfg):
        return decide(c, ids, logits, None, cur, x0, None, torch.tensor([k]), None, select, scorer=policy)

    # k 5: the top 5 are 0, 2, 4 (confident) then 1, 3 (uncertain, earlier first); tau hides 1 (a remask) and 3
    new, masked, remasked, _ = step(pol, 5)
    assert (new[0] != ids.mask).nonzero().squeeze(1).tolist() == [0, 2, 4]
    assert remasked[0].nonzero().squeeze(1).tolist() == [1]  # visible before, hidden now; 3 was masked already
    new_off, _, rem_off, _ = step(off, 5)
    assert (new_off[0] != ids.mask).sum() == 5 and not rem_off.any()  # off: exactly K_n visible, as before
    # k = block length (the last step): nothing is hidden, the block is fully visible
    new, _, remasked, _ = step(pol, 6)
    assert (new != ids.mask).all() and not remasked.any()
    # tau far below (the search's start): the decision of the policy without a threshold
    low = ResidualUPS(4, torch.zeros(10), features=("entropy",), hide_threshold=pol.threshold_at(0.0))
    assert torch.equal(step(low, 4)[0], step(off, 4)[0])
    # the EOS rule's -inf is not the residual score: a kept EOS candidate is not hidden by the start's tau
    ids, logits, cur, x0 = _step_inputs(eos_candidates=True)
    eos_cfg = dataclasses.replace(cfg, confidence_eos_eot_inf=True)
    a, b = step(low, 5, eos_cfg)[0], step(off, 5, eos_cfg)[0]
    assert torch.equal(a, b) and (a[0] == ids.eos).any()


# ------------------------------------------------------------------------------------------ decoding
def test_off_and_the_search_start_decide_exactly_as_before(embedded, prompts):
    entropy = generate(embedded.model, prompts, dataclasses.replace(CFG, strategy="entropy"), embedded.ids)
    assert _same(_run(embedded, prompts, _policy(embedded)), entropy)  # no threshold: the anchor
    start = _policy(embedded, tau=0.0)
    start.set_search_point([0.0] * len(start.search_columns()))  # the search's start: theta 0
    assert start.search_columns()[-1] == "hide_theta" and float(start.hide_tau) < -7.8  # below -log 945
    assert _same(_run(embedded, prompts, start), entropy)
    moved = _run(embedded, prompts, _policy(embedded, seed=1))  # non-zero g, off
    assert not _same(moved, entropy)
    assert _same(_run(embedded, prompts, _policy(embedded, tau=-torch.inf, seed=1)), moved)


@pytest.mark.parametrize("theta", [0.3, 0.6])
def test_a_high_tau_hides_more_and_every_block_still_ends_decoded(embedded, prompts, theta):
    """Re-derives every step from the trajectory: visible after = top-K_n by score minus those below tau (all of the
    block at its last step); remasked = visible before and masked after, including kept positions tau hid."""
    cfg = dataclasses.replace(CFG, record_trajectory=True)
    pol = _policy(embedded, tau=0.0)
    pol.set_search_point([0.0] * (len(pol.search_columns()) - 1) + [theta])  # tau -0.96, -0.12
    tau = float(pol.hide_tau)
    got = _run(embedded, prompts, pol, cfg)
    K = unmask_schedule(32, 16)
    short = by_tau = 0
    for g in got:
        assert embedded.ids.mask not in g.tokens
        prev = None
        for i, st in enumerate(g.trajectory):
            lo, hi, n = *st["span"], i % 16
            top = sorted(range(lo, hi), key=lambda p: (-st["conf"][p], p))[:K[n]]  # the fixed schedule's choice
            want = top if n == 15 else [p for p in top if st["conf"][p] >= tau]
            visible = [p for p in range(lo, hi) if st["tokens"][p] is not None]
            assert visible == sorted(want)
            assert n < 15 or len(visible) == 32  # the block's last step shows every position
            short += len(visible) < K[n]
            before = [False] * len(st["tokens"]) if prev is None else [t is not None for t in prev]
            assert st["remasked"] == [p for p in range(lo, hi) if before[p] and st["tokens"][p] is None]
            by_tau += sum(before[p] and st["conf"][p] < tau for p in top) if n < 15 else 0
            prev = st["tokens"]
        assert g.remasks == sum(len(st["remasked"]) for st in g.trajectory)
    assert short > 0 and by_tau > 0  # fewer than K_n visible after some steps; tau remasked visible positions


def test_static_decoder_equals_eager_with_tau(embedded, prompts):
    pol = _policy(embedded, tau=0.0, seed=2)
    pol.hide_tau.fill_(pol.threshold_at(0.5))
    eager = _run(embedded, prompts, pol)
    static = _run(embedded, prompts, pol, dataclasses.replace(CFG, graphs=True, graph_capture=False))
    assert _same(static, eager)
    assert not _same(eager, _run(embedded, prompts, _policy(embedded, seed=2)))  # tau reaches the decision


def test_hide_threshold_static_step_reads_nothing_from_the_host():
    """tau is read in place inside the static step: no host read from a block's first step to its end."""
    from tests.helpers.sampler import _model
    from tests.helpers.sync import assert_static_equals_eager_without_host_reads

    m = _model()
    V = m.config.vocab_size
    pol = ResidualUPS(m.config.d_model, torch.randint(0, 5, (V,), generator=torch.Generator().manual_seed(0)),
                      features=("entropy", "base", "pos"), hide_threshold=-1.0)
    attach_policy(m, pol)
    assert_static_equals_eager_without_host_reads(m, SamplerConfig(strategy="ups", steps=8, gen_length=16,
                                                                   block_length=8))


# ---------------------------------------------------------------------------------------------- files
def test_file_round_trip_keeps_tau(tmp_path, embedded, prompts):
    pol = _policy(embedded, tau=-0.25, seed=3)
    attach_policy(embedded.model, pol)
    try:
        path = save_ups(tmp_path / "count.pt", embedded.model)
    finally:
        attach_policy(embedded.model, None)
    meta = read_ups_meta(path)
    assert meta["kind"] == "residual" and meta["residual"]["hide_threshold"] is True
    state, _ = read_ups(path)
    assert float(state["ups_policy.hide_tau"]) == -0.25
    loaded = load_for_inference(str(EMBEDDED_MODEL), ups_head=str(path), device="cpu")
    assert float(loaded.model.ups_policy.hide_tau) == -0.25
    got = generate(loaded.model, prompts[:2], CFG, loaded.ids)
    assert _same(got, _run(embedded, prompts[:2], pol))
    # a spec that promises tau without the tensor is an incomplete file
    pol_state = {k.removeprefix("ups_policy."): v for k, v in state.items() if k.startswith("ups_policy.")}
    del pol_state["hide_tau"]
    with pytest.raises(ValueError, match="do not match"):
        build_residual(meta["residual"], pol_state, embedded.model.config.d_model, path)


def test_an_older_residual_file_loads_without_a_threshold(tmp_path, embedded):
    """The shipped ups_residual.pt predates tau: no hide_threshold in its spec, no hide_tau tensor."""
    old = EMBEDDED_MODEL / "ups_residual.pt"
    meta = read_ups_meta(old)
    state, _ = read_ups(old)
    assert meta["kind"] == "residual" and "hide_threshold" not in meta["residual"]
    assert "ups_policy.hide_tau" not in state
    loaded = load_for_inference(str(EMBEDDED_MODEL), ups_head=str(old), device="cpu")
    pol = loaded.model.ups_policy
    assert pol.hide_tau is None and pol.search_columns()[-1] == "bias"
    assert pol.hide_below_threshold(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([2])) is None
    path = save_ups(tmp_path / "resaved.pt", loaded.model)  # re-saved: says it has none, still no tensor
    assert read_ups_meta(path)["residual"]["hide_threshold"] is False
    assert "ups_policy.hide_tau" not in read_ups(path)[0]
    other = load_for_inference(str(EMBEDDED_MODEL), ups_head=str(EMBEDDED_MODEL / "ups_head.pt"), device="cpu")
    load_ups(path, other.model)
    assert other.model.ups_policy.hide_tau is None


# ------------------------------------------------------------------------------------------ RL, search
def test_remask_rl_refuses_a_hide_threshold():
    from remedi.decoding.step import PolicyRule, policy_decide
    from remedi.rl.rollout import rollout
    from tests.helpers.block_causal import make
    from tests.helpers.rl import IDS, PROMPTS, cfg, gens

    m = make("head")
    pol = ResidualUPS(m.config.d_model, torch.zeros(m.config.vocab_size), hide_threshold=-1.0)
    attach_policy(m, pol)
    with pytest.raises(ValueError, match="hide threshold"):
        rollout(m, PROMPTS, cfg(positions="top_k"), IDS, gens(4))
    with pytest.raises(ValueError, match="hide threshold"):
        policy_decide(PolicyRule(), IDS, torch.zeros(1, 4, 8), torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.long),
                      {}, torch.tensor([2]), scorer=pol)


def test_threshold_map_starts_below_every_anchor_score_and_rises():
    pol = ResidualUPS(4, torch.zeros(945), hide_threshold=0.0)
    assert pol.threshold_at(0.0) == pytest.approx(-torch.log(torch.tensor(945.0)).item() - 1.0)
    assert pol.threshold_at(0.3) == pytest.approx(-0.96, abs=0.01)
    taus = [pol.threshold_at(t) for t in (-1.0, 0.0, 0.3, 0.6, 0.9, 2.0)]
    assert taus == sorted(taus) and taus[-1] < 0.0
    for anchor in ("tps_prob", "margin", "none"):
        p = ResidualUPS(4, torch.zeros(945), anchor=anchor, hide_threshold=0.0)
        assert p.threshold_at(0.0) == pytest.approx(-1.0)  # 1 below the lowest anchor score, 0
    with pytest.raises(ValueError, match="search point"):
        pol.set_search_point([0.0] * pol.weight.numel())  # weights + bias + theta: two short


def test_search_with_learn_hide_has_one_more_dimension_and_carries_tau(tmp_path):
    from remedi.policy.search import main

    def run(out, *extra):
        return main(["--out", str(out), "--problems", "4", "--popsize", "2", "--generations", "1", "--steps", "8",
                     "--gen_length", "32", "--batch_size", "4", "--device", "cpu", "--features", "entropy,base",
                     *extra])

    plain, count = run(tmp_path / "plain"), run(tmp_path / "count", "--learn_hide")
    cols = json.loads((tmp_path / "count" / "settings.json").read_text())["feature_columns"]
    assert cols == ["entropy", "base", "bias", "hide_theta"]
    assert len(count["history"][0]["mean"]) == len(plain["history"][0]["mean"]) + 1 == 4
    # the start (theta 0) decides as the off policy: the same anchor accuracy on the same problems
    assert count["history"][0]["anchor_accuracy"] == plain["history"][0]["anchor_accuracy"]
    meta = read_ups_meta(tmp_path / "count" / "ups_mean.pt")
    theta = count["history"][0]["mean"][-1]
    assert meta["residual"]["hide_threshold"] is True and meta["search"]["hide_theta"] == theta
    state, _ = read_ups(tmp_path / "count" / "ups_mean.pt")
    pol = ResidualUPS(4, torch.zeros(945), hide_threshold=0.0)
    assert float(state["ups_policy.hide_tau"]) == pytest.approx(pol.threshold_at(theta))
    assert "ups_policy.hide_tau" not in read_ups(tmp_path / "plain" / "ups_mean.pt")[0]


def test_a_search_saved_before_learn_hide_existed_still_resumes():
    from remedi.policy.search import _same_run

    old = {"model": {}, "search": {"problems": 4, "generations": 1}}  # a state.pt written before the flag
    new = {"model": {}, "search": {"problems": 4, "generations": 2, "learn_hide": False}}
    assert _same_run(old) == _same_run(new)
    assert _same_run(old) != _same_run({**new, "search": {**new["search"], "learn_hide": True}})
