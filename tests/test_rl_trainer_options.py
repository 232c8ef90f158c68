"""Remask RL on the evaluated decision (issue 20) through the real trainer: greedy rollout tokens with
Plackett-Luce positions, leave-one-out / greedy-rollout baselines, per-block credit, cached features,
rollout batching, the static decoder, the greedy decode's statistics, the temperature probe, and every bad
combination refused before the model loads."""
import os
import json
from pathlib import Path

import pytest
import torch

from remedi.model.checkpoint import UPS_FILE_NAME
from remedi.model import loading
from remedi.rl import loss as L
from remedi.train_remask_rl import main
from tests.helpers.rl_trainer import (ROWS, _first_last, _learn, _ups_tensors, argv, make_trainer,  # noqa: F401
                                  run_two_processes, ups)

pytestmark = pytest.mark.usefixtures("one_thread")


def _lines(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("options", [
    ("--rollout_tokens", "greedy", "--advantage", "loo"),
    ("--rollout_tokens", "greedy", "--advantage", "loo", "--credit", "block"),
    ("--rollout_tokens", "greedy", "--advantage", "greedy", "--credit", "block"),
], ids=["greedy_tokens-loo", "greedy_tokens-loo-block", "greedy_tokens-greedy-block"])
@pytest.mark.slow
def test_the_evaluated_decision_learns_a_toy_reward_and_its_opposite(options, tiny_model_dir, data, ups, tmp_path):
    """Only the positions are stochastic (greedy tokens, as the eval sampler): maximising toy_remasks raises the
    remasks, maximising toy_no_remasks lowers them, with each new baseline and per-block credit. A flipped sign
    in the advantage, the block credit or the loss fails one of the two."""
    up = _learn(tiny_model_dir, data, ups["head"], tmp_path / "up", "toy_remasks", *options)
    first, last = _first_last([x["remasks_per_block"] for x in up])
    assert last > first + 1.0, [x["remasks_per_block"] for x in up]
    down = _learn(tiny_model_dir, data, ups["head"], tmp_path / "down", "toy_no_remasks", *options)
    first, last = _first_last([x["remasks_per_block"] for x in down])
    assert last < 0.5 * first, [x["remasks_per_block"] for x in down]
    # greedy tokens: no token terms at all; the greedy decode is logged and follows the trained policy
    assert all(x["tok_ratio_mean"] != x["tok_ratio_mean"] for x in up)  # NaN: no token term was counted
    g_first, g_last = _first_last([x["greedy_remasks_per_block"] for x in up])
    assert g_last > g_first, [x["greedy_remasks_per_block"] for x in up]
    for key in ("zero_advantage_share", "same_token_recommit_share", "rollouts_per_s", "greedy_reward_mean"):
        assert key in up[0], key


def _grads_after_one_update(args):
    tr = make_trainer(args)
    seen = {}

    def capture():
        seen.update({n: p.grad.detach().clone() for n, p in tr.lm.named_parameters() if p.grad is not None})
    tr.opt.step = capture
    rec = tr.run_update(0)
    return seen, rec


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("tokens, layout", [("sample", "block_causal"), ("greedy", "block_causal"),
                                           ("greedy", "bidirectional")])
def test_cached_features_give_the_recomputed_gradient(tokens, layout, tiny_model_dir, data, ups, tmp_path,
                                                      monkeypatch, clean_accelerate):
    """--cache_features scores the head from the rollout's hidden states: the same gradient (and KL) as the
    loss forward, and no loss forward runs at all."""
    common = ("--rollout_tokens", tokens, "--kl_coef", "0.1", "--layout", layout)
    ref, rec_ref = _grads_after_one_update(argv(tiny_model_dir, data, ups["head"], tmp_path / "a", *common))

    def no_forward(*a, **k):
        raise AssertionError("the loss ran a forward although the features were cached")
    monkeypatch.setattr(L, "step_logprobs", no_forward)
    got, rec = _grads_after_one_update(argv(tiny_model_dir, data, ups["head"], tmp_path / "b", *common,
                                            "--cache_features"))
    assert ref.keys() == got.keys() and ref and all(k.startswith("ups_head.") for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-4)
    assert rec["reward_mean"] == rec_ref["reward_mean"]
    assert abs(rec["pl_ratio_max"] - 1) < 1e-5 and abs(rec["loss"] - rec_ref["loss"]) < 1e-5


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("extra", [("--rollout_batch", "3"), ("--rollout_graphs",)], ids=["batch3", "graphs"])
def test_batched_and_static_rollouts_give_the_same_update(extra, tiny_model_dir, data, ups, tmp_path,
                                                          clean_accelerate):
    """--rollout_batch 3 (chunks that split groups; the loss follows the chunks) and the static decoder
    (--rollout_graphs, uncaptured on a CPU) change nothing but the speed."""
    ref, rec_ref = _grads_after_one_update(argv(tiny_model_dir, data, ups["head"], tmp_path / "a",
                                                "--advantage", "greedy"))
    got, rec = _grads_after_one_update(argv(tiny_model_dir, data, ups["head"], tmp_path / "b",
                                            "--advantage", "greedy", *extra))
    for key in ("reward_mean", "remasks_per_block", "greedy_remasks_per_block", "zero_advantage_share"):
        assert rec[key] == pytest.approx(rec_ref[key], abs=1e-6), key
    assert ref.keys() == got.keys() and ref
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_block_credit_reaches_the_gradient(tiny_model_dir, data, ups, tmp_path, clean_accelerate):
    """Per-block credit on the same rollouts: block 0's reward-to-go is the whole reward, later blocks get
    less, so the gradient differs from sequence credit (the credit is wired, not dropped)."""
    opts = ("--reward", "toy_remasks", "--advantage", "loo", "--rollout_tokens", "greedy")
    seq, rec_seq = _grads_after_one_update(argv(tiny_model_dir, data, ups["head"], tmp_path / "a", *opts))
    blk, rec_blk = _grads_after_one_update(argv(tiny_model_dir, data, ups["head"], tmp_path / "b", *opts,
                                                "--credit", "block"))
    assert rec_seq["reward_mean"] == rec_blk["reward_mean"]
    assert all(torch.isfinite(blk[k]).all() for k in blk)
    assert any(not torch.allclose(seq[k], blk[k], atol=1e-6) for k in seq)


def test_resume_is_exact_with_the_new_options(tiny_model_dir, data, ups, tmp_path):
    opts = ("--rollout_tokens", "greedy", "--advantage", "greedy", "--credit", "block", "--reward", "toy_remasks",
            "--cache_features", "--rollout_batch", "3", "--max_updates", "4", "--save_every", "2")
    full = main(argv(tiny_model_dir, data, ups["head"], tmp_path / "full", *opts))
    part = tmp_path / "part"
    first = main(argv(tiny_model_dir, data, ups["head"], part, *opts, "--stop_after_updates", "2"))
    assert first["stopped"]
    main(argv(tiny_model_dir, data, ups["head"], part, *opts, "--resume", "--probe_temperatures", "0.5"))
    a, b = _ups_tensors(Path(full["paths"]["ups"])), _ups_tensors(part / UPS_FILE_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], _ups_tensors(ups["head"])[k]) for k in a)
    la, lb = _lines(tmp_path / "full"), _lines(part)
    assert [x["reward_mean"] for x in la] == [x["reward_mean"] for x in lb]
    assert [x["greedy_remasks_per_block"] for x in la] == [x["greedy_remasks_per_block"] for x in lb]


