"""On-policy corruption (--noise_source self): labels, determinism, generator-only randomness, the confident
(PRISM-style) selection, the metrics, and short runs for head, stream and LoRA."""
import json

import pytest
import torch

from remedi.model.checkpoint import load_pretrained
from remedi.train_remask_lora import main as lora_main
from remedi.train_remask_sft import main as sft_main
from remedi.training.losses import UPSMetrics, auroc
from remedi.training.self_noise import SelfNoise, draw_self_positions, pick_tokens, self_corrupt
from remedi.training.step import StepConfig, loss_step

pytestmark = pytest.mark.usefixtures("one_thread", "clean_accelerate")
MASK = 0


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from remedi.model.llada import UPSHead, init_weights

    model = load_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    head = UPSHead(model.config.d_model, 8)
    init_weights(head, generator=torch.Generator().manual_seed(0))
    model.attach_head(head)
    return model.train()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(5)
    B, L = 3, 20
    x0 = torch.randint(6, 100, (B, L), generator=g)
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, 4:] = True
    u = torch.rand(B, L, generator=g)
    masked = answer & (u < 0.4)
    incorrect = answer & ~masked & (u > 0.75)
    x_t = x0.clone()
    x_t[masked] = MASK
    x_t[incorrect] = (x0[incorrect] + 1) % 100 + 6  # a random replacement, never x0
    clean = answer & ~masked & ~incorrect
    return x_t, x0, answer, masked, incorrect, clean


def reference_argmax(lm, x_t, self_pos):
    x_in = x_t.clone()
    x_in[self_pos] = MASK
    lm.eval()
    with torch.no_grad():
        logits = lm.model(x_in).logits
    lm.train()
    logits[..., MASK] = float("-inf")
    return logits.argmax(-1)


def test_self_positions_hold_the_argmax_and_labels_are_exactly_pred_equals_x0(lm, batch):
    x_t, x0, answer, masked, incorrect, clean = batch
    self_pos = incorrect.clone()
    sc = self_corrupt(lm, x_t, x0, masked, incorrect, clean, self_pos, None, SelfNoise(MASK))
    want = reference_argmax(lm, x_t, self_pos)
    assert torch.equal(sc.x_t[self_pos], want[self_pos])
    assert torch.equal(sc.x_t[~self_pos], x_t[~self_pos]) and torch.equal(sc.masked, masked)
    cfg = StepConfig(backbone_trains=False, self_noise=SelfNoise(MASK))
    p_mask = torch.full(x0.shape, 0.4)
    _, res = loss_step(lm, cfg, x_t, x0, answer, masked, incorrect, clean, p_mask, self_pos=self_pos)
    ok = (want == x0)[self_pos]
    assert torch.equal(res["labels"][self_pos], ok.float())  # 1[pred == x0], nothing else
    assert torch.equal(res["clean"][self_pos], ok) and torch.equal(res["incorrect"][self_pos], ~ok)
    soft = res["labels"][masked]  # masked positions keep stopgrad p(x0 | x_t)
    assert ((soft > 0) & (soft < 1)).all() and not soft.requires_grad
    assert res["labels"][clean].eq(1).all()


def test_argmax_is_deterministic_and_draws_nothing_from_the_global_rng(lm, batch):
    x_t, x0, answer, masked, incorrect, clean = batch
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        g = torch.Generator().manual_seed(7)
        self_pos, u = draw_self_positions(incorrect, 0.5, g)
        outs.append(self_corrupt(lm, x_t, x0, masked, incorrect, clean, self_pos, u, SelfNoise(MASK, 0.8)).x_t)
        assert torch.equal(torch.get_rng_state(), state)  # only the generator was used
        assert lm.training  # the no-gradient pass ran with dropout off, then train mode came back
    assert torch.equal(outs[0], outs[1])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    a, b = draw_self_positions(incorrect, 0.5, g1)[0], draw_self_positions(incorrect, 0.5, g2)[0]
    assert (a <= incorrect).all() and not torch.equal(a, b)
    full = draw_self_positions(incorrect, 1.0, torch.Generator().manual_seed(0))[0]
    assert torch.equal(full, incorrect)


def test_sampling_follows_the_uniforms():
    logits = torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    assert pick_tokens(logits, 0.0, torch.zeros(3)).tolist() == [2, 0, 0]
    # uniform row: the inverse CDF maps u to the matching third
    assert pick_tokens(logits, 1.0, torch.tensor([0.5, 0.1, 0.0]))[1].item() == 0
    assert pick_tokens(logits, 1.0, torch.tensor([0.5, 0.5, 0.0]))[1].item() == 1
    assert pick_tokens(logits, 1.0, torch.tensor([0.5, 0.99, 0.0]))[1].item() == 2


