"""scripts/residual_experiment.py: the mechanism counters, the slip detector, and a tiny eval run on CPU."""
import json
import sys
from pathlib import Path

import pytest

from remedi.policy.slip import equation_is_true, false_result_positions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import residual_experiment as X  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slip_detector_flags_only_false_results():
    pieces = ["3", " +", " ", "4", "5", " =", " ", "4", "9", ".", " ", "2", " *", " ", "3", " =", " ", "6"]
    assert false_result_positions(pieces) == [7, 8]  # 3 + 45 = 49 is false, 2 * 3 = 6 is true
    assert equation_is_true("12", "/", "4", "3") and not equation_is_true("7", "/", "2", "3")


def test_recommit_share_counts_same_and_changed_tokens():
    traj = [{"remasked": [], "unmasked": [0, 1], "tokens": [5, 6, None]},
            {"remasked": [0, 1], "unmasked": [2], "tokens": [None, None, 7]},
            {"remasked": [], "unmasked": [0, 1], "tokens": [5, 9, 7]}]
    assert X.recommit_share(traj) == (2, 1)


def test_tiny_eval_writes_results_summary_and_mechanism(tmp_path, capsys):
    out = tmp_path / "rx"
    s = X.main(["--out", str(out), "--phase", "eval", "--n_items", "2", "--steps_list", "6", "--device", "cpu",
                "--mechanism_items", "1"])
    names = {r["policy"] for r in s["rows"]}
    assert {"entropy", "tps_prob", "margin", "entropy_unmask_only", "mix_0.2_untrained", "slip_oracle", "slip_repredict",
            "slip_repredict_true"} <= names
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * len(names)
    assert all(r["remasks"] == 0 for r in recs if r["source"] == "entropy_unmask_only")
    assert json.loads((out / "summary.json").read_text())["rows"] == s["rows"]
    assert "McNemar p" in capsys.readouterr().out
    again = X.main(["--out", str(out), "--phase", "eval", "--n_items", "2", "--steps_list", "6", "--device", "cpu",
                    "--mechanism_items", "1"])  # resumes: nothing new decoded
    assert len((out / "results.jsonl").read_text().splitlines()) == len(recs) and again["rows"] == s["rows"]


# --------------------------------------------------------------------------------------------- --phase rl
SMOKE_RL = ["--rl_updates", "2", "--rl_prompts", "2", "--rl_group", "2", "--no_rl_probe", "--device", "cpu"]


def _winner(out: Path) -> Path:
    """The shipped residual (the round-3 CMA winner, searched on the default --ups_head) as search/linear's
    output, so the rl tests need no search."""
    import shutil

    from remedi.model.loading import EMBEDDED_MODEL

    dst = out / "search" / X.WINNER / "ups_mean.pt"
    dst.parent.mkdir(parents=True)
    shutil.copyfile(EMBEDDED_MODEL / "ups_residual.pt", dst)
    return dst


def test_rl_variants_are_one_switch_each_and_pass_the_trainers_checks():
    """Every variant's command line parses and resolves in the RL trainer (the checks that refuse bad flag
    combinations, before any weights load), on CPU and with the GPU's --rollout_graphs; each differs from the
    recommended recipe in one thing."""
    from remedi.arguments import ModelArgs, parse_args
    from remedi.model.loading import EMBEDDED_MODEL
    from remedi.rl.args import RLArgs

    seen = {}
    for device in ("cpu", "cuda"):
        a = X.ExperimentArgs(out="runs/x", device=device)
        for v in X.RL_VARIANTS:
            argv = X.rl_argv(a, v, resume=False)
            assert ("--rollout_graphs" in argv) == (device == "cuda")
            m, r = parse_args([ModelArgs, RLArgs], argv)
            r.resolve(EMBEDDED_MODEL, True)
            assert (r.cache_features, r.save_every, m.dtype, r.mixed_precision) == (True, 1, "fp32", "no")
            seen[v] = {**vars(r), "output_dir": None}
    ref = seen[X.RL_RECOMMENDED]
    assert (ref["rollout_tokens"], ref["advantage"], ref["credit"], ref["reward"]) == (
        "greedy", "loo", "block", "math_verify+equation_truth")
    assert ref["group_size"] * ref["prompts_per_update"] >= 1000
    diffs = {v: {k for k in ref if seen[v][k] != ref[k]} for v in X.RL_VARIANTS}
    assert diffs == {X.RL_RECOMMENDED: set(), "sampled_tokens": {"rollout_tokens", "temperature"},
                     "binary_reward": {"reward"}, "sequence_credit": {"credit"}, "greedy_baseline": {"advantage"},
                     "old_budget": {"group_size", "prompts_per_update", "max_updates"}}
    assert seen["sampled_tokens"]["temperature"] == 1.0
    assert seen["old_budget"]["group_size"] * seen["old_budget"]["prompts_per_update"] == 64


def test_unknown_rl_variant_is_refused():
    with pytest.raises(ValueError, match="--rl_variant 'nope': choose one of greedy_loo_shaped_block"):
        X.ExperimentArgs(rl_variant="nope")
    with pytest.raises(ValueError, match="--rl_updates must be >= 1"):
        X.ExperimentArgs(rl_updates=0)


def test_rl_without_the_cma_winner_is_one_error_line_before_any_model_loads(tmp_path, monkeypatch):
    import remedi.model.loading
    import remedi.train_remask_rl

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(remedi.train_remask_rl, "main", boom)
    monkeypatch.setattr(remedi.model.loading, "load_model", boom)
    with pytest.raises(ValueError) as e:
        X.main(["--out", str(tmp_path / "rx"), "--phase", "rl", *SMOKE_RL])
    msg = str(e.value)
    assert "\n" not in msg and "search/linear/ups_mean.pt" in msg and "--phase search --variant linear" in msg
    assert not (tmp_path / "rx" / "rl").exists()


