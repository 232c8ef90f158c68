"""The eval library without a model: datasets, prompts, per-item seeds, results file, summary numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from remedi.tasks import arith
from remedi.evaluation import data as D
from remedi.evaluation import report
from remedi.evaluation import results as R
from remedi import session
from remedi.evaluation.stats import wilson_interval
from tests.conftest import make_tokenizer, shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data (GSM8K/MATH-500 copies) not present")


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ datasets
@needs_data
def test_gsm8k_test_split_loads_with_numeric_gold():
    spec = D.resolve_dataset(str(DATA / "gsm8k" / "test.jsonl"))
    assert (spec.kind, spec.fmt) == ("file", "gsm8k")
    items = D.load_items(spec)
    assert len(items) == 1319
    assert items[0].id == "test-00000" and items[0].gold == "18"  # Janet's ducks
    assert items[0].solution.endswith("#### 18")
    assert all(it.gold.lstrip("-").replace(".", "").isdigit() for it in items)


@needs_data
def test_folder_with_split_and_math500_fields():
    spec = D.resolve_dataset(str(DATA / "math500"), split="test")
    assert spec.fmt == "math" and spec.name.endswith("test.jsonl")
    items = D.load_items(spec)
    assert len(items) == 500
    assert items[0].id == "test/precalculus/807.json"  # unique_id is the item id
    assert items[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert items[0].extra["level"] == 2
    with pytest.raises(FileNotFoundError, match="validation.jsonl"):
        D.resolve_dataset(str(DATA / "math500"), split="validation")


@needs_data
def test_selection_start_max_samples_and_overshoot():
    items = D.load_items(D.resolve_dataset(str(DATA / "gsm8k" / "test.jsonl")))
    sel, note = D.select_items(items, start=10, max_samples=5)
    assert [it.id for it in sel] == [f"test-{i:05d}" for i in range(10, 15)] and note == ""
    sel, note = D.select_items(items, start=1310, max_samples=50)
    assert len(sel) == 9 and "exceeds the split (1319 items)" in note and "running the 9" in note
    assert len(D.select_items(items, max_samples=-1)[0]) == 1319
    a, _ = D.select_items(items, max_samples=20, shuffle=True, seed=3)
    b, _ = D.select_items(items, max_samples=20, shuffle=True, seed=3)
    c, _ = D.select_items(items, max_samples=20, shuffle=True, seed=4)
    assert a == b and a != c and a != items[:20]
    with pytest.raises(ValueError, match="--start 2000 is past the end"):
        D.select_items(items, start=2000)


def test_missing_fields_are_listed(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"prompt": "1+1", "target": "2"}])
    with pytest.raises(ValueError, match=r"fields found: \['prompt', 'target'\]"):
        D.load_items(D.resolve_dataset(str(path), fmt="gsm8k"))
    with pytest.raises(ValueError, match="cannot tell the answer format"):
        D.resolve_dataset(str(path))
    with pytest.raises(ValueError, match="--format 'latex'"):
        D.resolve_dataset(str(path), fmt="latex")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        D.resolve_dataset(str(tmp_path / "nope.jsonl"))


def test_local_json_math_with_solution_only_and_duplicate_ids(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"problem": "p", "solution": "so $\\boxed{\\frac12}$."}]))
    [it] = D.load_items(D.resolve_dataset(str(path)))
    assert it.gold == "\\frac12" and it.id == "test-00000"
    dup = _write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "question": "q", "answer": "#### 1"}] * 2)
    with pytest.raises(ValueError, match="duplicate item id 'a'"):
        D.load_items(D.resolve_dataset(str(dup)))


def test_arith_files_are_recognised_by_their_ids(tmp_path):
    path = _write_jsonl(tmp_path / "test.jsonl",
                        [{"id": "arith-test-00000", "question": "Ann has 3 pens.", "answer": "3 + 0 = 3\n#### 3",
                          "n_ops": 1}])
    spec = D.resolve_dataset(str(path))
    assert (spec.kind, spec.fmt) == ("arith", "gsm8k")
    assert D.load_items(spec)[0].extra == {"n_ops": 1}


# ------------------------------------------------------------------------------------------ prompts
def test_arith_prompt_is_the_bare_question_as_in_training():
    assert arith.prompt("Ann has 3 pens. How many?") == "Ann has 3 pens. How many?"
    assert D.build_prompt("Q?", "gsm8k", "arith") == "Q?"
    assert D.build_prompt("Q?", "gsm8k", "arith_chat") == "Q?"  # chat: the bare question is the user message
    spec = D.ItemSource("arith", "x.jsonl", "gsm8k")
    assert (D.prompt_style(spec, False), D.prompt_style(spec, True)) == ("arith", "arith_chat")


@needs_data
def test_fewshot_prompt_from_gsm8k_train():
    spec = D.resolve_dataset(str(DATA / "gsm8k" / "test.jsonl"))
    src = D.fewshot_source(spec, None)
    assert src.name.endswith("train.jsonl") and src.split == "train"
    train = D.load_items(src)
    shots = D.fewshot_exemplars(train, 3)
    assert [s.id for s in shots] == ["train-00000", "train-00001", "train-00002"]
    text = D.build_prompt("How many ducks?", "gsm8k", "plain", shots)
    assert text.count("Question: ") == 4 and text.count("#### ") == 3
    assert text.startswith(f"Question: {train[0].question}\nAnswer: {train[0].solution}\n\n")
    assert text.endswith("Question: How many ducks?\nAnswer:")
    with pytest.raises(ValueError, match="only 3 exemplars"):
        D.fewshot_exemplars(train[:3], 4)


def test_zero_shot_prompts_and_chat_encoding():
    assert D.build_prompt("Q?", "gsm8k", "plain") == "Question: Q?\nAnswer:"
    assert D.build_prompt("Q?", "math", "chat").endswith("final answer within \\boxed{}.")
    assert "'####'" in D.build_prompt("Q?", "gsm8k", "chat")
    tok = make_tokenizer()
    ids, shown = D.encode(tok, "Q?", "chat")
    assert shown.startswith("<|startoftext|><|start_header_id|>user")
    assert shown.endswith("assistant<|end_header_id|>\n\n")
    assert tok.decode(ids) == shown
    ids, shown = D.encode(tok, "Question: Q?\nAnswer:", "plain")
    assert shown == "Question: Q?\nAnswer:" and tok.decode(ids) == shown


# ------------------------------------------------------------------------------------------ seeds
def test_item_seed_is_stable_and_item_specific():
    assert session.item_seed(0, "test-00000") == session.item_seed(0, "test-00000")
    assert session.item_seed(0, "test-00000") == 2097814171826700838  # pinned: stable across versions
    seeds = {session.item_seed(s, f"test-{i:05d}") for s in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)
    a = torch.rand(5, generator=session.item_generator(1, "x"))
    b = torch.rand(5, generator=session.item_generator(1, "x"))
    assert torch.equal(a, b) and not torch.equal(a, torch.rand(5, generator=session.item_generator(1, "y")))


# ------------------------------------------------------------------------------------------ results file
def test_results_file_torn_last_line_is_cut_and_bad_middle_line_fails(tmp_path):
    path = tmp_path / "results.jsonl"
    R.append_records(path, [{"id": "1", "source": "s", "steps": 8}, {"id": "2", "source": "s", "steps": 8}])
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"id": "3", "sour')
    assert [r["id"] for r in R.read_results(path)] == ["1", "2"]
    assert path.read_bytes().endswith(b"sour")  # reading alone never modifies
    assert len(R.read_results(path, repair=True)) == 2 and path.read_bytes() == good
    path.write_bytes(good[:-1])  # complete last record without its newline: kept, newline restored
    assert len(R.read_results(path, repair=True)) == 2 and path.read_bytes() == good
    path.write_bytes(b"{oops\n" + good)
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        R.read_results(path)
    assert R.read_results(tmp_path / "absent.jsonl") == []


def test_resume_check_names_the_differences():
    R.check_resume({"gen_length": 64, "seed": 0}, {"gen_length": 64, "seed": 0})
    with pytest.raises(ValueError, match=r"gen_length: 64 in the earlier run, 96 now"):
        R.check_resume({"gen_length": 64, "seed": 0}, {"gen_length": 96, "seed": 0})


def test_model_defaults_json_fills_only_flags_not_given(tmp_path):
    from remedi.arguments import parse_args
    from remedi.decoding.args import SamplingArgs

    (tmp_path / "defaults.json").write_text(json.dumps({"steps": 96, "gen_length": 128, "cache_refresh": 2,
                                                        "bogus": 1}))
    (s,) = parse_args([SamplingArgs], ["--steps=32", "--cache", "dual"])
    origin = s.resolve(tmp_path).origin
    assert (s.steps, s.gen_length, s.block_length, s.cache, s.cache_refresh) == (32, 128, 32, "dual", 2)
    assert origin["steps"] == "command line" and origin["block_length"] == "library default"
    assert origin["gen_length"] == str(tmp_path / "defaults.json")
    # A prefix of a flag was once taken for it (and had to count as given, or defaults.json overrode it); now it
    # is refused, naming the flag, so a typed value can never be silently replaced.
    with pytest.raises(ValueError, match=r"--gen_len: did you mean --gen_length\?"):
        parse_args([SamplingArgs], ["--gen_len=8", "--block_length", "8", "--steps", "8"])
    (s,) = parse_args([SamplingArgs], ["--gen_length=8", "--block_length", "8", "--steps", "8"])
    assert s.resolve(tmp_path / "none").gen_length == 8 and s.temperature == 0.0

def _rec(i, src, correct, extracted="1", steps=64, nfe=64, remasks=2, blocks=2, seconds=0.5, toks=10):
    return {"id": f"q{i}", "source": src, "steps": steps, "correct": correct, "extracted": extracted, "nfe": nfe,
            "remasks": remasks, "remasks_per_block": [remasks // blocks] * blocks, "seconds": seconds,
            "gen_tokens": toks}


def test_summary_numbers_by_hand():
    # a: 8/10 right; b: 5/10 right; a-only on items 0..3 (b10 = 4), b-only on item 9 (b01 = 1).
    a_ok = [True] * 8 + [False] * 2
    b_ok = [False] * 4 + [True] * 4 + [False, True]
    recs = [_rec(i, "a", ok) for i, ok in enumerate(a_ok)]
    recs += [_rec(i, "b", ok, extracted=None if i < 2 else "3", remasks=0) for i, ok in enumerate(b_ok)]
    s = report.summarize(recs, n_boot=500, seed=0)
    ga, gb = s["groups"]
    assert (ga["label"], ga["n"], ga["correct"], ga["accuracy"]) == ("a", 10, 8, 0.8)
    assert (ga["ci_lo"], ga["ci_hi"]) == pytest.approx(wilson_interval(8, 10))
    assert ga["ci_lo"] == pytest.approx(0.4902, abs=1e-4) and ga["ci_hi"] == pytest.approx(0.9433, abs=1e-4)
    assert (gb["accuracy"], gb["coverage"]) == (0.5, 0.8)
    assert ga["mean_nfe"] == 64 and ga["remasks_per_block"] == 1.0 and gb["remasks_per_block"] == 0.0
    assert ga["tokens_per_s"] == pytest.approx(20.0)
    [p] = s["pairs"]
    assert (p["a"], p["b"], p["n"], p["b10"], p["b01"]) == ("a", "b", 10, 4, 1)
    assert p["p_value"] == pytest.approx(0.375)  # 2 * (1 + 5) / 2**5
    assert p["diff"] == pytest.approx(0.3) and p["diff_lo"] <= 0.3 <= p["diff_hi"]
    md = report.render_markdown(s, "t")
    assert "| a | 10 | 0.800 | [0.490, 0.943] | 1.000 | 64.0 | 1.00 | 20.0 |" in md
    assert "| a | b | 10 | 0.800 | 0.500 | +0.300 |" in md and "| 4 | 1 | 0.375 |" in md


def test_summary_pairs_only_same_steps_and_common_items():
    recs = [_rec(i, "a", True, steps=st) for i in range(4) for st in (16, 32)]
    recs += [_rec(i, "b", i % 2 == 0, steps=st) for i in range(3) for st in (16, 32)]
    s = report.summarize(recs, n_boot=100)
    assert [g["label"] for g in s["groups"]] == ["a@16", "b@16", "a@32", "b@32"]
    assert [(p["a"], p["b"], p["n"]) for p in s["pairs"]] == [("a@16", "b@16", 3), ("a@32", "b@32", 3)]


def test_rescore_records_rechecks_and_requires_fields():
    old = [{"id": "1", "gold": "18", "completion": "so #### 18", "correct": False, "extracted": None}]
    [r] = R.rescore_records(old, "gsm8k")
    assert r["correct"] is True and r["extracted"] == "18" and r["source"] == "model"
    with pytest.raises(ValueError, match=r"lacks \['completion'\]"):
        R.rescore_records([{"id": "1", "gold": "1"}], "gsm8k")


def test_hub_datasets_load_through_datasets_by_name(monkeypatch):
    """openai/gsm8k and HuggingFaceH4/MATH-500 go through datasets.load_dataset with subset and split."""
    import sys
    import types

    calls = []
    tables = {
        ("openai/gsm8k", "main", "test"): [{"question": "Tom has 2 pens and buys 3. How many?",
                                            "answer": "2 + 3 = 5\n#### 5"}],
        ("HuggingFaceH4/MATH-500", None, "test"): [{"problem": "What is $1+1$?", "solution": "$\\boxed{2}$",
                                                     "answer": "2", "unique_id": "test/x/1.json"}],
    }

    def load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return tables[(name, subset, split)]

    fake = types.SimpleNamespace(load_dataset=load_dataset,
                                 get_dataset_split_names=lambda name, subset=None: ["train", "test"])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    gsm = D.load_items(D.resolve_dataset("openai/gsm8k", None, "test", None))
    assert calls[-1] == ("openai/gsm8k", "main", "test")  # the subset defaults to main
    assert gsm[0].gold == "5" and gsm[0].question.startswith("Tom")
    math = D.load_items(D.resolve_dataset("HuggingFaceH4/MATH-500", None, "test", None))
    assert math[0].gold == "2" and "1+1" in math[0].question
    with pytest.raises(ValueError, match="available"):
        D.load_items(D.resolve_dataset("openai/gsm8k", None, "validation", None))
