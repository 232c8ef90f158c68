"""Errors before work: output paths checked before the model loads, torn metrics lines, runs killed before their
first checkpoint, divergence stops, and the no-flag demo runs of both training scripts."""
import functools
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from remedi.arguments import ModelArgs, parse_args
from remedi.model.checkpoint import read_ups
from remedi.model.loading import EMBEDDED_MODEL
from remedi.train_remask_lora import main as lora_main
from remedi.train_remask_sft import main as sft_main
from remedi.training import build as B
from remedi.training import demo
from remedi.training.args import DataArgs, SftArgs, TrainArgs, plan_from
from remedi.training.loop import Diverged, NonFiniteLoss, Trainer, truncate_metrics
from remedi.training.state import latest_checkpoint

from tests.conftest import train_argv

pytestmark = pytest.mark.usefixtures("one_thread", "clean_accelerate")

ROWS = [{"question": f"Ann has {i} cards and gets {i % 4 + 1} more. How many?",
         "answer": f"{i} + {i % 4 + 1} = {2 * i % 3}. #### {i + i % 4 + 1}"} for i in range(16)]


base = functools.partial(train_argv, seq_len=48)


def files_under(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(B, "load_pretrained", boom)


# ------------------------------------------------------------------------------------------ output paths
def test_output_paths_checked_before_the_model_loads(tiny_model_dir, data, tmp_path, no_model_load, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    a_file = work / "a_file.txt"
    a_file.write_text("x")
    before = files_under(work)
    out = work / "run"
    cases = [
        (sft_main, ["--save_path", str(work)], rf"--save_path {work} is a folder; give a file path inside it"),
        (sft_main, ["--save_path", str(a_file / "ups.pt")], rf"--save_path {a_file}/ups.pt: {a_file} is a file"),
        (lora_main, ["--save_ups_head", str(work)], "--save_ups_head .* is a folder"),
        (lora_main, ["--save_lora_dir", str(a_file)], "--save_lora_dir .* is a file; give a folder path"),
        (sft_main, ["--train_backbone", "full", "--save_model_dir", str(a_file)], "--save_model_dir .* is a file"),
    ]
    for main, extra, msg in cases:
        with pytest.raises(ValueError, match=msg):
            main(base(tiny_model_dir, data, out, "--max_steps", "2", *extra))
    with pytest.raises(ValueError, match="--output_dir .* is a file"):
        sft_main(base(tiny_model_dir, data, a_file, "--max_steps", "2"))
    # a folder the process cannot write (root ignores permission bits, so the check itself is told)
    locked = work / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(ValueError, match=rf"--save_path {locked}/ups.pt: {locked} is not writable"):
        sft_main(base(tiny_model_dir, data, out, "--max_steps", "2", "--save_path", str(locked / "ups.pt")))
    assert files_under(work) == before | {"locked"}  # nothing written: no run folder, no args.json


# ------------------------------------------------------------------------------------------ metrics file
def test_resume_repairs_a_torn_metrics_line(tiny_model_dir, data, tmp_path, caplog):
    out = tmp_path / "run"
    extra = ["--max_steps", "4", "--save_every", "2", "--lr", "1e-2"]
    sft_main(base(tiny_model_dir, data, out, *extra, "--stop_after_steps", "3"))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.6')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        res = sft_main(base(tiny_model_dir, data, out, *extra, "--resume"))
    assert res["step"] == 4
    assert any("torn last line" in r.getMessage() for r in caplog.records)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_metrics_line_that_is_not_an_object_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[1, 2, 3]\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is a JSON list, not an object"):
        truncate_metrics(path, 1)
    path.write_text('{"step": 1}\n{"loss": 2}\n')
    with pytest.raises(ValueError, match=rf"{path}: record 2 has no integer 'step'"):
        truncate_metrics(path, 1)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


# ------------------------------------------------------------------------------------------ dead ends
def test_run_killed_before_its_first_checkpoint_resumes_from_scratch(tiny_model_dir, data, tmp_path, caplog,
                                                                    monkeypatch):
    extra = ["--max_steps", "4", "--save_every", "2", "--lr", "1e-2", "--ups_width", "8"]
    straight = sft_main(base(tiny_model_dir, data, tmp_path / "a", *extra))
    import safetensors.torch as st

    real = st.save_file

    def killed(*a, **k):
        raise KeyboardInterrupt("killed during the first save")

    monkeypatch.setattr(st, "save_file", killed)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        sft_main(base(tiny_model_dir, data, out, *extra))
    monkeypatch.setattr(st, "save_file", real)
    assert (out / "args.json").is_file() and latest_checkpoint(out) is None
    with pytest.raises(ValueError, match="pass --resume with the same flags .*starts it again from step 0.*or choose "
                                         "a new --output_dir"):
        sft_main(base(tiny_model_dir, data, out, *extra))
    with pytest.raises(ValueError, match="--lr: was 0.01, now 0.5"):  # the same arguments are still required
        sft_main(base(tiny_model_dir, data, out, *extra, "--resume", "--lr", "0.5"))
    with caplog.at_level(logging.WARNING):
        resumed = sft_main(base(tiny_model_dir, data, out, *extra, "--resume"))
    assert any("no finished checkpoint" in r.getMessage() and "step 0" in r.getMessage() for r in caplog.records)
    assert resumed["step"] == 4
    ua, ub = read_ups(straight["paths"]["ups"])[0], read_ups(resumed["paths"]["ups"])[0]
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # a run written before a flag existed resumes as long as the flag keeps its default
    saved = json.loads((out / "args.json").read_text())
    (out / "args.json").write_text(json.dumps({k: v for k, v in saved.items()
                                               if k not in ("noise_source", "divergence_bound")}))
    sft_main(base(tiny_model_dir, data, out, "--max_steps", "4", "--save_every", "2", "--lr", "1e-2",
                  "--ups_width", "8", "--stop_after_steps", "2", "--resume"))
    with pytest.raises(ValueError, match="--noise_source: was 'random', now 'self'"):
        sft_main(base(tiny_model_dir, data, out, *extra, "--resume", "--noise_source", "self"))
    with pytest.raises(FileNotFoundError, match="holds no run to continue"):
        sft_main(base(tiny_model_dir, data, tmp_path / "empty", *extra, "--resume"))


# ------------------------------------------------------------------------------------------ divergence
def test_loss_far_above_the_bound_stops_and_saves_nothing(tiny_model_dir, data, tmp_path):
    ups = tmp_path / "ups.pt"
    with pytest.raises(Diverged, match=r"diverged at optimiser step 2 .*loss \d\.\d+e\+\d+ is above "
                                       r"--divergence_bound 1e\+06.*lower the learning rate \(--lr;"):
        sft_main(base(tiny_model_dir, data, tmp_path / "r", "--max_steps", "4", "--lr", "1e10", "--save_path",
                      str(ups)))
    assert not ups.exists() and not (tmp_path / "r" / "ups.safetensors").exists()


def test_optimiser_overflow_names_the_step(tiny_model_dir, data, tmp_path):
    with pytest.raises(Diverged, match=r"overflowed at optimiser step 1 .*lower the learning rate \(--lr_lora / "
                                       r"--lr_ups"):
        lora_main(base(tiny_model_dir, data, tmp_path / "r", "--max_steps", "3", "--lora_r", "2", "--lr_ups", "1e38"))
    assert not (tmp_path / "r" / "ups.safetensors").exists() and not (tmp_path / "r" / "lora").exists()


def test_non_finite_weights_after_a_step_stop_the_run(tiny_model_dir, data, tmp_path):
    argv = base(tiny_model_dir, data, tmp_path / "r", "--max_steps", "3")
    m, d, t, e = parse_args([ModelArgs, DataArgs, TrainArgs, SftArgs], argv)
    tr = Trainer(m, d, t, plan_from(e, "train_remask_sft"))
    tr.setup()

    def poisoned_step(*a, **k):
        with torch.no_grad():
            next(tr.lm.ups_head.parameters()).fill_(float("inf"))

    tr.opt.step = poisoned_step
    with pytest.raises(NonFiniteLoss, match="non-finite weights after optimiser step 1"):
        tr.train()
    assert not (tmp_path / "r" / "ups.safetensors").exists()


# ------------------------------------------------------------------------------------------ no-flag demo
@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run(margs, dargs, targs, extra, script):
        seen.update(m=margs, d=dargs, t=targs, e=extra, script=script)
        return {"step": targs.max_steps, "paths": {"ups": "runs/x/ups.pt"}, "output_dir": "runs/x"}

    from remedi.training import loop

    monkeypatch.setattr(loop, "run", fake_run)
    return seen


@pytest.mark.parametrize("script", ["sft", "lora"])
def test_no_flags_run_the_shipped_recipe_as_a_short_demo(captured, caplog, script):
    main = sft_main if script == "sft" else lora_main
    with caplog.at_level(logging.INFO):
        main([])
    m, d, t, e = captured["m"], captured["d"], captured["t"], captured["e"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "demo recipe" in text and "evaluate it: python remedi/eval_gsm_math.py --ups_head runs/x/ups.pt" in text
    # the shipped files' own recipe, read from their metadata
    shipped = read_ups(EMBEDDED_MODEL / ("ups_head.pt" if script == "sft" else "ups_head_lora.pt"))[1]["args"]
    for k in ("ups_arch", "ups_width", "r_incorrect", "lambda_ups", "incorrect_source", "mask_schedule", "seq_len",
              "pad_to", "prompt_format", "label_smoothing"):
        got = {**vars(d), **vars(t)}[k]
        assert got == shipped[k], k
    if script == "lora":
        for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target", "train_mode"):
            assert getattr(e, k) == shipped[k], k
    assert Path(m.model_name) == EMBEDDED_MODEL and d.dataset == "arith" and m.seed == 0
    assert t.max_steps * t.batch_size <= 5000 <= d.arith_n  # one pass over fresh problems, minutes not hours
    assert 0 < t.save_every < t.max_steps  # saves along the way


def test_any_flag_turns_the_demo_off_and_documented_commands_keep_their_meaning(captured):
    sft_main(["--max_steps", "3"])
    assert captured["t"].max_steps == 3 and captured["t"].ups_width == 0 and captured["t"].save_every == 0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cmd = readme.split("python remedi/train_remask_sft.py", 1)[1].split("\n#", 1)[0]
    argv = cmd.replace("\\\n", " ").split()
    sft_main(argv)
    t, d, e = captured["t"], captured["d"], captured["e"]
    assert (d.seq_len, t.batch_size, t.epochs, e.lr, t.lambda_ups, t.r_incorrect, t.ups_width) == \
        (1024, 1, 1, 1e-4, 1.0, 0.1, 0)
    assert e.save_path == "checkpoints/ups_head_s1k_len1024_b1_r010_l1p0_linear.pt" and t.max_steps is None
    assert demo.demo_flags("train_remask_sft") != argv
