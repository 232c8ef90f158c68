"""Code tasks (--format humaneval|mbpp) in the project's own eval: sandboxed scoring, resume, rescore.

The sampler is replaced by a fake that returns known completions (correct or wrong) per problem, so the
test is about the eval path: records get correct = the tests passed and a sandbox status, pass@1 is their
mean, finished items are skipped on resume and --rescore re-executes the stored completions.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from remedi import eval_gsm_math as script
from remedi import session
from remedi.decoding.sampler import Generation
from remedi.evaluation import data as D
from remedi.evaluation import results as R

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

SAMPLING = ["--steps", "4", "--gen_length", "8", "--block_length", "4", "--trajectory_out", "none"]

HUMANEVAL = [
    {"task_id": "Toy/0", "entry_point": "add",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"},
    {"task_id": "Toy/1", "entry_point": "reverse",
     "prompt": 'def reverse(s: str) -> str:\n    """Return s reversed."""\n',
     "canonical_solution": "    return s[::-1]\n",
     "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n    assert candidate('') == ''\n"},
    {"task_id": "Toy/2", "entry_point": "total",
     "prompt": 'def total(xs: list) -> int:\n    """Sum of xs."""\n',
     "canonical_solution": "    return sum(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"},
]
# what the "model" answers: a body continuation, a wrong body, a fenced full definition plus trailing chatter
HE_COMPLETIONS = {
    "add": "    return a + b\n\n\nprint(add(1, 2))\n",
    "reverse": "    return s\n",
    "total": "Here it is:\n```python\ndef total(xs: list) -> int:\n    out = 0\n    for x in xs:\n        out += x\n"
             "    return out\n```\nDone.",
}
HE_EXPECTED = {"Toy/0": (True, "passed"), "Toy/1": (False, "failed"), "Toy/2": (True, "passed")}

MBPP = [
    {"task_id": 11, "prompt": "Write a function to square a number.", "code": "def square(x):\n    return x * x\n",
     "test_imports": [], "test_list": ["assert square(3) == 9", "assert square(-2) == 4"]},
    {"task_id": 12, "prompt": "Write a function that returns the maximum of a list.",
     "code": "def biggest(xs):\n    return max(xs)\n", "test_imports": [],
     "test_list": ["assert biggest([1, 5, 2]) == 5", "assert biggest([-3]) == -3"]},
]
MBPP_COMPLETIONS = {"square": "```python\ndef square(x):\n    return x ** 2\n```",
                    "biggest": "```python\ndef biggest(xs):\n    return min(xs)\n```"}
MBPP_EXPECTED = {"11": (True, "passed"), "12": (False, "failed")}


@pytest.fixture(scope="module")
def code_model_dir(tmp_path_factory) -> Path:
    """The tests' tiny LLaDA with room for MBPP's instruction prompt (the tiny tokenizer spends many tokens)."""
    from tests.conftest import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("code") / "tiny-llada", max_sequence_length=1024)


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fake_sampler(monkeypatch, code_model_dir):
    """Replace the sampler: each prompt gets the canned completion of the function its text names."""
    from remedi.model.loading import load_tokenizer

    tok = load_tokenizer(code_model_dir)
    calls = []

    def fake(model, prompts, cfg, ids, generators):
        out = []
        for p in prompts:
            text = tok.decode(p, skip_special_tokens=True)
            [name] = [k for k in {**HE_COMPLETIONS, **MBPP_COMPLETIONS} if f"def {k}(" in text or f"{k}(" in text]
            completion = {**HE_COMPLETIONS, **MBPP_COMPLETIONS}[name]
            ids_ = tok(completion, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids_, skip_special_tokens=True) == completion  # byte-level: exact round trip
            out.append(Generation(ids_, cfg.steps, 0, [0] * cfg.num_blocks, 0.01))
            calls.append(name)
        return out

    monkeypatch.setattr(session, "generate", fake)
    return calls


def _records(out: Path) -> dict:
    return {r["id"]: r for r in R.read_results(out / "results.jsonl")}


def test_humaneval_known_completions_score_one_and_zero(code_model_dir, tmp_path, fake_sampler):
    data = _write(tmp_path / "he.jsonl", HUMANEVAL)
    out = tmp_path / "run"
    summary = script.main(["--model_name", str(code_model_dir), "--dataset", str(data), "--output_dir", str(out),
                           "--sources", "llada_low_confidence", *SAMPLING])
    recs = _records(out)
    assert {i: (r["correct"], r["status"]) for i, r in recs.items()} == HE_EXPECTED
    r0 = recs["Toy/0"]
    assert r0["prompt"] == HUMANEVAL[0]["prompt"]  # plain style: the function header as is
    assert r0["extracted"] == "    return a + b\n"  # cut at the top-level print
    assert r0["problem"]["entry_point"] == "add" and "check" in r0["problem"]["test"]
    assert "def total" in recs["Toy/2"]["extracted"]  # the fenced full definition was kept whole
    [g] = summary["groups"]
    assert summary["metric"] == "pass@1" and g["accuracy"] == pytest.approx(2 / 3)
    assert g["status"] == {"failed": 1, "passed": 2}
    assert json.loads((out / "config.json").read_text())["fixed"]["format"] == "humaneval"
    assert "| source | n | pass@1 |" in (out / "summary.md").read_text()


def test_mbpp_format_and_prompt(code_model_dir, tmp_path, fake_sampler):
    data = _write(tmp_path / "mbpp.jsonl", MBPP)
    out = tmp_path / "run"
    script.main(["--model_name", str(code_model_dir), "--dataset", str(data), "--format", "mbpp",
                 "--output_dir", str(out), "--sources", "llada_low_confidence", *SAMPLING])
    recs = _records(out)
    assert {i: (r["correct"], r["status"]) for i, r in recs.items()} == MBPP_EXPECTED
    assert "assert square(3) == 9" in recs["11"]["prompt"] and "```python" in recs["11"]["prompt"]


def test_resume_skips_finished_code_items(code_model_dir, tmp_path, fake_sampler):
    data = _write(tmp_path / "he.jsonl", HUMANEVAL)
    out = tmp_path / "run"
    argv = ["--model_name", str(code_model_dir), "--dataset", str(data), "--output_dir", str(out),
            "--sources", "llada_low_confidence", *SAMPLING]
    script.main([*argv, "--max_samples", "2"])
    assert fake_sampler == ["add", "reverse"]
    with open(out / "results.jsonl", "a") as f:  # a torn last line (killed mid-write) is cut off
        f.write('{"id": "Toy/2", "sour')
    fake_sampler.clear()
    summary = script.main(argv)
    assert fake_sampler == ["total"]  # only the unfinished item is decoded (and executed)
    recs = _records(out)
    assert {i: (r["correct"], r["status"]) for i, r in recs.items()} == HE_EXPECTED
    assert summary["groups"][0]["n"] == 3


def test_rescore_reexecutes_code(code_model_dir, tmp_path, fake_sampler, monkeypatch):
    data = _write(tmp_path / "he.jsonl", HUMANEVAL)
    out = tmp_path / "run"
    script.main(["--model_name", str(code_model_dir), "--dataset", str(data), "--output_dir", str(out),
                 "--sources", "llada_low_confidence", *SAMPLING])
    # edit the stored completions: fix Toy/1, break Toy/0 (verdicts stay stale until rescored)
    recs = R.read_results(out / "results.jsonl")
    for r in recs:
        if r["id"] == "Toy/1":
            r["completion"] = "    return s[::-1]\n"
        if r["id"] == "Toy/0":
            r["completion"] = "    return a - b\n"
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    def no_model(*a, **k):
        raise AssertionError("--rescore must not load a model")

    monkeypatch.setattr(session, "open_session", no_model)
    summary = script.main(["--rescore", str(out / "results.jsonl")])
    new = {r["id"]: (r["correct"], r["status"]) for r in R.read_results(out / "rescored.jsonl")}
    assert new == {"Toy/0": (False, "failed"), "Toy/1": (True, "passed"), "Toy/2": (True, "passed")}
    assert summary["verdicts_changed"] == 2 and summary["format"] == "humaneval"
    with pytest.raises(ValueError, match="problem"):
        R.rescore_records([{"id": "x", "completion": "pass"}], "humaneval")


def test_weak_sandbox_is_refused_before_the_model_loads(code_model_dir, tmp_path, fake_sampler, monkeypatch,
                                                         capsys):
    """Issue 21 item 7: without bubblewrap the eval stops with one error line naming the layer and the flag."""
    from remedi import sandbox
    from remedi.arguments import run_main

    data = _write(tmp_path / "he.jsonl", HUMANEVAL)
    monkeypatch.setenv("REMEDI_BWRAP", "none")
    loads, real_load = [], session.Session.load
    monkeypatch.setattr(session.Session, "load", lambda self, *a, **k: (loads.append(a), real_load(self, *a, **k))[1])
    argv = ["--model_name", str(code_model_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "run"),
            "--sources", "llada_low_confidence", *SAMPLING]
    with pytest.raises(SystemExit) as ex:
        run_main(script.main, argv)
    err = capsys.readouterr().err
    assert ex.value.code == 2 and loads == [] and not (tmp_path / "run" / "results.jsonl").exists()
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "pidns" in line and "--allow_weak_sandbox" in line
    try:
        script.main(argv + ["--allow_weak_sandbox"])
    finally:
        sandbox.accept_weak_host(False)
    recs = _records(tmp_path / "run")
    assert loads and {i: (r["correct"], r["status"]) for i, r in recs.items()} == HE_EXPECTED


def test_code_datasets_resolve_and_prompt(tmp_path):
    he = D.resolve_dataset("openai_humaneval")
    assert (he.kind, he.fmt, he.subset) == ("hub", "humaneval", None)
    mb = D.resolve_dataset("mbpp")
    assert (mb.kind, mb.fmt, mb.subset) == ("hub", "mbpp", "sanitized")
    assert D.resolve_dataset("google-research-datasets/mbpp").fmt == "mbpp"
    local = D.resolve_dataset(str(_write(tmp_path / "x.jsonl", HUMANEVAL)))  # recognised by its fields
    assert (local.kind, local.fmt) == ("file", "humaneval")
    assert D.resolve_dataset(str(_write(tmp_path / "y.jsonl", MBPP))).fmt == "mbpp"
    items = D.load_items(local)
    assert [it.id for it in items] == ["Toy/0", "Toy/1", "Toy/2"] and items[0].problem["entry_point"] == "add"
    assert D.build_prompt(items[0].question, "humaneval", "plain") == HUMANEVAL[0]["prompt"]
    chat = D.build_prompt(items[0].question, "humaneval", "chat")
    assert chat.startswith("Complete the following Python function") and HUMANEVAL[0]["prompt"] in chat
    with pytest.raises(ValueError, match="--fewshot is not supported"):
        D.fewshot_source(local, None)
    rec = R.make_record(items[1], "s", 4, "p", "    return s[::-1]\n", "humaneval", nfe=4)
    assert (rec["correct"], rec["status"], rec["nfe"]) == (True, "passed", 4)


def test_pass_at_k_from_samples_of_each_item():
    from remedi.evaluation.report import pass_at_k_table, render_markdown, summarize

    recs = [{"id": f"p{i}#{k}", "source": "s", "steps": 8, "correct": c, "extracted": "x"}
            for i, row in enumerate([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]) for k, c in enumerate(row)]
    table = pass_at_k_table(recs)
    assert list(table) == ["1", "2", "4"]
    assert table["1"] == pytest.approx((0.25 + 0 + 1) / 3) and table["4"] == pytest.approx(2 / 3)
    assert table["2"] == pytest.approx((0.5 + 0 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 0.5 for the first item
    summary = summarize(recs)
    assert summary["groups"][0]["pass_at_k"] == table and "pass@4" in render_markdown(summary)
    assert "pass_at_k" not in summarize([dict(r, id=r["id"].replace("#", "-")) for r in recs])["groups"][0]


def test_n_samples_draws_each_sample_from_its_own_stream(tiny_model_dir, tmp_path):
    import json

    from remedi import eval_gsm_math

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Ann has {i} pens. How many?",
                                        "answer": f"#### {i}"}) + "\n" for i in range(2)))
    summary = eval_gsm_math.main(["--model_name", str(tiny_model_dir), "--dataset", str(data), "--sources",
                                  "tps_prob", "--n_samples", "2", "--temperature", "1.0", "--steps", "8",
                                  "--gen_length", "16", "--block_length", "8", "--output_dir", str(tmp_path / "o"),
                                  "--trajectory_out", "none"])
    recs = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == ["q0#0", "q0#1", "q1#0", "q1#1"]
    assert recs[0]["completion"] != recs[1]["completion"] or recs[2]["completion"] != recs[3]["completion"]
    g = summary["groups"][0]
    assert set(g["pass_at_k"]) == {"1", "2"} and g["pass_at_k"]["1"] == pytest.approx(g["accuracy"])
