"""The lm-eval adapter (remedi/harness.py) under lm-eval's own evaluator, on the embedded model and on CPU.

* generate_until through ``lm_eval.simple_evaluate`` with a local task YAML (tests/lm_eval_tasks) gives the
  same prompts, completions and accuracy as remedi/eval_gsm_math.py on the same items and settings;
* with sampling on, the per-request random streams are the own eval's (``seed_key=id``);
* loglikelihood (LLaDA's Monte-Carlo ELBO) ranks the right continuation first on a multiple-choice task
  the embedded model knows, and not on an untrained model; L = 1 is exact; the estimate is near the
  enumerated ELBO and does not depend on the forward batch;
* until / max_gen_toks handling, presets and overrides, the launcher's run log, two processes = one.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (pip install 'lm-eval==0.4.13')")

from lm_eval.tasks import TaskManager  # noqa: E402

from remedi import eval_gsm_math as own_eval  # noqa: E402
from remedi import harness as H  # noqa: E402
from remedi import session as S  # noqa: E402
from remedi.decoding.sampler import Generation  # noqa: E402
from remedi.evaluation import results as R  # noqa: E402
from remedi.model.loading import EMBEDDED_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "lm_eval_tasks"  # the toy HumanEval task; the embedded ones ship in the package
SHIPPED = REPO / "remedi" / "lm_eval_tasks"
ARITH_TEST = EMBEDDED_MODEL / "data" / "test.jsonl"
N_ITEMS = 20

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not ARITH_TEST.is_file(), reason="the embedded model is not built")]


@pytest.fixture(scope="module", autouse=True)
def lm_eval_logging_to_real_stderr():
    """lm-eval binds its log handler to sys.stderr once per process; under pytest's capture that stream is
    closed after the test, so bind it to the real stderr instead."""
    import logging

    from lm_eval.utils import setup_logging

    setup_logging(logging.WARNING)
    for h in logging.getLogger("lm_eval").handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(sys.__stderr__)
    yield


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    """The task YAMLs name their data files relative to the repository root (as lm-eval is run from there)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@lru_cache(maxsize=1)
def _task_manager() -> TaskManager:
    """lm-eval's task index with tests/lm_eval_tasks (indexing every built-in task takes seconds: once)."""
    return TaskManager(include_path=[str(SHIPPED), str(TASKS)])


def _lm_eval(model_args: str, task: str, limit=None, **kw) -> dict:
    return H.simple_evaluate(model="remedi", model_args=model_args, tasks=[task], limit=limit,
                             task_manager=_task_manager(), log_samples=True, verbosity="WARNING", **kw)


def _own_eval(tmp: Path, *flags: str) -> dict[str, dict]:
    own_eval.main(["--dataset", str(ARITH_TEST), "--output_dir", str(tmp), "--trajectory_out", "none", *flags])
    return {r["id"]: r for r in R.read_results(tmp / "results.jsonl")}


def _samples(res: dict, task: str) -> dict[str, dict]:
    return {s["doc"]["id"]: s for s in res["samples"][task]}


# ------------------------------------------------------------------------------ generate_until
@pytest.mark.slow
def test_lm_eval_matches_own_eval_on_embedded_model(tmp_path, capsys):
    """Same items, prompts (the bare question), settings (defaults.json: gen 96, block 32, 48 steps, dual
    cache, EOS gating), source tps_prob, greedy: lm-eval's exact match = eval_gsm_math's accuracy."""
    t0 = time.time()
    res = _lm_eval("strategy=tps_prob,seed_key=id,batch_size=8", "remedi_arith", limit=N_ITEMS)
    t_lm = time.time() - t0
    own = _own_eval(tmp_path / "own", "--max_samples", str(N_ITEMS), "--sources", "tps_prob", "--infer_bs", "8")
    lm = _samples(res, "remedi_arith")
    assert set(lm) == set(own) and len(own) == N_ITEMS
    for iid, rec in own.items():
        s = lm[iid]
        assert s["arguments"][0][0] == rec["prompt"], iid  # identical prompt text
        assert s["resps"][0][0] == H.cut_at_stops(rec["completion"], ["Question:"]), iid  # identical decode
        assert bool(s["exact_match"]) == rec["correct"], (iid, s["filtered_resps"], rec["extracted"], rec["gold"])
    acc_lm = res["results"]["remedi_arith"]["exact_match,strict-match"]
    acc_own = sum(r["correct"] for r in own.values()) / len(own)
    assert acc_lm == pytest.approx(acc_own) and 0 < acc_own < 1
    summary = res["remedi"]["generate_until"]
    assert summary["requests"] == N_ITEMS and summary["nfe"] == sum(r["nfe"] for r in own.values())
    assert summary["gen_tokens"] == sum(r["gen_tokens"] for r in own.values())
    assert summary["tokens_per_forward"] == pytest.approx(summary["gen_tokens"] / summary["nfe"])
    assert summary["tokens_per_s"] > 0
    cfg = res["config"]["remedi"]["settings"]
    assert (cfg["strategy"], cfg["gen_length"], cfg["block_length"], cfg["steps"], cfg["cache"]) == \
        ("tps_prob", 96, 32, 48, "dual")
    with capsys.disabled():
        print(f"\nembedded model, first {N_ITEMS} test items, tps_prob greedy: lm-eval exact_match {acc_lm:.3f}, "
              f"eval_gsm_math accuracy {acc_own:.3f}; tokens/forward {summary['tokens_per_forward']:.2f}; "
              f"lm-eval side {t_lm:.1f}s")


