"""The token action at result digits (remedi.policy.slip.SlipRepredict) and the decoder's second look
(EagerDecoder.repredict): slips and their copies are found, the rewrite lands on visible tokens and candidates,
``accept="true"`` refuses a false re-prediction, no slip means entropy token for token, and the second look is
the model's own forward on the rewritten block."""
import json
import sys
from pathlib import Path

import pytest
import torch

from remedi.decoding.sampler import EagerDecoder, SamplerConfig, generate
from remedi.decoding.step import PolicyRule, layout_batch
from remedi.model.residual import attach_policy
from remedi.policy import slip as S

pytestmark = pytest.mark.usefixtures("one_thread")


def test_find_slips_names_results_and_later_copies():
    pieces = list("42 / 6 = 13 bags. 13 * 6 = 78. 130 13 2 + 2 = 4")
    (slip,) = S.find_slips(pieces)  # 13 * 6 = 78 and 2 + 2 = 4 are true
    assert (slip.a, slip.op, slip.b) == ("42", "/", "6")
    assert "".join(pieces[i] for i in slip.result) == "13"
    assert slip.copies == [18, 19, 35, 36]  # the two later "13"s, not the "13" inside "130"
    assert S.find_slips(list("1 + 1 = 2")) == []


def _policy(embedded, accept):
    return S.SlipRepredict(embedded.tokenizer, embedded.model.config.vocab_size, embedded.ids.mask, accept=accept)


def _row(embedded, text):
    return torch.tensor([embedded.tokenizer(text)["input_ids"]])


@pytest.mark.parametrize("accept", ["any", "true"])
def test_the_rewrite_lands_on_visible_tokens_and_candidates(embedded, accept):
    tok = embedded.tokenizer
    mask = embedded.ids.mask
    cur = _row(embedded, "7 + 5 = 13 and 13 + 1")
    pieces = [tok.decode([t]) for t in cur[0].tolist()]
    (slip,) = S.find_slips(pieces)
    cur[0, slip.copies[0]] = mask  # one copy not decided yet: its candidate is in x0
    x0 = cur.clone()
    x0[0, slip.copies[0]] = tok.convert_tokens_to_ids("1")
    seen = {}

    def second_look(rows, block):
        seen["rows"], seen["block"] = rows, block.clone()
        logits = torch.zeros(len(rows), block.shape[1], embedded.model.config.vocab_size)
        for q, ch in zip(slip.result + slip.copies, "1212"):  # the look predicts 12 everywhere it was hidden
            logits[0, q, tok.convert_tokens_to_ids(ch)] = 1.0
        logits[0, [q for q in range(block.shape[1]) if q not in slip.result + slip.copies], 0] = 1.0
        return logits

    pol = _policy(embedded, accept)
    new_x0, new_cur = pol.token_action(x0, cur, second_look)
    assert seen["rows"] == [0]
    hidden = (seen["block"][0] == mask).nonzero().squeeze(1).tolist()
    assert hidden == sorted(slip.result + slip.copies)  # digits and copies hidden, nothing else
    text = tok.decode(torch.where(new_cur == mask, new_x0, new_cur)[0].tolist())
    assert text.replace(" ", "") == "7+5=12and12+1"
    assert new_cur[0, slip.copies[0]] == mask  # a masked position gets a candidate, not a visible token
    assert (pol.tries, pol.actions, pol.extra_forwards) == (1, 1, 1)
    assert tok.decode(cur[0].tolist()).replace(" ", "").startswith("7+5=13")  # the caller's tensors untouched


def test_accept_true_refuses_a_false_reprediction(embedded):
    tok = embedded.tokenizer
    cur = _row(embedded, "7 + 5 = 13 and more")
    V = embedded.model.config.vocab_size

    def wrong_again(rows, block):
        logits = torch.zeros(len(rows), block.shape[1], V)
        logits[..., tok.convert_tokens_to_ids("4")] = 1.0  # 44: still false
        return logits

    for accept, changed in (("true", False), ("any", True)):
        pol = _policy(embedded, accept)
        _, new = pol.token_action(cur.clone(), cur.clone(), wrong_again)
        assert bool((new != cur).any()) == changed and pol.tries == 1 and pol.actions == int(changed)
    with pytest.raises(ValueError, match="accept"):
        _policy(embedded, "maybe")


