"""One set of kill / resume cases for every training script (Remask SFT, LoRA, RL) on the embedded tiny model:
the three share one runtime (remedi.training.runtime / state), so the rules must hold for each alike."""
import json
import logging
import os
import shutil

import pytest
import torch

from remedi.files import RunLock
from remedi.model.checkpoint import read_ups
from remedi.train_remask_lora import main as lora_main
from remedi.train_remask_rl import main as rl_main
from remedi.train_remask_sft import main as sft_main

pytestmark = pytest.mark.usefixtures("one_thread")

TOTAL, KILL = 6, 4  # checkpoints at 2 and 4 (save_every 2); the killed run stops after 4
SFT = ["--dataset", "arith", "--arith_n", "48", "--seq_len", "48", "--pad_to", "batch", "--batch_size", "4",
       "--device", "cpu", "--ups_width", "8", "--log_every", "1", "--max_steps", str(TOTAL), "--save_every", "2",
       "--warmup_steps", "1"]
SCRIPTS = {
    "sft": (sft_main, SFT + ["--ups_arch", "head", "--lr", "1e-2"], "--stop_after_steps", "step"),
    "lora": (lora_main, SFT + ["--lora_r", "2", "--lora_alpha", "4", "--lr_lora", "1e-2", "--lr_ups", "1e-2"],
             "--stop_after_steps", "step"),
    "rl": (rl_main, ["--arith_n", "40", "--device", "cpu", "--gen_length", "8", "--block_length", "8", "--steps",
                     "4", "--group_size", "2", "--prompts_per_update", "2", "--max_updates", str(TOTAL),
                     "--save_every", "2", "--reward", "toy_even_tokens", "--lr", "1e-2"],
           "--stop_after_updates", "update"),
}


def run(script, out, *extra):
    main, flags, _, _ = SCRIPTS[script]
    return main([*flags, "--output_dir", str(out), *extra])


def ups_tensors(path):
    return read_ups(path)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per script: the straight run's final UPS, and the folder of a run killed after step KILL."""
    d = tmp_path_factory.mktemp("resume")
    made = {}
    for script, (_, _, stop, _) in SCRIPTS.items():
        run(script, d / f"{script}-full")
        killed = run(script, d / f"{script}-killed", stop, str(KILL))
        assert killed["stopped"]
        made[script] = (ups_tensors(d / f"{script}-full" / "ups.pt"), d / f"{script}-killed")
    return made


def killed_copy(runs, script, tmp_path):
    """A copy of the script's killed run folder, for one case to change."""
    out = tmp_path / "run"
    shutil.copytree(runs[script][1], out)
    return out


def damage(name):
    def f(out):
        p = out / "checkpoints" / f"step-{KILL:07d}" if (out / "checkpoints" / f"step-{KILL:07d}").is_dir() else \
            out / "checkpoints" / f"update-{KILL:06d}"
        data = (p / name).read_bytes()
        (p / name).write_bytes(data[: len(data) // 2])
        return f"{p / name} is truncated"
    return f


def torn_latest(out):
    (out / "checkpoints" / "latest.json").write_text('{"name": "ste')
    return "latest.json is damaged"


def no_checkpoint(out):  # killed before or during its first save
    shutil.rmtree(out / "checkpoints")
    return "holds no finished checkpoint"


def unknown_arg(out):  # a run saved before --seed existed: the argument counts as its default (0)
    args = json.loads((out / "args.json").read_text())
    del args["seed"]
    (out / "args.json").write_text(json.dumps(args))
    return None


def stale_export(out):  # a kill during the final export leaves atomic_path's temporary folder
    (out / ".ups.pt.k1ll3d.tmp").mkdir()
    return "left unfinished by an interrupted run"


CASES = {"exact": lambda out: None, "no_checkpoint": no_checkpoint, "unknown_arg": unknown_arg,
         "torn_latest": torn_latest, "stale_export": stale_export, "damaged_trainable": damage("trainable.safetensors"),
         "damaged_optim": damage("optim.pt"), "damaged_rng": damage("rng_rank0.pt")}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_resume_rules_are_the_same_for_every_script(script, case, runs, tmp_path, caplog):
    """Each case resumes to the same weights as the run that never stopped, with a warning saying what it did."""
    full = runs[script][0]
    out = killed_copy(runs, script, tmp_path)
    warning = CASES[case](out)
    with caplog.at_level(logging.WARNING):
        res = run(script, out, "--resume")
    assert not res["stopped"] and res[SCRIPTS[script][3]] == TOTAL
    if warning:
        assert warning in caplog.text
    if case.startswith("damaged"):
        assert "falling back to the previous complete checkpoint" in caplog.text
    assert not list(out.glob(".*.tmp"))
    got = ups_tensors(out / "ups.pt")
    assert got.keys() == full.keys()
    for k in full:
        assert torch.equal(got[k], full[k]), (script, case, k)
    key = SCRIPTS[script][3]
    lines = [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, TOTAL + 1))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_second_run_into_a_busy_folder_is_refused(script, runs, tmp_path):
    out = killed_copy(runs, script, tmp_path)
    held = RunLock(out)  # another run holds the folder
    try:
        with pytest.raises(ValueError, match=rf"is in use by another run \(pid {os.getpid()}"):
            run(script, out, "--resume")
    finally:
        held.release()
    assert run(script, out, "--resume")[SCRIPTS[script][3]] == TOTAL  # free again once the other one ends


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_no_complete_checkpoint_left_names_the_damaged_files(script, runs, tmp_path):
    out = killed_copy(runs, script, tmp_path)
    for ck in (out / "checkpoints").iterdir():
        if ck.is_dir():
            (ck / "trainable.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"trainable.safetensors is truncated.*no complete checkpoint is left"):
        run(script, out, "--resume")


@pytest.mark.parametrize("script, flag", [("lora", "--load_lora_dir"), ("rl", "--lora_path")])
def test_a_corrupt_adapter_config_is_refused_before_the_model_loads(script, flag, tmp_path, monkeypatch):
    from remedi.model import checkpoint, loading
    from remedi.training import build

    def boom(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(loading, "load_pretrained", boom)
    monkeypatch.setattr(checkpoint, "load_pretrained", boom)
    monkeypatch.setattr(build, "load_pretrained", boom)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LO')
    extra = [flag, str(lora)] + (["--train", "ups_lora"] if script == "rl" else [])
    with pytest.raises(ValueError, match=r"adapter_config.json is damaged"):
        run(script, tmp_path / "out", *extra)