@pytest.mark.slow
def test_sampling_streams_match_own_eval(tmp_path):
    """temperature 0.8 and the random remask source draw from item_generator(seed, item id) on both sides
    (seed_key=id), at different batch sizes: identical completions."""
    n, flags = 4, ("steps=24", "temperature=0.8", "seed=3")
    res = _lm_eval(",".join(("strategy=random", "seed_key=id", "batch_size=3", *flags)), "remedi_arith", limit=n)
    own = _own_eval(tmp_path / "own", "--max_samples", str(n), "--sources", "random", "--infer_bs", "4",
                    "--steps", "24", "--temperature", "0.8", "--seed", "3")
    lm = _samples(res, "remedi_arith")
    for iid, rec in own.items():
        assert lm[iid]["resps"][0][0] == H.cut_at_stops(rec["completion"], ["Question:"]), iid
    # the adapter called directly (other batch size) gives the same texts; another seed other texts
    docs = [lm[i]["doc"] for i in sorted(lm)]
    reqs = [_Req((lm[d["id"]]["arguments"][0][0], {"until": ["Question:"]}), k, doc=d) for k, d in enumerate(docs)]
    for seed, same in ((3, True), (4, False)):
        direct = H.RemediLM(strategy="random", seed_key="id", steps=24, temperature=0.8, seed=seed, batch_size=4,
                            default_ups=False).generate_until(reqs, disable_tqdm=True)
        assert (direct == [lm[d["id"]]["resps"][0][0] for d in docs]) is same


class _Req:
    """The fields of an lm_eval Instance that the adapter reads."""

    def __init__(self, args, doc_id=0, task="t", idx=0, doc=None, repeats=1):
        self.args, self.doc_id, self.task_name, self.idx, self.doc, self.repeats = args, doc_id, task, idx, doc, repeats


@pytest.fixture(scope="module")
def embedded_lm():
    return H.RemediLM(mc_num=8, default_ups=False)


@pytest.mark.slow
def test_until_and_max_gen_toks(embedded_lm, monkeypatch):
    assert H.capped_lengths(96, 32, 48, None) == (96, 48)
    assert H.capped_lengths(96, 32, 48, 200) == (96, 48)  # never longer than the protocol
    assert H.capped_lengths(96, 32, 48, 40) == (64, 32)  # rounded up to blocks, same steps per block
    assert H.capped_lengths(96, 32, 48, 5) == (32, 16)
    assert H.capped_lengths(256, 32, 256, 100) == (128, 128)
    assert H.cut_at_stops("abc\n\nQuestion: x", ["Question:", "\n\n"]) == "abc"
    assert H.cut_at_stops("abc", ["", "zz"]) == "abc"
    tok = embedded_lm.tokenizer
    canned = tok("12 + 3 = 15 apples.\n#### 15\n\nQuestion: next", add_special_tokens=False)["input_ids"]
    seen = []

    def fake(model, prompts, cfg, ids, generators):
        seen.append((cfg.gen_length, cfg.steps, len(prompts)))
        return [Generation(list(canned), cfg.steps, 0, [0], 0.01) for _ in prompts]

    monkeypatch.setattr(S, "generate", fake)
    reqs = [_Req(("Q1", {"until": ["Question:"]}), 0), _Req(("Q2", {"until": "\n\n", "max_gen_toks": 40}), 1),
            _Req(("Q3", {"max_gen_toks": 4}), 2)]
    out = embedded_lm.generate_until(reqs, disable_tqdm=True)
    assert out[0] == "12 + 3 = 15 apples.\n#### 15\n\n"
    assert out[1] == "12 + 3 = 15 apples.\n#### 15"
    assert out[2] == tok.decode(canned[:4], skip_special_tokens=True)
    assert sorted(seen) == [(32, 16, 1), (64, 32, 1), (96, 48, 1)]