def test_greedy_baseline_works_with_groups_of_one_and_the_probe_table(tiny_model_dir, data, ups, tmp_path, capsys):
    """--advantage greedy needs no group (its baseline is the greedy decode); --probe_temperatures prints the
    remasks/block of rollouts at each position temperature against the greedy decode: a near-zero
    temperature with greedy tokens is the greedy decode itself."""
    out = tmp_path / "g1"
    main(argv(tiny_model_dir, data, ups["head"], out, "--rollout_tokens", "greedy", "--advantage", "greedy",
              "--group_size", "1", "--max_updates", "1", "--probe_temperatures", "0.0001,50"))
    probe = json.loads((out / "probe.json").read_text())
    rows = {r["ups_temperature"]: r for r in probe["rows"]}
    assert set(rows) == {0.0, 0.0001, 50.0} and probe["tokens"] == "greedy"
    assert rows[0.0001]["remasks_per_block"] == rows[0.0]["remasks_per_block"]
    assert rows[50.0]["pl_entropy"] > rows[0.0001]["pl_entropy"]
    assert all(r["greedy_remasks_per_block"] == rows[0.0]["remasks_per_block"] for r in rows.values())
    table = capsys.readouterr().out
    assert "remasks/block" in table and "greedy" in table and "50" in table
    assert _lines(out)[0]["rollouts"] == 2


