"""The shared training loop: modes, gradient isolation, end-to-end scripts, checkpoints, resume, faults."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from remedi.training import build as B
from remedi.training import step as S
from remedi.training.args import DataArgs, LoraArgs, SftArgs, TrainArgs, default_taps, lora_target_modules, plan_from
from remedi.training.build import lr_lambda
from remedi.training.loop import NonFiniteLoss, Trainer
from remedi.training.state import latest_checkpoint
from remedi.model.checkpoint import read_ups, save_ups
from remedi.arguments import ModelArgs, parse_args
from remedi.model.config import get_config
from remedi.model.loading import load_for_inference
from remedi.model.llada import RemeDiLM, UPSHead
from remedi.train_remask_lora import main as lora_main
from remedi.train_remask_sft import main as sft_main
from tests.conftest import shared_data_dir, train_argv

# tiny matrices: one thread is faster, and immune to spin-waiting when the CPU is shared
pytestmark = pytest.mark.usefixtures("one_thread", "clean_accelerate")

ROWS = [{"question": f"Tom has {i} apples and buys {i % 7 + 2} more. How many?",
         "answer": f"{i} + {i % 7 + 2} = {i + i % 7 + 2}. #### {i + i % 7 + 2}"} for i in range(24)]


base = train_argv


def trainer_for(script, argv):
    """A set-up Trainer (model built, nothing trained) for white-box checks."""
    extra_cls = LoraArgs if script == "lora" else SftArgs
    m, d, t, e = parse_args([ModelArgs, DataArgs, TrainArgs, extra_cls], argv)
    tr = Trainer(m, d, t, plan_from(e, script))
    tr.setup()
    return tr


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


# ------------------------------------------------------------------------------------------ small pieces
def test_default_taps_and_lora_targets():
    assert default_taps(32) == (0, 10, 20, 30)
    assert default_taps(4) == (0, 1, 2, 3) and default_taps(6) == (0, 1, 3, 5)
    assert lora_target_modules("q_proj,ff_out") == r".*transformer\.blocks\.\d+\.(q_proj|ff_out)$"
    with pytest.raises(ValueError, match="--lora_target"):
        lora_target_modules("lm_head")


def test_lr_schedule_warmup_cosine():
    t = TrainArgs(warmup_steps=2, lr_scheduler="cosine", min_lr_ratio=0.1)
    f = lr_lambda(t, 10)
    assert [round(f(s), 4) for s in (0, 1)] == [round(1 / 3, 4), round(2 / 3, 4)]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)


# ------------------------------------------------------------------------------------------ bad flags
def test_bad_flags_fail_before_model_load(tiny_model_dir, data, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(B, "load_pretrained", boom)
    with pytest.raises(ValueError, match="--r_incorrect 0.3 is outside"):
        sft_main(base(tiny_model_dir, data, tmp_path / "a", "--r_incorrect", "0.3"))
    with pytest.raises(ValueError, match=r"field\(s\) \['problem'\] not found; fields found: \['answer', 'question'\]"):
        sft_main(base(tiny_model_dir, data, tmp_path / "b", "--prompt_field", "problem"))
    with pytest.raises(ValueError, match="use train_remask_lora.py"):
        sft_main(base(tiny_model_dir, data, tmp_path / "c", "--lora_r", "8"))
    with pytest.raises(ValueError, match="use train_remask_lora.py"):
        sft_main(base(tiny_model_dir, data, tmp_path / "c", "--train_backbone", "lora"))
    other = RemeDiLM(get_config("test-tiny", d_model=32, n_heads=4, n_kv_heads=4))
    other.attach_head(UPSHead(32))
    save_ups(tmp_path / "other.pt", other)
    with pytest.raises(ValueError, match="hidden size 32"):
        sft_main(base(tiny_model_dir, data, tmp_path / "d", "--load_ups_head", str(tmp_path / "other.pt")))
    with pytest.raises(ValueError, match="--seq_len 999 exceeds"):
        sft_main(base(tiny_model_dir, data, tmp_path / "e", "--seq_len", "999"))
    with pytest.raises(ValueError, match="--lambda_ups 0"):
        sft_main(base(tiny_model_dir, data, tmp_path / "f", "--ups_arch", "none", "--train_backbone", "full"))
    with pytest.raises(ValueError, match="--resume needs"):
        sft_main(["--resume", "--model_name", str(tiny_model_dir)])


# ------------------------------------------------------------------------------------------ isolation
def test_head_frozen_backbone_only_head_trains(tiny_model_dir, data, tmp_path):
    tr = trainer_for("sft", base(tiny_model_dir, data, tmp_path / "r", "--max_steps", "3", "--lr", "1e-2"))
    before = snapshot(tr.lm)
    assert all(not p.requires_grad for p in tr.lm.model.parameters())
    # the backbone runs without autograd: the TPS loss is only logged
    x0, answer = torch.randint(6, 100, (2, 16)), torch.ones(2, 16, dtype=torch.bool)
    m = answer.clone()
    m[:, ::2] = False
    res = tr.step_module(x0, x0, answer, m, torch.zeros_like(m), ~m, torch.full((2, 16), 0.5))
    assert not res["tps_loss"].requires_grad and res["ups_loss"].requires_grad
    tr.train()
    assert changed(before, tr.lm) == {n for n in before if n.startswith("ups_head.")}


def test_lora_joint_isolation(tiny_model_dir, data, tmp_path):
    tr = trainer_for("lora", base(tiny_model_dir, data, tmp_path / "r", "--max_steps", "3", "--lora_r", "4",
                                  "--lr_lora", "1e-2", "--lr_ups", "1e-2"))
    before = snapshot(tr.lm)
    # the UPS loss alone reaches no LoRA parameter (the head reads a detached hidden state)
    x0, answer = torch.randint(6, 100, (2, 16)), torch.ones(2, 16, dtype=torch.bool)
    m = answer.clone()
    m[:, ::2] = False
    res = tr.step_module(x0, x0, answer, m, torch.zeros_like(m), ~m, torch.full((2, 16), 0.5))
    res["ups_loss"].backward()
    assert all(p.grad is None for n, p in tr.lm.named_parameters() if "lora_" in n)
    assert all(p.grad is not None for p in tr.lm.ups_head.parameters())
    tr.opt.zero_grad(set_to_none=True)
    tr.train()
    ch = changed(before, tr.lm)
    assert ch and all("lora_" in n or n.startswith("ups_head.") for n in ch)
    assert any("lora_B" in n for n in ch) and any(n.startswith("ups_head.") for n in ch)


def test_lora_alternating_steps_touch_one_part(tiny_model_dir, data, tmp_path):
    out = tmp_path / "alt"
    lora_main(base(tiny_model_dir, data, out, "--max_steps", "4", "--lora_r", "4", "--train_mode", "alternating",
                   "--alt_ratio", "2", "--save_every", "1", "--save_total_limit", "10", "--lr_lora", "1e-2"))
    ck = {s: load_file(str(out / f"checkpoints/step-{s:07d}/trainable.safetensors")) for s in (1, 2, 3)}

    def diff(a, b):
        return {n for n in ck[a] if not torch.equal(ck[a][n], ck[b][n])}

    # optimiser step index 1 is a TPS step (LoRA only), index 2 the UPS step (head only)
    assert diff(1, 2) and all("lora_" in n for n in diff(1, 2))
    assert diff(2, 3) and all(".ups_head." in n for n in diff(2, 3))


@pytest.mark.parametrize("backbone", ["none", "full"])
def test_stream_gradients(tiny_model_dir, data, tmp_path, backbone):
    tr = trainer_for("sft", base(tiny_model_dir, data, tmp_path / "r", "--max_steps", "2", "--ups_arch", "stream",
                                 "--train_backbone", backbone, "--lr", "1e-2"))
    assert tr.lm.config.ups_taps == (0, 1, 2, 3)
    stream = set(tr.lm.model.stream_parameter_names())
    before = snapshot(tr.lm)
    tr.train()
    ch = changed(before, tr.lm)
    if backbone == "none":
        assert ch == {f"model.{n}" for n in stream}  # BCE and TPS reach the stream through the frozen backbone
    else:
        assert ch == set(before)


def test_full_backbone_no_ups_pretrains_from_scratch(tiny_model_dir, data, tmp_path):
    out_model = tmp_path / "pretrained"
    res = sft_main(base(tiny_model_dir, data, tmp_path / "r", "--max_steps", "3", "--ups_arch", "none",
                        "--lambda_ups", "0", "--train_backbone", "full", "--init_config", "test-tiny",
                        "--tokenizer", str(tiny_model_dir), "--save_model_dir", str(out_model), "--lr", "1e-3"))
    assert res["paths"] == {"model_dir": str(out_model)}
    loaded = load_for_inference(str(out_model), device="cpu")
    assert loaded.model.ups_arch is None and loaded.ids.mask == 0
    # it continues as a --model_name (e.g. Remask SFT of the pretrained model)
    res = sft_main(base(out_model, data, tmp_path / "r2", "--max_steps", "1"))
    assert Path(res["paths"]["ups"]).is_file()


# ------------------------------------------------------------------------------------------ end to end
def test_sft_script_end_to_end_and_metrics(tiny_model_dir, data, tmp_path):
    out = tmp_path / "sft"
    ups_path = tmp_path / "ckpt" / "ups_head_test.pt"
    res = sft_main(base(tiny_model_dir, data, out, "--epochs", "1", "--grad_accum", "2", "--ups_width", "16",
                        "--save_path", str(ups_path), "--label_smoothing", "--block_diffusion",
                        "--train_block_length", "8", "--mask_schedule", "llada"))
    assert res["step"] == len(ROWS) // 4 and res["paths"]["ups"] == str(ups_path)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, res["step"] + 1))
    for key in ("tps_loss", "ups_loss", "lr_ups", "tokens_per_s", "grad_norm", "ups_acc_clean", "ups_acc_incorrect",
                "ups_acc_masked", "auroc_unmasked", "auroc_masked"):
        assert key in lines[-1]
    _, meta = read_ups(ups_path)
    assert meta["ups_width"] == 16 and meta["args"]["r_incorrect"] == 0.1 and meta["args"]["label_smoothing"]
    loaded = load_for_inference(str(tiny_model_dir), ups_head=str(ups_path), device="cpu")
    assert loaded.model.ups_arch == "head"
    # continue training from it (the user's MATH-500 continuation)
    res2 = sft_main(base(tiny_model_dir, data, tmp_path / "sft2", "--max_steps", "2", "--load_ups_head",
                         str(ups_path), "--save_path", str(tmp_path / "cont.pt")))
    assert read_ups(tmp_path / "cont.pt")[1]["ups_width"] == 16 and res2["step"] == 2
    # the curve plot
    from remedi.training.plots import main as plot_main

    plot_main([str(out / "metrics.jsonl"), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_lora_script_end_to_end_checkpoints_load(tiny_model_dir, data, tmp_path):
    lora_dir, ups = tmp_path / "lora_a", tmp_path / "ups_lora.pt"
    res = lora_main(base(tiny_model_dir, data, tmp_path / "run", "--max_steps", "2", "--grad_accum", "2",
                         "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.05", "--lora_target", "auto",
                         "--lr_lora", "1e-2", "--lr_ups", "1e-3", "--lambda_ups", "1.0", "--r_incorrect", "0.1",
                         "--save_lora_dir", str(lora_dir), "--save_ups_head", str(ups), "--pad_to", "batch",
                         "--incorrect_source", "vocab"))
    assert (lora_dir / "adapter_config.json").is_file() and (lora_dir / "adapter_model.safetensors").is_file()
    loaded = load_for_inference(str(tiny_model_dir), ups_head=str(ups), lora_path=str(lora_dir), device="cpu")
    plain = load_for_inference(str(tiny_model_dir), device="cpu")
    ids = torch.randint(6, 100, (1, 12))
    assert not torch.equal(loaded.model(ids).logits, plain.model(ids).logits)  # the merged adapter acts
    assert type(loaded.model.model).__name__ == "LLaDAModel"
    # continue: alternating from the saved adapter + UPS (the user's second LoRA command)
    res2 = lora_main(base(tiny_model_dir, data, tmp_path / "run2", "--max_steps", "2", "--train_mode",
                          "alternating", "--alt_ratio", "4", "--load_lora_dir", str(lora_dir), "--load_ups_head",
                          str(ups), "--save_lora_dir", str(tmp_path / "lora_b"), "--save_ups_head",
                          str(tmp_path / "ups_b.pt")))
    assert res2["step"] == 2 and (tmp_path / "lora_b" / "adapter_model.safetensors").is_file()
    a = load_file(str(lora_dir / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "lora_b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert res["stopped"] is False


def test_shared_gsm8k_first_rows(tiny_model_dir, tmp_path):
    root = shared_data_dir()
    if root is None:
        pytest.skip("no ../shared/data")
    res = sft_main(["--model_name", str(tiny_model_dir), "--dataset", str(root / "gsm8k" / "train.jsonl"),
                    "--prompt_field", "question", "--answer_field", "answer", "--max_examples", "16", "--seq_len",
                    "256", "--batch_size", "2", "--max_steps", "2", "--output_dir", str(tmp_path / "g"),
                    "--device", "cpu"])
    assert res["step"] == 2 and Path(res["paths"]["ups"]).is_file()


# ------------------------------------------------------------------------------------------ resume & faults
@pytest.mark.parametrize("script", ["sft", "lora"])
def test_resume_equivalence(tiny_model_dir, data, tmp_path, script):
    main = sft_main if script == "sft" else lora_main
    extra = ["--max_steps", "7", "--grad_accum", "2", "--warmup_steps", "2", "--save_every", "3"]
    if script == "lora":
        extra += ["--lora_r", "4", "--lora_dropout", "0.2", "--lr_lora", "1e-2", "--train_mode", "alternating",
                  "--alt_ratio", "1"]
    else:
        extra += ["--lr", "1e-2", "--ups_width", "8"]
    straight = main(base(tiny_model_dir, data, tmp_path / "a", *extra))
    first = main(base(tiny_model_dir, data, tmp_path / "b", *extra, "--stop_after_steps", "4"))
    assert first["stopped"] and first["step"] == 4
    assert json.loads((tmp_path / "b/checkpoints/latest.json").read_text())["step"] == 3
    resumed = main(base(tiny_model_dir, data, tmp_path / "b", *extra, "--resume"))
    assert resumed["step"] == straight["step"] == 7
    ua, ub = read_ups(straight["paths"]["ups"])[0], read_ups(resumed["paths"]["ups"])[0]
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    if script == "lora":
        la = load_file(str(Path(straight["paths"]["lora"]) / "adapter_model.safetensors"))
        lb = load_file(str(Path(resumed["paths"]["lora"]) / "adapter_model.safetensors"))
        assert all(torch.equal(la[k], lb[k]) for k in la)
    ma = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in mb] == list(range(1, 8))  # the killed run's step 4 line was replaced
    assert [x["loss"] for x in ma] == [x["loss"] for x in mb]


def test_resume_rejects_changed_args_and_reused_dir(tiny_model_dir, data, tmp_path):
    out = tmp_path / "r"
    sft_main(base(tiny_model_dir, data, out, "--max_steps", "3", "--save_every", "1", "--stop_after_steps", "1"))
    with pytest.raises(ValueError, match="--lr: was 0.0001, now 0.5"):
        sft_main(base(tiny_model_dir, data, out, "--max_steps", "3", "--save_every", "1", "--resume", "--lr", "0.5"))
    with pytest.raises(ValueError, match="pass --resume"):
        sft_main(base(tiny_model_dir, data, out, "--max_steps", "3"))


def test_crash_during_save_keeps_previous_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    import safetensors.torch as st

    real, calls = st.save_file, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(st, "save_file", flaky)
    out = tmp_path / "c"
    with pytest.raises(OSError, match="disk full"):
        sft_main(base(tiny_model_dir, data, out, "--max_steps", "5", "--save_every", "2"))
    ck = latest_checkpoint(out)
    assert ck.name == "step-0000002" and read_ups(ck / "ups.safetensors")[0]
    monkeypatch.setattr(st, "save_file", real)
    res = sft_main(base(tiny_model_dir, data, out, "--max_steps", "5", "--save_every", "2", "--resume"))
    assert res["step"] == 5


def test_non_finite_loss_stops_with_step(tiny_model_dir, data, tmp_path, monkeypatch):
    real, calls = S.ups_loss, []

    def bad(*a, **k):
        calls.append(1)
        val = real(*a, **k)
        return val * float("nan") if len(calls) == 3 else val

    monkeypatch.setattr(S, "ups_loss", bad)
    out = tmp_path / "n"
    with pytest.raises(NonFiniteLoss, match="optimiser step 3"):
        sft_main(base(tiny_model_dir, data, out, "--max_steps", "5", "--save_every", "2",
                      "--save_path", str(tmp_path / "never.pt")))
    assert latest_checkpoint(out).name == "step-0000002"
    assert not (tmp_path / "never.pt").exists()


@pytest.mark.slow
def test_two_processes_data_parallel(tiny_model_dir, data, tmp_path):
    """Two CPU processes (gloo DDP through accelerate), each on its own shard; launched with torchrun, which
    is what `accelerate launch --multi_gpu` runs underneath on GPUs."""
    out = tmp_path / "ddp"
    with socket.socket() as sock:  # a free port: other test runs may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "remedi/train_remask_sft.py", *base(tiny_model_dir, data, out, "--max_steps", "3", "--save_every", "2")]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    st = json.loads((out / "checkpoints/step-0000002/trainer_state.json").read_text())
    assert st["world_size"] == 2 and (out / "checkpoints/step-0000002/rng_rank1.pt").is_file()
    assert (out / "ups.safetensors").is_file()
    # 24 rows, 2 per process: 6 optimiser steps per epoch on 2 processes (12 on one)
    assert lines[0]["epoch"] == 0 and len(json.loads((out / "args.json").read_text())) > 10


def test_adamw_keeps_the_default_kernels_on_cpu():
    cpu = [torch.nn.Parameter(torch.ones(3))]
    assert not B.adamw([{"params": cpu}], lr=1e-3).defaults["fused"]  # CPU numbers stay as pinned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adamw_is_fused_on_a_gpu_with_the_same_update():
    gpu = [torch.nn.Parameter(torch.randn(64, device="cuda"))]
    ref = [torch.nn.Parameter(gpu[0].detach().clone())]
    fused, plain = B.adamw([{"params": gpu}], lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    assert fused.defaults["fused"]
    for _ in range(3):
        for p, opt in ((gpu[0], fused), (ref[0], plain)):
            p.grad = torch.sin(p.detach() * 3)
            opt.step()
    torch.testing.assert_close(gpu[0], ref[0])