def test_rl_phase_resumes_and_its_policy_is_an_eval_row(tmp_path, caplog):
    """Call 1 runs out of time after one update (a checkpoint, no final file): the eval shows the checkpoint as
    rl_<v>_update1. Call 2 resumes there (the update count continues) and writes ups.safetensors, which the
    eval loads as rl_<v> with the trained weights of g; call 3 sees the run done."""
    import logging

    from remedi.model.checkpoint import read_ups

    out = tmp_path / "rx"
    winner = _winner(out)
    run = out / "rl" / X.RL_RECOMMENDED
    first = X.main(["--out", str(out), "--phase", "rl", *SMOKE_RL, "--max_seconds", "0.001"])
    assert first["stopped"] and first["update"] == 1 and not (run / "ups.safetensors").exists()
    ev = ["--out", str(out), "--phase", "eval", "--n_items", "1", "--steps_list", "6", "--device", "cpu",
          "--mechanism_items", "1"]
    names = {r["policy"] for r in X.main(ev)["rows"]}
    assert {"cma_linear", f"rl_{X.RL_RECOMMENDED}_update1"} <= names and f"rl_{X.RL_RECOMMENDED}" not in names
    with caplog.at_level(logging.INFO):
        second = X.main(["--out", str(out), "--phase", "rl", *SMOKE_RL])
    assert not second["stopped"] and second["update"] == 2
    assert "resumed from" in caplog.text and "update-000001" in caplog.text
    metrics = [json.loads(x)["update"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2]
    state, meta = read_ups(run / "ups.safetensors")
    assert meta["rl"]["update"] == 2 and meta["kind"] == "residual"
    s = X.main(ev)
    names = {r["policy"] for r in s["rows"]}
    assert f"rl_{X.RL_RECOMMENDED}" in names and f"rl_{X.RL_RECOMMENDED}_update1" not in names
    assert X.main(["--out", str(out), "--phase", "rl", *SMOKE_RL]) is None  # done: nothing trains
    # the eval's row is the trained g read from that file, not the winner it started from
    import torch

    from remedi.decoding.args import SamplingArgs
    from remedi.session import open_session

    a = X.ExperimentArgs(out=str(out), device="cpu")
    session = open_session(X._embedded(), SamplingArgs(steps=6, gen_length=96, block_length=32), ups_head=a.ups_head)
    session.load("cpu", "fp32")
    row = X.policies(a, session, session.tokenizer)[f"rl_{X.RL_RECOMMENDED}"][1]
    assert torch.equal(row.weight.detach().cpu(), state["ups_policy.weight"])
    assert not torch.equal(state["ups_policy.weight"], read_ups(winner)[0]["ups_policy.weight"])


@pytest.mark.slow
def test_phase_all_smoke_searches_trains_rl_from_the_winner_and_evaluates_it(tmp_path):
    """The CPU smoke end to end: the search's own winner file is what the RL trainer starts from."""
    out = tmp_path / "rx"
    s = X.main(["--out", str(out), "--phase", "all", "--n_items", "1", "--problems", "2", "--generations", "1",
                "--popsize", "2", "--search_steps", "6", "--steps_list", "6", "--mechanism_items", "1", *SMOKE_RL])
    names = {r["policy"] for r in s["rows"]}
    assert {f"cma_{v}" for v in X.VARIANTS} | {f"rl_{X.RL_RECOMMENDED}"} <= names
    assert (out / "rl" / X.RL_RECOMMENDED / "ups.safetensors").is_file()
    assert not any((out / "rl" / v).exists() for v in X.RL_VARIANTS if v != X.RL_RECOMMENDED)


# ------------------------------------------------------------------------------------ the learned count
def test_extra_hidden_counts_positions_hidden_beyond_the_schedule():
    """K_n = 1, 2 for a block of 2 in 2 steps; a learned count that shows nothing at step 1 hid one position."""
    traj = [{"block": 0, "span": [0, 2], "tokens": [None, None, None, None]},  # K_1 = 1, 0 visible
            {"block": 0, "span": [0, 2], "tokens": [5, 6, None, None]},  # K_2 = 2, 2 visible
            {"block": 1, "span": [2, 4], "tokens": [5, 6, 7, None]},  # as scheduled
            {"block": 1, "span": [2, 4], "tokens": [5, 6, 7, 8]}]
    assert X.extra_hidden(traj, [1, 2]) == (1, 2)


def test_learned_count_variant_searches_tau_and_is_an_eval_row(tmp_path):
    """--phase search --variant learned_count writes a UPS with tau; the eval picks it up as cma_learned_count and
    records its positions hidden beyond K_n in the mechanism."""
    from remedi.model.checkpoint import read_ups, read_ups_meta

    out = tmp_path / "rx"
    X.main(["--out", str(out), "--phase", "search", "--variant", "learned_count", "--problems", "2", "--popsize", "2",
            "--generations", "1", "--search_steps", "6", "--device", "cpu"])
    path = out / "search" / "learned_count" / "ups_mean.pt"
    assert read_ups_meta(path)["residual"]["hide_threshold"] is True and "ups_policy.hide_tau" in read_ups(path)[0]
    s = X.main(["--out", str(out), "--phase", "eval", "--n_items", "1", "--steps_list", "6", "--device", "cpu",
                "--mechanism_items", "1"])
    assert "cma_learned_count" in {r["policy"] for r in s["rows"]}
    mech = {m["policy"]: m for m in s["mechanism"]}
    assert mech["entropy"]["extra_hidden_per_block"] == 0 and mech["cma_learned_count"]["extra_hidden_per_block"] >= 0
