"""The derivative-free stage (remedi.policy.search): CMA-ES improves a toy objective and resumes exactly; a tiny
real search on the embedded model completes on CPU and writes UPS files every script can load."""
import json

import pytest
import torch

from remedi.model.checkpoint import load_ups, read_ups_meta
from remedi.model.loading import EMBEDDED_MODEL, load_for_inference
from remedi.policy.objective import held_out_questions, train_problems
from remedi.policy.search import cma_search, main

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(target):
    def objective(cands, gen):  # higher is better; common to a generation
        return [-sum((c - t) ** 2 for c, t in zip(x, target)) for x in cands]
    return objective


def test_cma_improves_a_toy_objective_and_resumes_exactly():
    target = [0.5, -1.0, 0.25]
    obj = _toy(target)
    start = obj([[0.0, 0.0, 0.0]], 0)[0]
    full = cma_search(obj, 3, 0.3, 30, 8, seed=0)
    assert full["best"]["score"] > start / 20  # from -1.3125 to within a few hundredths
    seen = []
    half = cma_search(obj, 3, 0.3, 12, 8, seed=0, on_generation=lambda rec, st: seen.append(rec["generation"]))
    assert seen == list(range(12))
    resumed = cma_search(obj, 3, 0.3, 30, 8, seed=0, state=half)
    assert resumed["best"] == full["best"]
    # with the sign flipped the search walks away from the target
    worse = cma_search(lambda c, g: [-s for s in obj(c, g)], 3, 0.3, 15, 8, seed=0)
    assert obj([worse["best"]["weights"]], 0)[0] < start


def test_training_problems_are_fresh_and_never_test_items():
    banned = held_out_questions()
    a, b = train_problems(40, 0, 0, banned), train_problems(40, 0, 1, banned)
    assert [x.question for x in a] == [x.question for x in train_problems(40, 0, 0, banned)]  # common numbers
    assert not {x.question for x in a} & {x.question for x in b}
    assert not {x.question for x in a + b} & banned
    assert all(x.gold.strip() for x in a)


@pytest.mark.slow
def test_tiny_real_search_writes_loadable_ups_and_resumes(tmp_path):
    out = tmp_path / "search"
    argv = ["--out", str(out), "--problems", "6", "--popsize", "2", "--generations", "1", "--steps", "8",
            "--gen_length", "32", "--device", "cpu", "--features", "entropy,result_digit,base"]
    res = main(argv)
    assert len(res["history"]) == 1 and (out / "curve.png").is_file()
    meta = read_ups_meta(out / "ups_best.pt")
    assert meta["kind"] == "residual" and meta["residual"]["features"] == ["entropy", "result_digit", "base"]
    loaded = load_for_inference(str(EMBEDDED_MODEL), ups_head=str(out / "ups_best.pt"), device="cpu")
    w = torch.tensor(res["best"]["weights"], dtype=torch.float64)
    assert torch.allclose(loaded.model.ups_policy.linear_weights(), w.float().double())
    res2 = main(argv[:7] + ["2"] + argv[8:])  # one more generation: resumes, keeps the first
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["generation"] for h in hist] == [0, 1] and hist[0] == res["history"][0]
    assert len(res2["history"]) == 2
    with pytest.raises(ValueError, match="other settings"):
        main(argv[:3] + ["7"] + argv[4:])


def test_search_on_a_lora_backbone_merges_the_adapter_first(tmp_path, monkeypatch):
    """--lora_path: the objective decodes with the adapter merged (the search runs on the model it will be used with)."""
    from remedi import session as S

    seen = []
    real = S.Session.load

    def load(self, *a, **k):
        out = real(self, *a, **k)
        seen.append((self.lora_path, float(sum(p.double().sum() for p in self.model.parameters()))))
        return out

    monkeypatch.setattr(S.Session, "load", load)
    common = ["--ups_head", str(EMBEDDED_MODEL / "ups_head.pt"), "--problems", "2", "--popsize", "2",
              "--generations", "1", "--steps", "6", "--device", "cpu"]
    main(["--out", str(tmp_path / "base"), *common])
    main(["--out", str(tmp_path / "lora"), "--lora_path", str(EMBEDDED_MODEL / "lora_joint"), *common])
    assert [s[0] for s in seen] == [None, str(EMBEDDED_MODEL / "lora_joint")]
    assert seen[0][1] != seen[1][1]  # the merged adapter changed the backbone the search decodes with
    assert json.loads((tmp_path / "lora" / "settings.json").read_text())["search"]["lora_path"] == \
        str(EMBEDDED_MODEL / "lora_joint")