def test_no_slip_is_entropy_token_for_token(embedded, prompts, monkeypatch):
    cfg = SamplerConfig(strategy="entropy", gen_length=64, block_length=32, steps=32)
    ref = [g.tokens for g in generate(embedded.model, prompts, cfg, embedded.ids)]
    monkeypatch.setattr(S, "find_slips", lambda pieces: [])
    pol = _policy(embedded, "any")
    attach_policy(embedded.model, pol)
    try:
        got = [g.tokens for g in generate(embedded.model, prompts, SamplerConfig(**{**cfg.__dict__, "strategy": "ups"}),
                                          embedded.ids)]
    finally:
        attach_policy(embedded.model, None)
    assert got == ref and pol.extra_forwards == 0


def test_the_action_runs_in_the_sampler_and_is_refused_where_it_cannot(embedded, prompts):
    pol = _policy(embedded, "any")
    attach_policy(embedded.model, pol)
    try:
        cfg = SamplerConfig(strategy="ups", gen_length=64, block_length=32, steps=32)
        out = generate(embedded.model, prompts, cfg, embedded.ids)
        assert len(out) == len(prompts) and pol.tries >= pol.actions > 0
        assert sum(g.nfe for g in out) == 32 * len(prompts) + pol.extra_forwards  # second looks are NFE too
        with pytest.raises(ValueError, match="without --graphs"):
            generate(embedded.model, prompts[:1], SamplerConfig(strategy="ups", gen_length=32, block_length=32,
                                                                steps=16, graphs=True), embedded.ids)
        x, attn, P = layout_batch(prompts[:1], 32, embedded.ids, "cpu")
        with pytest.raises(ValueError, match="Remask RL cannot train it"):
            EagerDecoder(embedded.model, SamplerConfig(strategy="ups", gen_length=32, block_length=32, steps=16),
                         embedded.ids, x, attn, P, PolicyRule())
    finally:
        attach_policy(embedded.model, None)


def test_the_second_look_is_the_models_forward_on_the_rewritten_block(embedded, prompts):
    cfg = SamplerConfig(strategy="entropy", gen_length=64, block_length=32, steps=32, cache="dual")
    x, attn, P = layout_batch(prompts, cfg.gen_length, embedded.ids, "cpu")
    dec = EagerDecoder(embedded.model, cfg, embedded.ids, x, attn, P)
    dec.begin_block(0, P, P + 32, list(range(len(prompts))))
    with torch.no_grad():
        for n in range(3):
            dec.step(n, n == 0, [torch.Generator().manual_seed(0)] * len(prompts), [True] * len(prompts))
        block = dec.xa[[1, 3], P:P + 32].clone()
        block[:, 5:9] = embedded.ids.mask
        block[:, 0] = 7
        got = dec.repredict([1, 3], block)
        full = dec.xa[[1, 3]].clone()
        full[:, P:P + 32] = block
        ref = embedded.model(full, attention_mask=None if attn is None else attn[[1, 3]]).logits[:, P:P + 32].float()
    ref[..., embedded.ids.mask] = -torch.inf
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert dec.forwards == 4


def test_slip_probe_counts_on_a_few_items(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import slip_probe as probe

    assert [probe.true_result(*t) for t in [("7", "+", "5"), ("3", "-", "5"), ("12", "/", "5"), ("12", "/", "4"),
                                            ("6", "x", "7"), ("1", "/", "0")]] == ["12", None, None, "3", "42", None]
    slip = S.Slip("7", "+", "5", [4, 5], [9, 10])
    assert probe.hidden_positions(slip, "result", 12) == [4, 5]
    assert probe.hidden_positions(slip, "result+copies", 12) == [4, 5, 9, 10]
    assert probe.hidden_positions(slip, "result+after", 12) == list(range(4, 12))
    got = probe.main(["--n_items", "6", "--steps", "6", "--device", "cpu", "--out", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()) == got and got["false_equations"] > 0
    for c in probe.CONTEXTS:
        v = got["contexts"][c]
        assert 0 <= v["fixed"] <= got["false_equations"] and 0 <= v["top2"] <= v["same_length"] <= got["false_equations"]
