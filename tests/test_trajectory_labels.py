"""Trajectory labels: state reconstruction, labels, head-only training and the CLI (CPU, tiny models)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from remedi.decoding.sampler import (SamplerConfig, block_forward, decide, generate, prepare_logits,
                                     unmask_schedule)
from remedi.model.config import get_config
from remedi.model.llada import RemeDiLM, UPSHead, init_weights
from remedi.model.loading import SpecialIds
from remedi.training.trajectory_labels import (collect_states, gold_region, head_loss, main, merge_states,
                                               train_head, trajectory_labels)

CFG = get_config("test-tiny")
IDS = SpecialIds(mask=CFG.mask_token_id, eos=CFG.eos_token_id, pad=CFG.pad_token_id, eot=None, bos=None)
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 15, 16, 23, 42, 1]]
EMBEDDED = Path(__file__).resolve().parents[1] / "checkpoints" / "remedi-tiny-gsm"

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0) -> RemeDiLM:
    m = RemeDiLM(CFG)
    init_weights(m, std=0.2, generator=torch.Generator().manual_seed(seed))
    m.attach_head(UPSHead(CFG.d_model, 8))
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _golds(G, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [gold_region(torch.randint(6, 40, (n,), generator=g).tolist() + [IDS.eos], G, IDS.eos)
            for n in (3, 7, 20)]


@pytest.mark.parametrize("strategy", ["entropy", "llada_low_confidence", "ups"])
def test_states_replay_the_sampler(model, strategy):
    cfg = SamplerConfig(strategy=strategy, steps=6, gen_length=12, block_length=4)
    golds = _golds(12)
    st = collect_states(model, PROMPTS, golds, cfg, IDS)
    gens = generate(model, PROMPTS, cfg, IDS)
    assert st["input_ids"].shape == (len(PROMPTS) * 6, st["P"] + 12)
    P, G = st["P"], st["G"]
    K = torch.tensor(unmask_schedule(4, 2))
    for i in range(st["input_ids"].shape[0]):
        x = st["input_ids"][i:i + 1].clone()
        attn = st["attention_mask"][i:i + 1].long()
        b, n = int(st["problem"][i]), int(st["step_in_block"][i])
        assert attn.sum() == len(PROMPTS[b]) + G and x[0, P - len(PROMPTS[b]):P].tolist() == PROMPTS[b]
        assert st["gold"][i].tolist() == golds[b]
        lo, hi = st["span"][i].tolist()
        state = x[0, P:]
        if n == 0:  # a block's first state: the block and everything after it masked, earlier blocks committed
            assert (state[lo:] == IDS.mask).all() and (state[:lo] != IDS.mask).all()
        # one step of the sampler from this state gives the next state (or the final tokens)
        logits, ups = block_forward(model, x, None if attn.all() else attn, P + lo, P + hi, P, cfg, IDS.mask)
        logits = prepare_logits(logits, cfg, IDS)
        cur = x[:, P + lo:P + hi]
        # K_n positions kept (remask strategies) or the step's LLaDA count (4 masked over 2 steps: 2 each)
        k = K[n:n + 1] if cfg.remasks else torch.tensor([2])
        new, *_ = decide(cfg, IDS, logits, ups, cur, logits.argmax(-1), None, k, None)
        nxt = st["input_ids"][i + 1, P:] if i + 1 < len(st["problem"]) and st["problem"][i + 1] == b \
            else st["final"][b]
        after = state.clone()
        after[lo:hi] = new[0]
        assert after.tolist() == nxt.tolist(), (i, strategy)
    for b, g in enumerate(gens):
        fin = st["final"][b].tolist()
        assert (fin[:fin.index(IDS.eos)] if IDS.eos in fin else fin) == g.tokens


def test_every_subsamples_and_merge_pads(model):
    cfg = SamplerConfig(strategy="entropy", steps=6, gen_length=12, block_length=4)
    golds = _golds(12)
    full = collect_states(model, PROMPTS, golds, cfg, IDS)
    sub = collect_states(model, PROMPTS, golds, cfg, IDS, every=2)
    keep = full["step"] % 2 == 0
    assert torch.equal(sub["input_ids"], full["input_ids"][keep]) and torch.equal(sub["span"], full["span"][keep])
    a = collect_states(model, PROMPTS[1:2], golds[1:2], cfg, IDS, problem_offset=7)
    m = merge_states([a, full], IDS.pad)
    assert m["P"] == full["P"] and m["input_ids"].shape[0] == a["input_ids"].shape[0] + full["input_ids"].shape[0]
    assert m["problem"][0] == 7
    assert m["attention_mask"][0].sum() == a["attention_mask"][0].sum()
    # the short prompt's states, re-padded wider (and batched with longer prompts), give the same head
    # scores and labels up to float rounding: RoPE is relative and padded keys are masked
    from remedi.training.trajectory_labels import batch_forward
    n = a["input_ids"].shape[0]
    alone = batch_forward(model, a, torch.arange(n), IDS.mask)
    wide = batch_forward(model, m, torch.arange(n + 3), IDS.mask)
    assert torch.allclose(alone["ups"], wide["ups"][:n], atol=1e-4)
    assert torch.allclose(alone["labels"], wide["labels"][:n], atol=1e-5)


def test_labels_exact():
    M = IDS.mask
    state = torch.tensor([[7, 8, M, 9, M, 5], [M, M, 3, 4, 4, M]])
    gold = torch.tensor([[7, 8, 1, 2, 3, 5], [6, 6, 3, 9, 4, 1]])
    span = torch.tensor([[2, 6], [0, 3]])
    p = torch.tensor([[.1, .2, .3, .4, .5, .6], [.7, .8, .9, .15, .25, .35]], requires_grad=True)
    labels, w = trajectory_labels(state, gold, span, p, M)
    assert w.tolist() == [[False, False, True, True, True, True], [True, True, True, False, False, False]]
    assert torch.allclose(labels, torch.tensor([[0, 0, .3, 0, .5, 1], [.7, .8, 1, 0, 0, 0]]))
    assert not labels.requires_grad


def test_train_head_moves_only_the_head_and_lowers_the_loss(model):
    m = _model(seed=3)
    cfg = SamplerConfig(strategy="entropy", steps=6, gen_length=12, block_length=4)
    st = collect_states(m, PROMPTS, _golds(12), cfg, IDS)
    back = {k: v.clone() for k, v in m.model.state_dict().items()}
    head = {k: v.clone() for k, v in m.ups_head.state_dict().items()}
    idx = torch.arange(st["input_ids"].shape[0])
    with torch.no_grad():
        before = float(head_loss(m, st, idx, IDS.mask)[0])
    hist = train_head(m, st, steps=20, batch_size=8, lr=1e-2, generator=torch.Generator().manual_seed(0),
                      log_every=5)
    with torch.no_grad():
        after = float(head_loss(m, st, idx, IDS.mask)[0])
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(v, m.model.state_dict()[k]) for k, v in back.items())
    assert any(not torch.equal(v, m.ups_head.state_dict()[k]) for k, v in head.items())
    assert [h["step"] for h in hist] == [5, 10, 15, 20]
    assert all(0 <= h["frac_wrong_visible"] <= 1 and h["n_visible"] > 0 for h in hist)
    assert all(h["auroc_visible"] is None or 0 <= h["auroc_visible"] <= 1 for h in hist)


@pytest.mark.slow
@pytest.mark.skipif(not (EMBEDDED / "data" / "validation.jsonl").is_file(), reason="embedded model not present")
def test_cli_end_to_end_on_the_embedded_model(tmp_path):
    from remedi.model.checkpoint import read_ups, read_ups_meta

    out = tmp_path / "traj_head.pt"
    res = main(["--model_name", str(EMBEDDED), "--ups_head", str(EMBEDDED / "ups_head.pt"),
                "--dataset", str(EMBEDDED / "data" / "validation.jsonl"), "--n_problems", "8",
                "--strategy", "entropy", "--steps", "48", "--every", "4", "--train_steps", "2",
                "--batch_size", "16", "--lr", "1e-3", "--save_path", str(out), "--seed", "0", "--device", "cpu",
                "--log_every", "1"])
    assert res["n_states"] == 8 * 48 // 4 and len(res["history"]) == 2
    state, meta = read_ups(out)
    assert meta["ups_arch"] == "head" and meta["ups_width"] == 128 and meta["train"]["script"] == "trajectory_labels"
    assert meta["train"]["sampler"]["gen_length"] == 96 and meta["train"]["sampler"]["block_length"] == 32
    assert meta["train"]["sampler"]["cache"] == "none" and meta["train"]["sampler"]["eos_gating"] is False
    assert read_ups_meta(out)["train"]["n_problems"] == 8 and state


def test_cli_bad_save_path_fails_before_loading(tmp_path, monkeypatch):
    import remedi.model.loading as loading

    def boom(*a, **k):
        raise AssertionError("model loaded before the save path was checked")

    monkeypatch.setattr(loading, "load_for_inference", boom)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="--save_path"):
        main(["--model_name", "nope", "--dataset", "nope.jsonl", "--train_steps", "1",
              "--save_path", str(tmp_path / "afile" / "head.pt")])
    with pytest.raises(ValueError, match="--save_path"):
        main(["--model_name", "nope", "--dataset", "nope.jsonl", "--train_steps", "1", "--save_path", str(tmp_path)])
