"""The Remask-RL loop: what trains, exact resume, learning a toy reward (and unlearning it with the sign
flipped), faults, and the script end to end on the embedded model."""
import json
from pathlib import Path

import pytest
import torch

from remedi.model.checkpoint import read_ups
from remedi.model import loading
from remedi.rl import trainer as T
from remedi.train_remask_rl import main
from remedi.training.runtime import Diverged, NonFiniteLoss
from tests.helpers.rl_trainer import (ROWS, _first_last, _learn, _ups_tensors, argv, make_trainer,  # noqa: F401
                                      run_two_processes, ups)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.filterwarnings("ignore:Detected call of")  # the optimiser step is replaced by a probe
@pytest.mark.parametrize("arch, train", [("head", "ups"), ("stream", "ups"), ("head", "ups_lora")])
def test_gradients_reach_only_the_intended_parameters(arch, train, tiny_model_dir, data, ups, tmp_path,
                                                      clean_accelerate):
    tr = make_trainer(argv(tiny_model_dir, data, ups[arch], tmp_path / "out", "--train", train))
    seen = {}

    def capture():  # called instead of the optimiser step: the gradients as the step would see them
        for n, p in tr.lm.named_parameters():
            seen[n] = (p.requires_grad, p.grad is not None and bool(p.grad.abs().sum() > 0))
    tr.opt.step = capture
    tr.run_update(0)
    ups_prefix = ("ups_head.",) if arch == "head" else ("model.blocks_upm", "model.backprop", "model.ln_f_upm",
                                                         "model.linear_confidence")
    for n, (req, has) in seen.items():
        is_ups = n.startswith(ups_prefix)
        is_lora = "lora_" in n
        if is_ups:
            assert req and has, n
        elif is_lora:
            assert train == "ups_lora" and req, n
            if "lora_B" in n:  # B starts at zero, so only B has a gradient at the first step
                assert has, n
        else:
            assert not req and not has, n  # the backbone is frozen
    assert any("lora_B" in n for n in seen) == (train == "ups_lora")


