"""eval_gsm_math.py end to end on the tiny model: reports, resume, rescore, bad input, data parallel."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remedi import eval_gsm_math as script
from remedi import session
from remedi.evaluation import runner as ge
from remedi.tasks import arith
from remedi.evaluation import data as D
from remedi.evaluation import results as R

REPO = Path(__file__).resolve().parents[1]
SAMPLING = ["--steps", "8", "--gen_length", "8", "--block_length", "4"]


@pytest.fixture
def data_file(tmp_path) -> Path:
    rows = [{"question": f"Janet has {i} apples and buys 4 more. How many apples does she have?",
             "answer": f"{i} + 4 = {i + 4}. #### {i + 4}"} for i in range(6)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def count_generated(monkeypatch):
    """Wrap the real sampler call and count the prompts it decodes."""
    calls = []
    real = session.generate

    def counting(model, prompts, cfg, ids, generators):
        calls.append((cfg.strategy, cfg.steps, len(prompts)))
        return real(model, prompts, cfg, ids, generators)

    monkeypatch.setattr(session, "generate", counting)
    return calls


def _argv(model_dir, data, out, *extra):
    # no trajectory pictures unless a test asks for them (they cost extra decodes); a later flag wins
    return ["--model_name", str(model_dir), "--dataset", str(data), "--output_dir", str(out), *SAMPLING,
            "--trajectory_out", "none", *extra]


def _records(out: Path) -> dict:
    return {R.record_key(r): r for r in R.read_results(out / "results.jsonl")}


@pytest.mark.slow
def test_end_to_end_reports(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    summary = script.main(_argv(tiny_model_dir, data_file, out, "--max_samples", "3", "--infer_bs", "2",
                                "--sources", "llada_low_confidence,tps_prob,random", "--temperature", "0.5",
                                "--trajectory_out", "auto"))
    for name in ("results.jsonl", "summary.json", "summary.md", "accuracy.png", "config.json"):
        assert (out / name).is_file(), name
    pictures = sorted(p.name for p in (out / "trajectories").glob("*.png"))
    assert len(pictures) == 3 and all(p.startswith("trajectory-") for p in pictures)
    assert not (out / "accuracy_vs_nfe.png").exists()
    recs = R.read_results(out / "results.jsonl")
    assert len(recs) == 9 and {r["source"] for r in recs} == {"llada_low_confidence", "tps_prob", "random"}
    r = recs[0]
    assert set(r) >= {"id", "source", "steps", "prompt", "gold", "completion", "extracted", "correct",
                      "string_match", "note", "nfe", "remasks", "remasks_per_block", "seconds", "gen_tokens"}
    assert r["prompt"] == f"Question: {json.loads(data_file.read_text().splitlines()[0])['question']}\nAnswer:"
    assert r["gold"] == "4" and r["nfe"] == 8 and len(r["remasks_per_block"]) == 2 and r["steps"] == 8
    on_disk = json.loads((out / "summary.json").read_text())
    assert [g["source"] for g in on_disk["groups"]] == ["llada_low_confidence", "tps_prob", "random"]
    assert len(on_disk["pairs"]) == 3 and on_disk["groups"][0]["n"] == 3
    assert summary["groups"] == on_disk["groups"] and on_disk["files"]["results"] == str(out / "results.jsonl")
    printed = capsys.readouterr().out
    assert "| source | n | accuracy | 95% CI |" in printed and "McNemar" in printed
    assert str(out / "summary.md") in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fixed"]["temperature"] == 0.5 and cfg["fixed"]["prompt_style"] == "plain"

    # Same items with another batch size: identical completions (per-item seeds, per-row streams).
    out2 = tmp_path / "run_bs1"
    script.main(_argv(tiny_model_dir, data_file, out2, "--max_samples", "3", "--infer_bs", "1",
                      "--sources", "random", "--temperature", "0.5"))
    a, b = _records(out), _records(out2)
    assert len(b) == 3 and all(a[k]["completion"] == b[k]["completion"] for k in b)


@pytest.mark.slow
def test_a_folder_another_eval_holds_is_refused_and_left_as_it_was(tiny_model_dir, data_file, tmp_path,
                                                                   count_generated):
    """Two evals into one --output_dir: the second gets one error naming the holder's pid, before any decoding,
    and the first run's files are untouched."""
    from remedi.files import RunLock

    out = tmp_path / "run"
    argv = _argv(tiny_model_dir, data_file, out, "--sources", "llada_low_confidence")
    script.main(argv + ["--max_samples", "2"])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    count_generated.clear()
    holder = RunLock(out)
    try:
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {os.getpid()}"):
            script.main(argv + ["--max_samples", "4"])
    finally:
        holder.release()
    assert count_generated == []
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    script.main(argv + ["--max_samples", "4"])  # released: the run resumes
    assert sum(n for *_, n in count_generated) == 2


