"""--report_to (accelerate's trackers) and --config (YAML/JSON flag files, a run's args.json replays it)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from remedi.arguments import ModelArgs, parse_args
from remedi.decoding.args import SamplingArgs
from remedi.evaluation.compare import CompareArgs
from remedi.evaluation.runner import EvalArgs
from remedi.rl.args import RLArgs
from remedi.training.args import SCRIPT_ARGS, other_script_hint

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = ["--dataset", "arith", "--arith_n", "64", "--seq_len", "128", "--batch_size", "4", "--max_steps", "4",
            "--log_every", "2", "--ups_width", "16", "--lr", "3e-3"]


def _sft(argv):
    from remedi.train_remask_sft import main

    return main(argv)


def test_tensorboard_scalars_match_metrics_and_args_json_replays_the_run(tmp_path):
    pytest.importorskip("tensorboard", reason="--report_to tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = tmp_path / "first"
    _sft(TINY_SFT + ["--report_to", "tensorboard", "--output_dir", str(first)])
    metrics = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    events = EventAccumulator(str(first / "tracking" / "first"))
    events.Reload()
    for key in ("loss", "ups_loss", "tps_loss", "auroc_unmasked"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [2, 4]
        assert [v for _, v in got] == pytest.approx([m[key] for m in metrics], rel=1e-6)

    # replay: the first run's own args.json, only the output folder (and the tracker) overridden on the command line
    second = tmp_path / "second"
    _sft(["--config", str(first / "args.json"), "--output_dir", str(second), "--report_to", "none"])
    a, b = (json.loads((d / "args.json").read_text()) for d in (first, second))
    diff = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert diff == {"output_dir", "report_to"}
    again = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in again] == [m["loss"] for m in metrics]
    assert not (second / "tracking").exists()


def test_config_values_are_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 24\nsources: entropy,tps_prob\nmax_samples: 5\ntemperature: 1e-4\neos_gating: false\n")
    m, s, e = parse_args([ModelArgs, SamplingArgs, EvalArgs], ["--config", str(cfg), "--max_samples", "7"])
    assert (s.steps, e.sources, e.max_samples, s.temperature, s.eos_gating) == (24, "entropy,tps_prob", 7, 1e-4, False)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"prompt": ["a", "b"], "batch_size": 2}))
    _, _, c = parse_args([ModelArgs, SamplingArgs, CompareArgs], [f"--config={js}"])
    assert (c.prompt, c.batch_size) == (["a", "b"], 2)


@pytest.mark.parametrize("text, says", [
    ("stepz: 3\n", "unknown key 'stepz' (no flag --stepz in this script); did you mean --steps?"),
    ("- steps\n", "must hold a mapping"),
    ("steps: [1\n", "is not valid YAML"),
])
def test_config_errors(tmp_path, text, says):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as err:
        parse_args([ModelArgs, SamplingArgs, EvalArgs], ["--config", str(cfg)])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_config_key_of_the_other_training_script_names_it(tmp_path):
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("lora_r: 4\n")
    with pytest.raises(ValueError, match="lora_r belongs to train_remask_lora.py"):
        parse_args(list(SCRIPT_ARGS["train_remask_sft"]), ["--config", str(cfg)],
                   unknown_hint=other_script_hint("train_remask_sft"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_args(list(SCRIPT_ARGS["train_remask_sft"]), ["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("name, arg_types, expect", [
    ("llada8b_sft_head.yaml", SCRIPT_ARGS["train_remask_sft"],
     {"model_name": "GSAI-ML/LLaDA-8B-Base", "lr": 1e-4, "seq_len": 1024, "mask_id": 126336, "ups_arch": "head"}),
    ("llada8b_lora_joint.yaml", SCRIPT_ARGS["train_remask_lora"],
     {"lora_r": 16, "lr_lora": 5e-5, "lr_ups": 1e-4, "grad_accum": 2, "gradient_checkpointing": True,
      "train_mode": "joint"}),
    ("llada8b_rl.yaml", (ModelArgs, RLArgs),
     {"model_name": "GSAI-ML/LLaDA-8B-Instruct", "group_size": 16, "layout": "bidirectional", "max_updates": 100}),
])
def test_shipped_8b_recipes_parse(name, arg_types, expect):
    parsed = parse_args(list(arg_types), ["--config", str(REPO / "configs" / name)])
    values = {k: v for obj in parsed for k, v in vars(obj).items()}
    assert {k: values[k] for k in expect} == expect


def test_report_to_is_checked_with_the_flags():
    with pytest.raises(ValueError, match="--report_to 'tensorbord': choose one of none, tensorboard, wandb, trackio"):
        parse_args(list(SCRIPT_ARGS["train_remask_sft"]), ["--report_to", "tensorbord"])
    with pytest.raises(ValueError, match="--report_to"):
        parse_args([ModelArgs, RLArgs], ["--report_to", "mlflow"])
