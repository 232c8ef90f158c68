"""The inference session and the one argument path: defaults before validation, one seed scheme, one read."""
from __future__ import annotations

import json

import pytest

from remedi import eval_gsm_math, infer_compare, session
from remedi.arguments import parse_args
from remedi.decoding.args import SamplingArgs
from remedi.model import checkpoint
from remedi.model.checkpoint import load_pretrained, save_ups
from remedi.model.llada import UPSHead
from remedi.model.loading import EMBEDDED_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

needs_embedded = pytest.mark.skipif(not (EMBEDDED_MODEL / "defaults.json").is_file(),
                                    reason="the embedded model is not in checkpoints/")


class Loaded(Exception):
    """Raised by the stand-in loader: every check before the weights passed."""


@pytest.fixture
def stop_at_load(monkeypatch):
    def stop(*a, **k):
        raise Loaded

    monkeypatch.setattr(session, "load_model", stop)


@needs_embedded
@pytest.mark.parametrize("flags", [["--steps", "45"], ["--block_length", "48"]])
def test_values_valid_for_the_model_folder_are_accepted(stop_at_load, flags, tmp_path):
    """gen 96 comes from the embedded model's defaults.json before --steps/--block_length are validated
    (against the library's gen 64 they were refused)."""
    with pytest.raises(Loaded):
        infer_compare.main(["--prompt", "Ann has 3 pens. How many pens?", *flags])
    with pytest.raises(Loaded):
        eval_gsm_math.main(["--max_samples", "2", "--trajectory_out", "none", "--output_dir", str(tmp_path / "e"),
                            *flags])


@needs_embedded
def test_invalid_for_the_model_is_refused_with_the_models_numbers(stop_at_load):
    with pytest.raises(ValueError, match=r"--steps 44 must be divisible by the number of blocks 3.*e.g. --steps 42"):
        infer_compare.main(["--prompt", "x", "--steps", "44"])


def test_cache_flag_does_not_hide_a_model_default(tmp_path):
    """`--cache dual` used to count as giving --cache_refresh (argv prefix matching)."""
    (tmp_path / "defaults.json").write_text(json.dumps({"cache_refresh": 3}))
    (s,) = parse_args([SamplingArgs], ["--cache", "dual"])
    assert s.resolve(tmp_path).cache_refresh == 3 and s.origin["cache"] == "command line"


def test_help_says_where_defaults_come_from(capsys):
    with pytest.raises(SystemExit):
        eval_gsm_math.main(["--help"])
    out = capsys.readouterr().out
    assert "defaults.json, else 64" in out and "(default: None)" not in out
    assert "python remedi/eval_gsm_math.py --model_name GSAI-ML/LLaDA-8B-Base" in out  # examples kept verbatim