@pytest.mark.slow
def test_resume_is_exact(tiny_model_dir, data, ups, tmp_path):
    full = tmp_path / "full"
    r = main(argv(tiny_model_dir, data, ups["head"], full, "--max_updates", "4", "--save_every", "2"))
    assert r["update"] == 4 and not r["stopped"]
    part = tmp_path / "part"
    first = main(argv(tiny_model_dir, data, ups["head"], part, "--max_updates", "4", "--save_every", "2",
                      "--stop_after_updates", "2"))
    assert first["stopped"] and first["update"] == 2 and not (part / "ups.safetensors").exists()
    with (part / "metrics.jsonl").open("a") as f:  # a line a killed run wrote after its last checkpoint
        f.write(json.dumps({"update": 3, "reward_mean": 9.0}) + "\n")
    second = main(argv(tiny_model_dir, data, ups["head"], part, "--max_updates", "4", "--save_every", "2",
                       "--resume"))
    assert second["update"] == 4
    a, b = _ups_tensors(full / "ups.safetensors"), _ups_tensors(part / "ups.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = _ups_tensors(ups["head"])
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the run did train
    la = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [x["update"] for x in lb] == [1, 2, 3, 4]
    assert [x["reward_mean"] for x in la] == [x["reward_mean"] for x in lb]
    with pytest.raises(ValueError, match="different arguments"):
        main(argv(tiny_model_dir, data, ups["head"], part, "--max_updates", "4", "--resume", "--clip", "0.3"))


@pytest.mark.slow
def test_the_ups_learns_a_toy_reward_and_its_opposite(tiny_model_dir, data, ups, tmp_path):
    """Remasks are decided by the position policy alone: maximising toy_remasks must raise them, maximising
    toy_no_remasks must lower them (a flipped sign anywhere in rollout -> loss -> step fails one of the two).
    Backbone frozen, UPS head only."""
    up = [x["remasks_per_block"] for x in _learn(tiny_model_dir, data, ups["head"], tmp_path / "up", "toy_remasks")]
    first, last = _first_last(up)
    assert last > first + 1.0, up
    down = [x["remasks_per_block"] for x in _learn(tiny_model_dir, data, ups["head"], tmp_path / "down",
                                                   "toy_no_remasks")]
    first, last = _first_last(down)
    assert last < 0.5 * first, down


@pytest.mark.slow
def test_lora_learns_a_token_reward(tiny_model_dir, data, ups, tmp_path):
    """toy_even_tokens needs the token policy: with LoRA on the backbone the even fraction rises."""
    even = [x["reward_mean"] for x in _learn(tiny_model_dir, data, ups["head"], tmp_path / "even", "toy_even_tokens",
                                             "--train", "ups_lora")]
    first, last = _first_last(even)
    assert last > first + 0.2, even


@pytest.mark.slow
def test_script_end_to_end_on_the_embedded_model(tmp_path):
    out = tmp_path / "rl"
    r = main(["--device", "cpu", "--output_dir", str(out), "--max_updates", "2", "--group_size", "2",
              "--prompts_per_update", "2", "--arith_n", "60", "--steps", "24", "--save_every", "1",
              "--save_ups_head", str(tmp_path / "ups_rl.pt")])
    assert r["update"] == 2 and Path(r["paths"]["ups"]) == tmp_path / "ups_rl.pt"
    state, meta = read_ups(tmp_path / "ups_rl.pt")
    assert meta["ups_arch"] == "head" and meta["rl"]["update"] == 2 and state
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["update"] for x in lines] == [1, 2]
    for key in ("reward_mean", "reward_std", "accuracy", "remasks_per_block", "pl_entropy", "tok_ratio_mean",
                "pl_ratio_max", "tok_clip_frac", "pl_clip_frac", "grad_norm", "rollout_seconds", "update_seconds"):
        assert key in lines[0], key
    assert abs(lines[0]["tok_ratio_mean"] - 1) < 1e-5 and abs(lines[0]["pl_ratio_max"] - 1) < 1e-4
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "latest.json").is_file()
    saved = json.loads((out / "args.json").read_text())
    assert saved["gen_length"] == 96 and saved["block_length"] == 32  # the embedded model's defaults.json
    assert saved["layout"] == "bidirectional" and saved["cache"] == "none"  # its training view


@pytest.mark.parametrize("flag, make_bad, msg", [
    ("--output_dir", lambda p: (p / "file").write_text("x") and p / "file", "is a file"),
    ("--save_ups_head", lambda p: p, "is a folder"),
])
def test_bad_output_path_fails_before_the_model_loads(flag, make_bad, msg, tiny_model_dir, data, ups, tmp_path,
                                                      monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(loading, "load_pretrained", boom)
    bad = make_bad(tmp_path)
    args = argv(tiny_model_dir, data, ups["head"], tmp_path / "out") + [flag, str(bad)]
    with pytest.raises(ValueError, match=msg):
        main(args)


def test_existing_run_needs_resume(tiny_model_dir, data, ups, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "args.json").write_text("{}")
    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match="already holds a run"):
        main(argv(tiny_model_dir, data, ups["head"], out))


def test_divergence_and_non_finite_stop_with_a_message(tiny_model_dir, data, ups, tmp_path, monkeypatch):
    real = T.rollout

    def shifted(*a, **k):  # old log-probs that the loss forward cannot reproduce
        b = real(*a, **k)
        b.pl_logp += 3.0
        return b
    monkeypatch.setattr(T, "rollout", shifted)
    with pytest.raises(Diverged, match="disagree with the rollout"):
        main(argv(tiny_model_dir, data, ups["head"], tmp_path / "a"))
    monkeypatch.setattr(T, "rollout", real)
    real_loss = T.step_loss

    def nan_loss(*a, **k):
        loss, st = real_loss(*a, **k)
        st["loss"] = float("nan")
        return loss * float("nan"), st
    monkeypatch.setattr(T, "step_loss", nan_loss)
    with pytest.raises(NonFiniteLoss, match="non-finite loss at update 1"):
        main(argv(tiny_model_dir, data, ups["head"], tmp_path / "b"))