def test_resume_skips_finished_items_and_repairs_a_torn_line(tiny_model_dir, data_file, tmp_path, count_generated):
    out = tmp_path / "run"
    argv = _argv(tiny_model_dir, data_file, out, "--sources", "llada_low_confidence,random")
    script.main(argv + ["--max_samples", "2"])
    assert sum(n for *_, n in count_generated) == 4
    first = _records(out)
    count_generated.clear()
    with open(out / "results.jsonl", "ab") as f:  # a run killed in the middle of a line
        f.write(b'{"id": "test-00002", "source": "random", "ste')
    summary = script.main(argv + ["--max_samples", "4"])
    assert sum(n for *_, n in count_generated) == 4  # items 2 and 3, two sources
    recs = _records(out)
    assert len(recs) == 8 and all(recs[k] == v for k, v in first.items())
    assert [g["n"] for g in summary["groups"]] == [4, 4]
    count_generated.clear()
    script.main(argv + ["--max_samples", "4"])  # nothing left to do: no model load, same summary
    assert count_generated == []
    with pytest.raises(ValueError, match=r"gen_length: 8 in the earlier run, 12 now"):
        script.main(argv[:-6] + ["--steps", "12", "--gen_length", "12", "--block_length", "4"])


def test_steps_sweep_plots_accuracy_vs_nfe(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "sweep"
    summary = script.main(_argv(tiny_model_dir, data_file, out, "--max_samples", "2", "--steps_list", "4,8",
                                "--sources", "tps_prob,random"))
    assert [g["label"] for g in summary["groups"]] == ["tps_prob@4", "random@4", "tps_prob@8", "random@8"]
    assert [g["mean_nfe"] for g in summary["groups"]] == [4, 4, 8, 8]
    assert (out / "accuracy_vs_nfe.png").stat().st_size > 1000


def test_rescore_loads_no_model(tiny_model_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    script.main(_argv(tiny_model_dir, data_file, out, "--max_samples", "2"))
    lines = R.read_results(out / "results.jsonl")
    lines[0]["completion"] = "4 apples. #### 4"  # as if the model had been right
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    def boom(*a, **k):
        raise AssertionError("--rescore must not load a model")

    monkeypatch.setattr(session, "load_model", boom)
    summary = script.main(["--rescore", str(out / "results.jsonl")])
    assert summary["format"] == "gsm8k" and summary["verdicts_changed"] == 1
    assert summary["groups"][0]["correct"] == 1 and (out / "rescored.jsonl").is_file()
    # A bare file elsewhere (no config.json beside it) needs --format.
    bare = tmp_path / "other" / "old.jsonl"
    bare.parent.mkdir()
    bare.write_text(json.dumps({"id": "1", "gold": "5", "completion": "#### 5"}) + "\n")
    with pytest.raises(ValueError, match="pass --format"):
        script.main(["--rescore", str(bare)])
    s = script.main(["--rescore", str(bare), "--format", "gsm8k", "--output_dir", str(tmp_path / "re")])
    assert s["groups"][0]["accuracy"] == 1.0 and (tmp_path / "re" / "summary.md").is_file()


@pytest.mark.parametrize("extra, match", [
    (["--sources", "ups"], "source 'ups' needs a UPS"),
    (["--sources", "best"], r"--sources: unknown \['best'\]"),
    (["--format", "latex"], "latex"),
    (["--ups_head", "missing.pt"], "UPS checkpoint not found"),
    (["--gen_length", "300", "--block_length", "4", "--steps", "75"], "max_sequence_length"),
    (["--steps_list", "8,x"], "--steps_list must be comma-separated integers"),
    (["--mask_id", "126336"], "--mask_id 126336 disagrees"),
])
def test_bad_input_fails_before_the_model_loads(tiny_model_dir, data_file, tmp_path, monkeypatch, extra, match):
    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises((ValueError, FileNotFoundError, SystemExit), match=match):
        script.main(_argv(tiny_model_dir, data_file, tmp_path / "o", *extra))


def test_dataset_without_fields_lists_them(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "target": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"fields found: \['prompt', 'target'\]"):
        script.main(_argv(tiny_model_dir, bad, tmp_path / "o", "--format", "gsm8k"))


def test_max_samples_beyond_split_runs_what_exists(tiny_model_dir, data_file, tmp_path, caplog):
    summary = script.main(_argv(tiny_model_dir, data_file, tmp_path / "o", "--max_samples", "50", "--start", "4"))
    assert summary["groups"][0]["n"] == 2 and "running the 2 that exist" in summary["note"]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir, data_file, tmp_path):
    common = ["--model_name", str(tiny_model_dir), "--dataset", str(data_file), *SAMPLING, "--max_samples", "3",
              "--sources", "tps_prob,random", "--temperature", "0.7", "--infer_bs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.time()
    # accelerate launch --cpu starts one process (several need mpirun), so use torchrun, which accelerate
    # launch also uses on GPUs; PartialState then joins the gloo group.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(REPO / "remedi" / "eval_gsm_math.py"), *common, "--output_dir", str(tmp_path / "dp")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"two-process run: {time.time() - t0:.1f}s")
    script.main([*common, "--output_dir", str(tmp_path / "one")])
    two, one = _records(tmp_path / "dp"), _records(tmp_path / "one")
    assert len(two) == 6 and two.keys() == one.keys()
    for k in one:
        for f in ("completion", "extracted", "correct", "nfe", "remasks", "remasks_per_block", "prompt"):
            assert two[k][f] == one[k][f], (k, f)
    assert json.loads((tmp_path / "dp" / "config.json").read_text())["last_run"]["world_size"] == 2


USER_COMMAND = ["--model_name", "GSAI-ML/LLaDA-8B-Base", "--ups_head", "X.pt", "--lora_path", "DIR",
                "--dataset", "openai/gsm8k", "--subset", "main", "--split", "test", "--format", "gsm8k",
                "--max_samples", "50", "--infer_bs", "1", "--steps", "128", "--gen_length", "128",
                "--block_length", "16", "--temperature", "0.0", "--cfg_scale", "0.0", "--mask_id", "126336",
                "--eos_gating"]


def test_user_command_parses():
    from remedi.arguments import ModelArgs, parse_args
    from remedi.decoding.args import SamplingArgs

    m, s, e = parse_args([ModelArgs, SamplingArgs, script.EvalArgs], USER_COMMAND)
    assert (m.model_name, m.mask_id, e.ups_head, e.lora_path) == ("GSAI-ML/LLaDA-8B-Base", 126336, "X.pt", "DIR")
    assert (s.steps, s.gen_length, s.block_length, s.eos_gating, s.temperature) == (128, 128, 16, True, 0.0)
    assert (e.dataset, e.subset, e.split, e.format, e.max_samples, e.infer_bs) == \
        ("openai/gsm8k", "main", "test", "gsm8k", 50, 1)
    assert ge._default_sources(True, False) == ["llada_low_confidence", "ups", "tps_prob", "entropy", "random"]
    # the main job (embedded model) includes entropy, the README's best heuristic
    assert "entropy" in ge._default_sources(True, True)
    assert ge._default_sources(False, False) == ["llada_low_confidence"]


def test_hub_datasets_resolve_without_downloading():
    gsm = D.resolve_dataset("openai/gsm8k")
    assert (gsm.kind, gsm.fmt, gsm.subset, gsm.split) == ("hub", "gsm8k", "main", "test")
    assert D.fewshot_source(gsm, None).split == "train"
    assert D.resolve_dataset("HuggingFaceH4/MATH-500").fmt == "math"
    with pytest.raises(ValueError, match="pass --format"):
        D.resolve_dataset("someone/riddles")


def test_embedded_defaults_arith_task_and_ups(tmp_path, monkeypatch):
    """No dataset/sampling flags: the embedded model's arith test split, defaults.json and its default UPS file."""
    import torch

    from remedi.model.checkpoint import load_pretrained, save_ups
    from remedi.model.llada import UPSHead
    from tests.conftest import build_model_dir

    emb = build_model_dir(tmp_path / "remedi-tiny-gsm")
    (emb / "data").mkdir()
    rows = [{"id": f"arith-test-{i:05d}", "question": f"Ann has {i} pens and gets 2 more. How many pens?",
             "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}", "n_ops": 1} for i in range(3)]
    (emb / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (emb / "defaults.json").write_text(json.dumps({"steps": 4, "gen_length": 8, "block_length": 4}))
    model = load_pretrained(emb, dtype=torch.float32, device="cpu")
    model.attach_head(UPSHead(model.config.d_model))
    save_ups(emb / session.EMBEDDED_UPS_NAME, model)
    save_ups(emb / "ups_head.pt", model)  # another UPS beside it is not the one picked up
    monkeypatch.setattr(session, "EMBEDDED_MODEL", emb)
    monkeypatch.setattr(D, "ARITH_DATA_DIR", emb / "data")
    out = tmp_path / "run"
    # --model_name stands for ModelArgs' default (the real embedded path); explicit --steps beats defaults.json
    summary = script.main(["--model_name", str(emb), "--output_dir", str(out), "--steps", "8"])
    assert summary["sources"] == ["llada_low_confidence", "tps_prob", "margin", "entropy", "random", "ups"]
    cfg = summary["config"]
    assert (cfg["dataset"], cfg["prompt_style"], cfg["gen_length"], cfg["block_length"]) == \
        (str(emb / "data" / "test.jsonl"), "arith", 8, 4)
    assert summary["steps"] == [8] and cfg["ups_head"] == str(emb / session.EMBEDDED_UPS_NAME)
    recs = R.read_results(out / "results.jsonl")
    assert len(recs) == 18 and recs[0]["prompt"] == arith.prompt(rows[0]["question"])
    assert recs[0]["meta"] == {"n_ops": 1}


def test_the_embedded_default_ups_is_the_residual_policy():
    """The shipped default is the best policy measured (the CMA-ES residual), the round-2 heads stay beside it."""
    from remedi.model.checkpoint import read_ups
    from remedi.model.loading import EMBEDDED_MODEL

    path = session.default_ups_head(str(EMBEDDED_MODEL))
    assert path is not None and Path(path).name == "ups_residual.pt"
    meta = read_ups(path)[1]
    assert meta["kind"] == "residual" and meta["residual"]["anchor"] == "entropy"
    assert (EMBEDDED_MODEL / "ups_head.pt").is_file() and (EMBEDDED_MODEL / "ups_head_lora.pt").is_file()
    assert session.default_ups_head("GSAI-ML/LLaDA-8B-Base") is None


def test_a_rebuilt_embedded_folder_without_the_residual_falls_back_to_the_head(tmp_path, monkeypatch):
    monkeypatch.setattr(session, "EMBEDDED_MODEL", tmp_path)
    assert session.default_ups_head(str(tmp_path)) is None
    (tmp_path / "ups_head.pt").write_bytes(b"x")
    assert session.default_ups_head(str(tmp_path)) == str(tmp_path / "ups_head.pt")
    (tmp_path / "ups_residual.pt").write_bytes(b"x")
    assert session.default_ups_head(str(tmp_path)) == str(tmp_path / "ups_residual.pt")


def test_fewshot_math_and_trajectories(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    probs = [{"problem": f"What is {i} + {i}?", "solution": f"It is $\\boxed{{{2 * i}}}$.", "answer": str(2 * i)}
             for i in range(4)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probs[:2]))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probs[2:]))
    out = tmp_path / "run"
    summary = script.main(_argv(tiny_model_dir, d, out, "--fewshot", "1", "--sources", "tps_prob",
                                "--trajectory_out", str(tmp_path / "traj")))
    assert summary["config"]["format"] == "math" and summary["config"]["fewshot_ids"] == ["train-00000"]
    rec = R.read_results(out / "results.jsonl")[0]
    assert rec["prompt"] == ("Question: What is 2 + 2?\nAnswer: It is $\\boxed{4}$.\n\n"
                             "Question: What is 0 + 0?\nAnswer:")
    assert rec["gold"] == "0"
    assert list((tmp_path / "traj").glob("trajectory-tps_prob-*.png"))


def test_plot_titles_carry_no_machine_paths_and_name_model_steps_nfe():
    from remedi.evaluation.plots import no_paths, run_title
    from remedi.evaluation.runner import model_title

    assert no_paths("RL of m on /home/u/data/my.jsonl: reward") == "RL of m on my.jsonl: reward"
    assert no_paths("on openai/gsm8k (test)") == "on openai/gsm8k (test)"
    summary = {"groups": [{"steps": 48, "mean_nfe": 40.0}, {"steps": 48, "mean_nfe": 48.0}]}
    assert run_title(summary, "arith", "tiny") == "arith\nmodel tiny; 48 steps; mean NFE 40.0\u201348.0"
    assert model_title({"model_name": "GSAI-ML/LLaDA-8B-Base", "ups_head": "/abs/dir/ups.pt"}) == \
        "GSAI-ML/LLaDA-8B-Base + UPS ups.pt"


def test_trajectory_pictures_show_an_item_some_source_got_right():
    from types import SimpleNamespace

    from remedi.evaluation.runner import picture_item

    items = [SimpleNamespace(id=f"q{i}") for i in range(3)]
    plan = SimpleNamespace(items=items, steps=[48, 24])
    recs = [{"id": "q0", "steps": 48, "correct": False}, {"id": "q0", "steps": 24, "correct": True},
            {"id": "q1", "steps": 48, "correct": False}, {"id": "q2", "steps": 48, "correct": True}]
    assert picture_item(plan, recs).id == "q2"  # q0 is right only at another step count
    assert picture_item(plan, recs[:3]).id == "q0"  # nobody right: the first item