def test_same_seed_same_sample_in_both_scripts(tiny_model_dir, tmp_path):
    """Item id "0" in eval and the first prompt of infer_compare draw from the same random stream."""
    question = "Janet has 3 apples and buys 4 more. How many apples does she have?"
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"id": "0", "question": question, "answer": "3 + 4 = 7 #### 7"}) + "\n")
    common = ["--model_name", str(tiny_model_dir), "--steps", "8", "--gen_length", "16", "--block_length", "8",
              "--temperature", "1.0", "--seed", "5"]
    eval_gsm_math.main([*common, "--dataset", str(data), "--sources", "tps_prob", "--output_dir",
                        str(tmp_path / "eval"), "--trajectory_out", "none"])
    (rec,) = [json.loads(x) for x in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    (cmp,) = infer_compare.main([*common, "--prompt", rec["prompt"], "--sources", "tps_prob"])
    assert cmp["text"] == rec["completion"] and cmp["text"].strip()
    (other,) = infer_compare.main([*common[:-1], "6", "--prompt", rec["prompt"], "--sources", "tps_prob"])
    assert other["text"] != cmp["text"]  # the seed matters at temperature 1


def test_ups_checkpoint_is_read_once_per_run(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    model = load_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    model.attach_head(UPSHead(model.config.d_model))
    ups = save_ups(tmp_path / "ups.pt", model)
    reads = []
    real = checkpoint.read_ups
    monkeypatch.setattr(checkpoint, "read_ups", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    infer_compare.main(["--model_name", str(tiny_model_dir), "--ups_head", str(ups), "--prompt", "Ann has 3 pens.",
                        "--steps", "8", "--gen_length", "16", "--block_length", "8", "--sources", "ups"])
    assert reads == [str(ups)] or [str(r) for r in reads] == [str(ups)]


def test_compare_output_paths_fail_before_the_model_loads(tiny_model_dir, stop_at_load, tmp_path):
    small = ["--model_name", str(tiny_model_dir), "--prompt", "x", "--steps", "8", "--gen_length", "16",
             "--block_length", "8"]
    with pytest.raises(ValueError, match="--output_jsonl .* is a folder"):
        infer_compare.main([*small, "--output_jsonl", str(tmp_path)])
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="--trajectory_out .* is a file"):
        infer_compare.main([*small, "--trajectory_out", str(tmp_path / "f")])


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    from remedi.files import read_jsonl

    p = tmp_path / "r.jsonl"
    p.write_text('{"id": 1}\n[1, 2, 3]\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"r.jsonl: line 2 is a JSON list, not an object"):
        read_jsonl(p)


@pytest.mark.parametrize("row, says", [({"question": "  ", "answer": "#### 3"}, "empty 'question'"),
                                       ({"question": "2 + 1?", "answer": None}, "empty 'answer'"),
                                       ({"question": "2 + 1?"}, "lacks")])
def test_eval_rows_with_empty_or_missing_fields_are_named(tmp_path, row, says):
    from remedi.evaluation import data as D

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"row 2.*{says}|{says}.*row 2|row 2"):
        D.load_items(D.resolve_dataset(str(p), fmt="gsm8k"))


def test_training_refuses_an_eval_folder(tmp_path):
    from remedi import train_remask_sft

    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds an eval run"):
        train_remask_sft.main(["--max_steps", "1", "--output_dir", str(tmp_path)])


def test_eval_refuses_a_training_folder_and_titles_without_paths(tiny_model_dir, tmp_path):
    train_dir = tmp_path / "train_run"
    train_dir.mkdir()
    (train_dir / "args.json").write_text("{}")
    (train_dir / "metrics.jsonl").write_text("")
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"id": "0", "question": "Ann has 3 pens. How many?", "answer": "#### 3"}) + "\n")
    common = ["--model_name", str(tiny_model_dir), "--steps", "8", "--gen_length", "16", "--block_length", "8",
              "--dataset", str(data), "--sources", "tps_prob"]
    with pytest.raises(ValueError, match="holds no eval run"):
        eval_gsm_math.main([*common, "--output_dir", str(train_dir)])
    assert sorted(p.name for p in train_dir.iterdir()) == ["args.json", "metrics.jsonl"]  # nothing written
    summary = eval_gsm_math.main([*common, "--output_dir", str(tmp_path / "ev")])
    title = (tmp_path / "ev" / "summary.md").read_text().splitlines()[0]
    assert str(tmp_path) not in title and "one.jsonl" in title and summary["files"]["accuracy.png"]


@needs_embedded
def test_notebook_api_load_once_text_in_text_out_per_source(tmp_path):
    import remedi

    m = remedi.load(steps=24)
    assert "ups" in m.sources and "entropy" in m.sources
    question = "Ann has 12 pens. Ann buys 30 more pens. How many pens does Ann have?"
    out = m.generate(question, sources=["entropy", "ups"])
    assert list(out) == ["entropy", "ups"]
    for src, d in out.items():
        assert d.source == src and d.text == m.tokenizer.decode(d.tokens, skip_special_tokens=True)
        assert d.nfe <= 24 and len(d.trajectory) == d.nfe  # one trajectory step per forward (no CFG)
    # the same prompt through the script: prompt 0 with the same seed decodes the same tokens
    recs = infer_compare.main(["--prompt", question, "--steps", "24", "--sources", "entropy,ups"])
    assert [r["generated_ids"] for r in recs] == [out["entropy"].tokens, out["ups"].tokens]
    facts = out["ups"].draw(tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG" and facts["n_steps"] == len(out["ups"].trajectory)
    with pytest.raises(ValueError, match="unknown source"):
        m.generate(question, sources="best")
    with pytest.raises(ValueError, match="'stepz' \\(did you mean 'steps'\\?\\)"):
        remedi.load(stepz=3)


def test_rl_demo_summary_lists_its_files_and_the_eval_command():
    from remedi.training.demo import RL_DEMO, rl_summary

    assert "demo" in RL_DEMO
    text = rl_summary({"update": 4, "output_dir": "runs/x", "paths": {"ups": "runs/x/ups.pt",
                                                                     "curves": "runs/x/curves.png"}})
    assert "runs/x/metrics.jsonl" in text and "curves: runs/x/curves.png" in text
    assert "python remedi/eval_gsm_math.py --ups_head runs/x/ups.pt" in text