# ------------------------------------------------------------------------------- loglikelihood
def _exact_elbo(model, mask_id: int, ctx: list[int], cont: list[int]) -> float:
    """log-likelihood bound by enumeration: mean over l of mean over every l-subset of (L/l) * masked NLL."""
    L, total = len(cont), 0.0
    for l in range(1, L + 1):
        subsets = list(combinations(range(L), l))
        x = torch.tensor([ctx + cont]).repeat(len(subsets), 1)
        for k, sub in enumerate(subsets):
            x[k, [len(ctx) + i for i in sub]] = mask_id
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits.double(), -1)
        total += sum((L / l) * -sum(lp[k, len(ctx) + i, cont[i]].item() for i in sub)
                     for k, sub in enumerate(subsets)) / len(subsets) / L
    return -total


@pytest.mark.slow
def test_multiple_choice_ranks_the_right_answer():
    res = _lm_eval("mc_num=8,seed_key=id", "remedi_arith_mc")
    assert res["results"]["remedi_arith_mc"]["acc,none"] == 1.0
    assert {s["target"] for s in res["samples"]["remedi_arith_mc"]} == {0, 1, 2}  # the answer moves around
    greedy = [[r[0][1] in (True, "True") for r in s["resps"]] for s in res["samples"]["remedi_arith_mc"]]
    targets = [s["target"] for s in res["samples"]["remedi_arith_mc"]]
    assert sum(g[t] for g, t in zip(greedy, targets)) >= 6  # the model's one-step argmax is often the answer
    assert not any(x for g, t in zip(greedy, targets) for k, x in enumerate(g) if k != t)  # never a wrong one
    ll = res["remedi"]["loglikelihood"]
    assert ll["requests"] == 36 and ll["rows"] == 36 * 8  # mc_num rows per request (L <= mc_num: no extra row)


@pytest.mark.slow
def test_multiple_choice_fails_on_an_untrained_model(tiny_model_dir):
    """The same task on a random-weight model: the ranking is not right everywhere (the task can fail)."""
    res = _lm_eval(f"pretrained={tiny_model_dir},mc_num=8,seed_key=id", "remedi_arith_mc")
    assert res["results"]["remedi_arith_mc"]["acc,none"] < 0.9


@pytest.mark.slow
def test_mc_estimator_exact_for_one_token_and_near_the_elbo(embedded_lm):
    lm, model = embedded_lm, embedded_lm.session.model
    row = json.loads((SHIPPED / "remedi_arith_mc.jsonl").read_text().splitlines()[0])
    ctx, _ = lm._encode_pair(row["context"], " 49")
    tok4 = lm.tokenizer.convert_tokens_to_ids("4")
    with torch.no_grad():  # L = 1: every sample masks the one token, so the estimate is log p exactly
        x = torch.tensor([ctx + [lm.session.ids.mask]])
        exact1 = torch.log_softmax(model(x).logits[0, -1].double(), -1)[tok4].item()
    (est1, _), = lm.mc_loglikelihood([(ctx, [tok4])], ["one"])
    assert est1 == pytest.approx(exact1, abs=1e-4)
    # L = 3 (" 49" = 'Ġ', '4', '9'): the estimate is within sampling error of the enumerated ELBO
    ctx3, cont3 = lm._encode_pair(row["context"], " 49")
    assert len(cont3) == 3
    exact3 = _exact_elbo(model, lm.session.ids.mask, ctx3, cont3)
    lm.mc_num = 192
    try:
        (est3, _), = lm.mc_loglikelihood([(ctx3, cont3)], ["three"])
        lm.mc_batch_size = 7
        (est3b, _), = lm.mc_loglikelihood([(ctx3, cont3)], ["three"])
    finally:
        lm.mc_num, lm.mc_batch_size = 8, 32
    assert est3 == pytest.approx(exact3, abs=0.6), (est3, exact3)
    assert est3b == pytest.approx(est3, abs=1e-4)  # other forward batches, same estimate


def test_loglikelihood_rolling_is_refused(embedded_lm):
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        embedded_lm.loglikelihood_rolling([_Req(("text",))])