@pytest.mark.parametrize("extra, msg", [
    (("--rollout_tokens", "greedy", "--rollout_positions", "top_k"), "nothing to learn"),
    (("--advantage", "loo", "--group_size", "1"), "--advantage loo needs --group_size >= 2"),
    (("--advantage", "mean"), "--advantage 'mean': choose one of group, loo, greedy"),
    (("--credit", "block"), "--credit block needs a reward with per-block parts"),
    (("--reward", "math_verify", "--reward_weight", "0.3"), "--reward_weight is read by"),
    (("--reward", "math_verify+equation_truth", "--reward_weight", "-1"), "--reward_weight must be a number >= 0"),
    (("--rollout_graphs", "--train", "ups_lora"), "--rollout_graphs runs the bare model"),
    (("--cache_features", "--train", "ups_lora"), "--cache_features needs a frozen backbone"),
    (("--cache_features", "--ups_head", "STREAM"), "is a stream UPS"),
    (("--probe_temperatures", "0.1,hot"), "--probe_temperatures '0.1,hot': a comma list"),
    (("--probe_temperatures", "0.1,0"), "every temperature must be > 0"),
    (("--rollout_batch", "-1"), "--rollout_batch must be >= 0"),
    (("--rollout_positions", "top_p"), "--rollout_positions 'top_p': choose"),
])
def test_bad_combinations_are_refused_before_the_model_loads(extra, msg, tiny_model_dir, data, ups, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    extra = tuple(str(ups["stream"]) if x == "STREAM" else x for x in extra)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("+", r"\+")) as err:
        main(argv(tiny_model_dir, data, ups["head"], tmp_path / "out", *extra))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_two_processes_match_one_with_cached_features(tiny_model_dir, data, ups, tmp_path):
    """--cache_features scores the head outside the DDP wrapper and averages its gradient by hand, and
    --rollout_graphs decodes with the bare model under DDP: two CPU processes (gloo, torchrun) give the
    single-process update."""
    common = ("--max_updates", "2", "--rollout_tokens", "greedy", "--advantage", "loo", "--cache_features",
              "--rollout_batch", "3", "--reward", "toy_remasks", "--rollout_graphs")
    one = main(argv(tiny_model_dir, data, ups["head"], tmp_path / "one", *common))
    run_two_processes(argv(tiny_model_dir, data, ups["head"], tmp_path / "two", *common), timeout=float(os.environ.get("TP_TIMEOUT", 300)))
    la, lb = _lines(tmp_path / "one"), _lines(tmp_path / "two")
    assert [x["update"] for x in lb] == [1, 2]
    for key in ("reward_mean", "remasks_per_block", "greedy_remasks_per_block", "zero_advantage_share"):
        assert la[0][key] == pytest.approx(lb[0][key], abs=1e-6), key
    assert abs(la[0]["grad_norm"] - lb[0]["grad_norm"]) < 1e-4 * la[0]["grad_norm"]
    a, b = _ups_tensors(Path(one["paths"]["ups"])), _ups_tensors(tmp_path / "two" / UPS_FILE_NAME)
    for k in a:
        if a[k].numel() > 1:  # the output bias: Plackett-Luce is shift-invariant (see test_two_processes_match_one)
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