def test_no_ups_is_refused_before_loading(tiny_model_dir, data, tmp_path):
    args = argv(tiny_model_dir, data, "x", tmp_path / "out")
    i = args.index("--ups_head")
    del args[i:i + 2]
    with pytest.raises(ValueError, match="has no UPS"):
        main(args)


@pytest.mark.parametrize("arch, train", [("head", "ups"), ("stream", "ups"), ("stream", "ups_lora")])
def test_exports_from_a_gathered_state_dict_equal_the_direct_ones(arch, train, tiny_model_dir, data, ups, tmp_path,
                                                                   clean_accelerate):
    """Under FSDP the UPS / LoRA files are written from accelerate's gathered state dict: same tensors."""
    from safetensors.torch import load_file

    tr = make_trainer(argv(tiny_model_dir, data, ups[arch], tmp_path / "out", "--train", train))
    full = tr.acc.get_state_dict(tr.model)
    tr._write_ups(tmp_path / "direct.pt", 0, None)
    tr._write_ups(tmp_path / "gathered.pt", 0, full)
    (a, ma), (b, mb) = read_ups(tmp_path / "direct.pt"), read_ups(tmp_path / "gathered.pt")
    assert a.keys() == b.keys() and a and ma["ups_arch"] == mb["ups_arch"] == arch
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k
    if train == "ups_lora":
        tr._write_lora(tmp_path / "lora_direct", None)
        tr._write_lora(tmp_path / "lora_gathered", full)
        la = load_file(str(tmp_path / "lora_direct" / "adapter_model.safetensors"))
        lb = load_file(str(tmp_path / "lora_gathered" / "adapter_model.safetensors"))
        assert la.keys() == lb.keys() and la
        assert all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, data, ups, tmp_path):
    """Two CPU processes (gloo DDP through accelerate, launched with torchrun) split each update's prompts; the
    rollouts are seeded per (update, prompt, group index), so the run equals the single-process one."""
    common = ["--max_updates", "2", "--prompts_per_update", "2", "--save_every", "1"]
    one = main(argv(tiny_model_dir, data, ups["head"], tmp_path / "one", *common))
    run_two_processes(argv(tiny_model_dir, data, ups["head"], tmp_path / "two", *common))
    la = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["update"] for x in lb] == [1, 2]
    assert la[0]["reward_mean"] == lb[0]["reward_mean"] and la[0]["remasks_per_block"] == lb[0]["remasks_per_block"]
    assert abs(la[0]["grad_norm"] - lb[0]["grad_norm"]) < 1e-4 * la[0]["grad_norm"]
    a, b = _ups_tensors(Path(one["paths"]["ups"])), _ups_tensors(tmp_path / "two" / "ups.safetensors")
    # the head's output bias shifts every score of a block equally, and Plackett-Luce is shift-invariant: its
    # gradient is 0 up to rounding, which Adam's normalisation turns into +-lr steps of either sign
    bias = [k for k in a if a[k].numel() == 1]
    assert bias == ["ups_head.net.2.bias"]
    for k in a:
        if k not in bias:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_kl_to_the_starting_policy(tiny_model_dir, data, ups, tmp_path):
    """--kl_coef > 0: the k3 KL to the starting weights is 0 at the first update and grows once the UPS moves."""
    r = main(argv(tiny_model_dir, data, ups["stream"], tmp_path / "kl", "--kl_coef", "0.1", "--max_updates", "3"))
    lines = [json.loads(x) for x in (Path(r["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert abs(lines[0]["kl_pl"]) < 1e-6 and abs(lines[0]["kl_tok"]) < 1e-6
    assert lines[-1]["kl_pl"] > 1e-6 and lines[-1]["kl_tok"] > 0  # the stream moves the token policy too