# ------------------------------------------------------------------------------ args and presets
def test_presets_overrides_and_run_info():
    lm = H.RemediLM(preset="d1_128", steps=32, default_ups=False)
    st, origin = lm.run_info["settings"], lm.run_info["origin"]
    assert (st["preset"], st["gen_length"], st["block_length"], st["steps"], st["cache"], st["eos_gating"]) == \
        ("d1_128", 128, 32, 32, "none", False)  # the preset beats defaults.json (dual cache, gating)
    assert origin["steps"] == "model_args" and origin["gen_length"] == "preset d1_128"
    env = lm.run_info["environment"]
    assert {"gpu", "torch", "cuda", "lm_eval", "transformers"} <= set(env)
    assert lm.get_model_info()["remedi"]["preset"]["baseline"] == {"gsm8k": 69.5, "minerva_math500": 28.2}
    cached = H.RemediLM.create_from_arg_string("preset=fast_dllm_gsm8k_cached,batch_size=4,default_ups=false",
                                               {"batch_size": 1, "device": None})
    s = cached.run_info["settings"]
    assert (s["cache"], s["threshold"], s["gen_length"], s["block_length"], s["batch_size"]) == \
        ("dual", 0.9, 256, 32, 4)  # model_args batch_size wins over lm-eval's --batch_size
    off = H.RemediLM(preset="fast_dllm_gsm8k_cached", threshold=None, cache="prefix", default_ups=False)
    assert (off.run_info["settings"]["threshold"], off.run_info["settings"]["cache"]) == (None, "prefix")
    with pytest.raises(ValueError, match="unknown"):
        H.RemediLM(stepz=3)
    with pytest.raises(ValueError, match="preset="):
        H.RemediLM(preset="llada_gsm9k")
    with pytest.raises(ValueError, match="expected int"):
        H.RemediLM(steps="many")
    with pytest.raises(ValueError, match="unknown"):
        H.RemediLM(strategy="best")


