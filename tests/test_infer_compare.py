"""infer_compare.py end to end on the tiny model, its flags, and its errors before the model loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remedi import infer_compare, session
from remedi.evaluation import compare
from remedi.model.checkpoint import load_pretrained, save_ups
from remedi.model.config import get_config
from remedi.model.llada import RemeDiLM, UPSHead, init_weights
from remedi.decoding.args import SamplingArgs
from remedi.decoding.sampler import STRATEGIES
from remedi.model.loading import EMBEDDED_MODEL

needs_embedded = pytest.mark.skipif(not (EMBEDDED_MODEL / "defaults.json").is_file(),
                                    reason="the embedded model is not in checkpoints/")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "8", "--gen_length", "16", "--block_length", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ups_path(tiny_model_dir, tmp_path_factory) -> Path:
    model = load_pretrained(tiny_model_dir, dtype=torch.float32)
    head = UPSHead(model.config.d_model, 16)
    init_weights(head, std=0.5, generator=torch.Generator().manual_seed(0))
    model.attach_head(head)
    return save_ups(tmp_path_factory.mktemp("ups") / "ups_head.pt", model)


@pytest.fixture
def no_load(monkeypatch):
    """Make any weight load fail loudly: errors must come before it."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(session, "load_model", boom)


@pytest.mark.slow
def test_end_to_end_with_ups(tiny_model_dir, ups_path, tmp_path, capsys):
    out, traj = tmp_path / "cmp.jsonl", tmp_path / "traj"
    recs = infer_compare.main(["--model_name", str(tiny_model_dir), "--ups_head", str(ups_path),
                               "--prompt", "Janet has 3 apples.", "--prompt", "Write a Python function.", *SMALL,
                               "--temperature", "0.0", "--cfg_scale", "0.0", "--mask_id", "0", "--logits_eos_inf",
                               "--confidence_eos_eot_inf", "--output_jsonl", str(out), "--trajectory_out", str(traj),
                               "--batch_size", "2", "--sources", "ups,tps_prob,random"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == json.loads(json.dumps(recs))
    assert [(r["prompt"][:5], r["source"]) for r in lines] == [
        ("Janet", "ups"), ("Janet", "tps_prob"), ("Janet", "random"),
        ("Write", "ups"), ("Write", "tps_prob"), ("Write", "random")]  # --sources ups,tps_prob,random
    for r in lines:
        assert {"prompt", "source", "text", "generated_ids", "nfe", "remasks", "remasks_per_block", "seconds"} <= set(r)
        assert r["nfe"] == 8 and len(r["generated_ids"]) == 16 and all(isinstance(t, int) for t in r["generated_ids"])
        assert 1 not in r["generated_ids"]  # --logits_eos_inf: EOS (id 1 in the test tokenizer) never predicted
        assert r["remasks"] == sum(r["remasks_per_block"])
    pngs = sorted(p.name for p in traj.glob("*.png"))
    assert len(pngs) == 6 and len(list(traj.glob("*.html"))) == 6 and "prompt000_ups.png" in pngs
    assert (traj / "prompt001_random.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (traj / "prompt000_tps_prob.html").read_text()
    printed = capsys.readouterr().out
    assert "[1] Janet has 3 apples." in printed and "remasks" in printed and "--- tps_prob:" in printed


def test_batch_size_does_not_change_results(tiny_model_dir, tmp_path):
    args = ["--model_name", str(tiny_model_dir), "--prompt", "Janet has 3 apples.", "--prompt", "The answer is",
            "--prompt", "A robe takes 2 bolts", *SMALL, "--temperature", "0.8", "--sources", "random,llada_random"]
    one = infer_compare.main(args + ["--batch_size", "1"])
    three = infer_compare.main(args + ["--batch_size", "3"])
    assert [r["generated_ids"] for r in one] == [r["generated_ids"] for r in three]


def test_default_sources_and_prompts_file(tiny_model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("Janet has 3 apples.\n\nThe answer is\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "How many apples?"}) + "\n"
                                      + json.dumps({"prompt": "Give a brief plan"}) + "\n")
    recs = infer_compare.main(["--model_name", str(tiny_model_dir), "--prompts_file", str(tmp_path / "p.txt"),
                               *SMALL, "--chat"])
    free = ["llada_low_confidence", "llada_random", "tps_prob", "margin", "entropy", "random"]  # every source but ups
    assert [r["source"] for r in recs[:6]] == free
    assert len(recs) == 2 * 6 and recs[0]["chat"] is True and "correct" not in recs[0]
    recs = infer_compare.main(["--model_name", str(tiny_model_dir), "--prompts_file", str(tmp_path / "p.jsonl"),
                               "--prompt", "first", *SMALL, "--sources", "margin", "--no_chat"])
    assert [r["prompt"] for r in recs] == ["first", "How many apples?", "Give a brief plan"]


@pytest.mark.slow
def test_runs_as_a_file(tiny_model_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "remedi/infer_compare.py", "--model_name", str(tiny_model_dir),
                        "--prompt", "Janet has", "--steps", "4", "--gen_length", "8", "--block_length", "8",
                        "--sources", "llada_low_confidence", "--output_jsonl", str(out), "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["source"] == "llada_low_confidence"


def _bad_ups(tmp_path) -> Path:
    cfg = get_config("test-tiny", d_model=32, n_heads=4, n_kv_heads=4)
    m = RemeDiLM(cfg)
    m.attach_head(UPSHead(32))
    return save_ups(tmp_path / "other.pt", m)


@pytest.mark.parametrize("extra, match", [
    (["--gen_length", "16", "--block_length", "5"], "--block_length 5 must divide --gen_length 16"),
    (["--gen_length", "16", "--block_length", "4", "--steps", "6"], "--steps 6 must be divisible"),
    (["--gen_length", "256", "--block_length", "32", "--steps", "8"], "max_sequence_length"),
    (["--sources", "ups"], "--ups_head"),
    (["--sources", "tps_prob,confidence"], "unknown source"),
    (["--mask_id", "126336"], "pass --mask_id 0"),
    (["--prompt", "   "], "empty prompt"),
    (["--temperature", "-1"], "--temperature"),
    (["--batch_size", "0"], "--batch_size"),
])
def test_bad_input_fails_before_loading(tiny_model_dir, no_load, extra, match):
    base = ["--model_name", str(tiny_model_dir), "--prompt", "Janet has 3 apples.", *SMALL]
    with pytest.raises(ValueError, match=match):
        infer_compare.main(base + extra)


def test_bad_ups_and_missing_prompt(tiny_model_dir, no_load, tmp_path):
    with pytest.raises(ValueError, match="hidden size 32"):
        infer_compare.main(["--model_name", str(tiny_model_dir), "--prompt", "x", "--ups_head",
                            str(_bad_ups(tmp_path)), *SMALL])
    with pytest.raises(ValueError, match="no prompt"):
        infer_compare.main(["--model_name", str(tiny_model_dir), *SMALL])


def test_sampling_args_roundtrip():
    s = SamplingArgs(steps=8, gen_length=16, block_length=8, temperature=0.5).resolve(None)
    c = s.to_sampler_config("tps_prob", record_trajectory=True)
    assert (c.strategy, c.steps, c.temperature, c.record_trajectory) == ("tps_prob", 8, 0.5, True)
    assert SamplingArgs().resolve(None).steps == c.__class__().steps  # one source for the defaults
    with pytest.raises(ValueError, match="--block_length"):
        SamplingArgs(gen_length=10, block_length=4).resolve(None)
    with pytest.raises(RuntimeError, match="resolve"):
        SamplingArgs().to_sampler_config("tps_prob")


def test_trajectory_facts_and_files(tmp_path):
    from remedi.model.loading import SpecialIds
    from remedi.decoding.sampler import SamplerConfig, generate
    from remedi.decoding.trajectory import analyse, draw_trajectory

    from tests.helpers.sampler import FakeModel

    cfg = SamplerConfig(strategy="tps_prob", steps=4, gen_length=4, block_length=4, record_trajectory=True)
    g = generate(FakeModel(P=2), [[1, 2]], cfg, SpecialIds(mask=7, eos=6, pad=6))[0]
    a = analyse(g.trajectory)
    assert a["remasks"] == [(0, 1)]  # the wrong token at position 0 was taken back at step 1
    assert a["final_step"] == [2, 1, 1, 3] and a["final"] == FakeModel.RIGHT
    assert [row[0] for row in a["state"]] == [2, 0, 1, 1]  # discarded, masked, then its final token
    draw_trajectory(g, None, tmp_path / "t.png", tmp_path / "t.html", title="fake")
    assert (tmp_path / "t.png").stat().st_size > 1000
    page = (tmp_path / "t.html").read_text()
    assert page.count("<tr>") == 2 + 4 and "remasked here" in page
    with pytest.raises(ValueError, match="record_trajectory"):
        draw_trajectory(generate(FakeModel(P=2), [[1, 2]], SamplerConfig(strategy="tps_prob", steps=4, gen_length=4,
                                                                     block_length=4), SpecialIds(7, 6, 6))[0],
                        None, tmp_path / "u.png")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["tps_prob", "llada_low_confidence"])
def test_trajectory_of_a_gated_generation(tmp_path, strategy):
    from remedi.decoding.sampler import SamplerConfig, generate
    from remedi.decoding.trajectory import analyse, draw_trajectory

    from tests.helpers.sampler import IDS, PROMPTS, _model

    cfg = SamplerConfig(strategy=strategy, steps=8, gen_length=16, block_length=8, eos_gating=True,
                        record_trajectory=True)
    for g in generate(_model(), PROMPTS, cfg, IDS):
        a = draw_trajectory(g, None, tmp_path / "g.png", tmp_path / "g.html")
        assert a["n_pos"] == 8 * len(g.remasks_per_block) and len(g.trajectory) == g.nfe
        assert all(fs is not None for fs in a["final_step"])
        assert analyse(g.trajectory)["final"][:len(g.tokens)] == g.tokens


def test_interactive_mode_reads_prompts_until_an_empty_line(tiny_model_dir, tmp_path, capsys):
    import io

    from remedi.arguments import ModelArgs, parse_args

    out = tmp_path / "chat.jsonl"
    m, s, c = parse_args([ModelArgs, SamplingArgs, compare.CompareArgs],
                         ["--model_name", str(tiny_model_dir), *SMALL, "--sources", "entropy,llada_low_confidence",
                          "--interactive", "--output_jsonl", str(out)])
    recs = compare.run_compare(m, s, c, stdin=io.StringIO("Janet has 3 apples.\nThe answer is\n\nnever read\n"))
    assert [(r["prompt"], r["source"]) for r in recs] == [
        ("Janet has 3 apples.", "entropy"), ("Janet has 3 apples.", "llada_low_confidence"),
        ("The answer is", "entropy"), ("The answer is", "llada_low_confidence")]
    printed = capsys.readouterr().out
    assert printed.count("prompt> ") == 3 and "never read" not in printed and "--- entropy:" in printed
    assert len(out.read_text().splitlines()) == 4
    # the loop's prompt i draws like the batch mode's prompt i (same seed scheme): prompt 1 here = prompt 1 there
    batch = infer_compare.main(["--model_name", str(tiny_model_dir), *SMALL, "--sources", "entropy",
                                "--prompt", "x", "--prompt", "The answer is", "--temperature", "0.9"])
    loop = compare.run_compare(*parse_args([ModelArgs, SamplingArgs, compare.CompareArgs],
                                           ["--model_name", str(tiny_model_dir), *SMALL, "--sources", "entropy",
                                            "--prompt", "x", "--interactive", "--temperature", "0.9"]),
                               stdin=io.StringIO("The answer is\nquit\n"))
    assert loop[1]["generated_ids"] == batch[1]["generated_ids"]
    # end of input ends the loop too
    assert compare.run_compare(m, s, c, stdin=io.StringIO("")) == []


@needs_embedded
def test_no_arguments_decodes_the_first_test_problem_with_every_source_and_grades_it(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # the demo saves under runs/
    recs = infer_compare.main(["--steps", "24"])
    assert [r["source"] for r in recs] == list(STRATEGIES)  # entropy and llada_low_confidence included
    assert {r["id"] for r in recs} == {"arith-test-00000"} and all("correct" in r for r in recs)
    gold = recs[0]["gold"]
    printed = capsys.readouterr().out
    right = [r["source"] for r in recs if r["correct"]]
    assert f"gold answer: {gold}; right: {', '.join(right) if right else 'none'}" in printed
    saved = list((tmp_path / "runs").glob("infer_compare-*.jsonl"))
    assert len(saved) == 1 and [json.loads(x)["source"] for x in saved[0].read_text().splitlines()] == list(STRATEGIES)