def test_confident_selection_commits_the_surest_positions(lm, batch):
    x_t, x0, answer, masked, incorrect, clean = batch
    self_pos = incorrect.clone()
    sc = self_corrupt(lm, x_t, x0, masked, incorrect, clean, self_pos, None, SelfNoise(MASK, select="confident"))
    cand = masked | self_pos
    assert torch.equal(sc.masked | sc.self_pos, cand) and not (sc.masked & sc.self_pos).any()
    assert torch.equal(sc.self_pos.sum(-1), self_pos.sum(-1))  # as many commits per row as chosen positions
    assert (sc.x_t[sc.masked] == MASK).all()
    # every committed position is at least as confident as every position left masked in its row
    x_in = x_t.clone()
    x_in[cand] = MASK
    lm.eval()
    with torch.no_grad():
        logits = lm.model(x_in).logits.float()
    lm.train()
    logits[..., MASK] = float("-inf")
    conf = logits.softmax(-1).amax(-1)
    for b in range(x0.shape[0]):
        if sc.self_pos[b].any() and sc.masked[b].any():
            assert conf[b][sc.self_pos[b]].min() >= conf[b][sc.masked[b]].max() - 1e-6
    # random replacements that were not chosen stay as they were
    assert torch.equal(sc.incorrect & ~sc.self_pos, incorrect & ~self_pos)


def test_metrics_split_self_and_random_corruptions():
    m = UPSMetrics()
    h = torch.tensor([[3.0, 2.0, -1.0, 1.0, -2.0, 0.5]])
    clean = torch.tensor([[1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    incorrect = ~clean
    self_pos = torch.tensor([[0, 0, 1, 1, 0, 1]], dtype=torch.bool)  # a wrong, a right, a wrong self fill
    none = torch.zeros_like(clean)
    m.update(h, clean.float(), clean, incorrect, none, none, self_pos=self_pos)
    out = m.compute()
    assert out["n_self"] == 3 and out["self_wrong_frac"] == pytest.approx(2 / 3)
    assert out["auroc_self"] == auroc(torch.tensor([-1.0, 1.0, 0.5]), torch.tensor([False, True, False]))
    assert out["auroc_random"] == 1.0  # clean 3, 2 above the one random replacement -2
    m.update(h, clean.float(), clean, incorrect, none, none)
    assert "auroc_self" not in m.compute()  # random-noise runs log what they always did


ROWS = [{"question": f"Bo has {i} pens and gets {i % 3 + 2} more. How many?",
         "answer": f"{i} + {i % 3 + 2} = {i + i % 3 + 2}. #### {i + i % 3 + 2}"} for i in range(12)]


@pytest.mark.parametrize("case", ["head", "stream", "lora", "confident"])
def test_short_run_with_self_noise_logs_the_new_metrics(tiny_model_dir, tmp_path, case):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    argv = ["--model_name", str(tiny_model_dir), "--dataset", str(data), "--prompt_field", "question", "--answer_field",
            "answer", "--seq_len", "48", "--batch_size", "4", "--log_every", "1", "--output_dir", str(out),
            "--device", "cpu", "--max_steps", "2", "--noise_source", "self", "--r_incorrect", "0.25",
            "--self_noise_ratio", "0.5"]
    if case == "stream":
        argv += ["--ups_arch", "stream"]
    if case == "confident":
        argv += ["--self_noise_select", "confident", "--self_noise_temperature", "0.7"]
    res = (lora_main(argv + ["--lora_r", "2"]) if case == "lora" else sft_main(argv))
    assert res["step"] == 2 and res["paths"]["ups"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(k in lines[-1] for k in ("n_self", "self_wrong_frac", "auroc_self", "auroc_random"))
    assert sum(x["n_self"] for x in lines) > 0
    assert all(0.0 <= x["self_wrong_frac"] <= 1.0 for x in lines if x["n_self"])
    args = json.loads((out / "args.json").read_text())
    assert args["noise_source"] == "self" and args["self_noise_ratio"] == 0.5


def test_self_noise_flags_are_checked():
    with pytest.raises(ValueError, match="--noise_source 'model'"):
        sft_main(["--noise_source", "model"])
    with pytest.raises(ValueError, match="--r_incorrect 0 chooses none"):
        sft_main(["--noise_source", "self", "--r_incorrect", "0"])
    with pytest.raises(ValueError, match=r"--self_noise_ratio must be in \(0, 1\]"):
        sft_main(["--noise_source", "self", "--self_noise_ratio", "0"])
    with pytest.raises(ValueError, match="--self_noise_select 'top'"):
        sft_main(["--noise_source", "self", "--self_noise_select", "top"])
    with pytest.raises(ValueError, match="apply only with --noise_source self"):
        sft_main(["--self_noise_ratio", "0.5"])