def test_preset_table_lists_every_preset_and_baseline():
    from remedi.evaluation.presets import PRESETS, preset_table

    table = preset_table()
    for name in ("llada_gsm8k", "llada_math", "fast_dllm_gsm8k", "fast_dllm_gsm8k_cached", "d1_128", "d1_256",
                 "d1_512"):
        assert f"| {name} |" in table
    assert (PRESETS["llada_math"].gen_length, PRESETS["llada_math"].settings["block_length"]) == (512, 64)
    assert all(p.settings["steps"] == p.gen_length // 2 for n, p in PRESETS.items() if n.startswith("d1_"))
    for value in ("78.6", "42.2", "79.3", "78.5", "69.5", "77.2", "79.8", "28.2", "32.4", "34.6"):
        assert value in table


# --------------------------------------------------------------------------------- the launcher
def _run_files(out: Path) -> tuple[dict, dict, dict]:
    [results] = list(out.rglob("results_*.json"))
    [run_log] = list(out.rglob("remedi_run_*.json"))
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            samples[(f.name.split("_20")[0], s["doc_id"])] = s
    return json.loads(results.read_text()), json.loads(run_log.read_text()), samples


LAUNCH = ["--model", "remedi", "--tasks", "remedi_arith,remedi_arith_mc",  # shipped: no --include_path
          "--limit", "5", "--log_samples",
          "--model_args", "gen_length=32,block_length=16,steps=16,strategy=random,temperature=0.7,mc_num=4,"
                          "batch_size=2,default_ups=false"]


@pytest.mark.slow
def test_launcher_writes_results_and_run_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert H.main([*LAUNCH, "--output_path", str(tmp_path / "out")]) == 0
    results, run_log, samples = _run_files(tmp_path / "out")
    assert results["remedi"]["generate_until"]["requests"] == 5
    assert results["config"]["remedi"]["settings"]["gen_length"] == 32
    assert run_log["settings"]["strategy"] == "random" and run_log["environment"]["torch"] == torch.__version__
    assert "remedi_arith" in run_log["results"] and run_log["loglikelihood"]["requests"] == 15
    assert "tokens/forward" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port), "-m", "remedi.harness"],
            "one": [sys.executable, "-m", "remedi.harness"]}
    files = {}
    for name, cmd in runs.items():
        proc = subprocess.run([*cmd, *LAUNCH, "--output_path", str(tmp_path / name)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
        files[name] = _run_files(tmp_path / name)
    (res2, log2, s2), (res1, log1, s1) = files["two"], files["one"]
    assert log2["world_size"] == 2 and log1["world_size"] == 1
    assert s2.keys() == s1.keys() and len(s1) == 10
    for k in s1:  # lm-eval pads the shorter rank with copies of its last request: their extra responses are
        # appended to that request's resps and dropped by the take_first filter, so compare the first ones
        assert [r[0] for r in s2[k]["resps"]] == [r[0] for r in s1[k]["resps"]], k
        assert s2[k]["filtered_resps"] == s1[k]["filtered_resps"], k
    for task in ("remedi_arith", "remedi_arith_mc"):
        assert res2["results"][task] == res1["results"][task]
    g1, g2 = log1["generate_until"], log2["generate_until"]
    assert (g2["requests"], g2["gen_tokens"], g2["nfe"]) == (g1["requests"], g1["gen_tokens"], g1["nfe"])


# ---------------------------------------------------------------------------- code through lm-eval
@pytest.mark.slow
def test_humaneval_task_scored_by_the_project_sandbox(monkeypatch):
    """The local HumanEval-style YAML: completions (a fake sampler's known right/wrong bodies) are cut at the
    task's stop strings and executed in the project's sandbox: pass@1 = 2/3."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the sandbox targets Linux")
    lm = H.RemediLM(gen_length=32, block_length=32, steps=8, default_ups=False)
    bodies = {"add": "    return a + b\n\nprint(add(1, 2))\n", "reverse": "    return s\n",
              "total": "    return sum(xs)\n# done\n"}

    def fake(model, prompts, cfg, ids, generators):
        out = []
        for p in prompts:
            text = lm.tokenizer.decode(p, skip_special_tokens=True)
            [name] = [k for k in bodies if f"def {k}(" in text]
            out.append(Generation(lm.tokenizer(bodies[name], add_special_tokens=False)["input_ids"], 1, 0, [0], 0.01))
        return out

    monkeypatch.setattr(S, "generate", fake)
    res = H.simple_evaluate(model=lm, tasks=["remedi_humaneval"], task_manager=_task_manager(),
                            log_samples=True, verbosity="WARNING")
    assert res["results"]["remedi_humaneval"]["pass@1,none"] == pytest.approx(2 / 3)
    resps = {s["doc"]["entry_point"]: s["resps"][0][0] for s in res["samples"]["remedi_humaneval"]}
    assert resps["add"] == "    return a + b\n" and resps["total"] == "    return sum(xs)"


# ------------------------------------------------------------------------ the launcher's own checks
BAD_MODEL_ARGS = [
    ("stepz=3", "unknown ['stepz']"),
    ("steps=many", "steps='many': expected int"),
    ("preset=llada_gsm9k", "preset='llada_gsm9k': choose one of llada_gsm8k"),
    ("gen_length=4096,block_length=4096,steps=32", "exceeds the model's max_sequence_length 512"),
    ("pretrained=/nonexistent/model", "pretrained=/nonexistent/model: no such folder"),
    ("gen_length=96,block_length=40,steps=12", "--block_length 40 must divide --gen_length 96"),
]


@pytest.mark.parametrize("model_args,message", BAD_MODEL_ARGS, ids=[m for m, _ in BAD_MODEL_ARGS])
def test_bad_model_args_are_one_error_line_before_the_model_loads(model_args, message, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the model_args were checked")

    monkeypatch.setattr(S.Session, "load", no_load)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert H.main(["--tasks", "remedi_arith", "--limit", "1", "--model_args", model_args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: --model_args: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_help_names_the_remedi_model_its_args_and_presets(capsys, monkeypatch):
    from remedi.evaluation.presets import PRESETS

    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        H.main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model remedi" in out and "default here: remedi" in out and "mc_num" in out and "pretrained" in out
    assert all(name in out for name in PRESETS)


@pytest.mark.slow
def test_cli_defaults_model_device_batch_size_and_shipped_tasks(tmp_path, monkeypatch, capsys):
    """No --model, --device or --include_path, on a CPU: the remedi model, the shipped multiple-choice task,
    no CUDA warning, the summary's batch size is model_args', and sampler settings on a likelihood-only task
    warn once."""
    import logging

    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # the shipped tasks work from any folder
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("remedi.harness").addHandler(handler)
    try:
        assert H.main(["--tasks", "remedi_arith_mc", "--limit", "3",
                       "--model_args", "mc_num=4,batch_size=16,steps=24,default_ups=false"]) == 0
    finally:
        logging.getLogger("remedi.harness").removeHandler(handler)
    out = capsys.readouterr().out
    assert "remedi (" in out and "batch_size: 16 (16)" in out and "remedi_arith_mc" in out
    msgs = [r.getMessage() for r in records]
    assert not any("CUDA is not available" in m for m in msgs)
    assert sum("only apply to generate_until" in m for m in msgs) == 1 and any("model_args steps" in m for m in msgs)
