"""Remask-RL rewards: the gold-free equation-truth reward (parser, per-block parts) and the combined reward."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from remedi.model.loading import EMBEDDED_MODEL, SpecialIds, load_tokenizer
from remedi.rl.rewards import (REWARDS, RewardContext, RLItem, block_offsets, find_equations, get_reward,
                               reward_stats)
from remedi.tasks.arith import generate_problem

from .conftest import shared_data_dir


@pytest.mark.parametrize("text, want", [
    ("So Ivy finds 12 * 5 = 60 cupcakes.", [("12 * 5", True)]),
    ("Tom has 23 + 138 = 162 buttons.", [("23 + 138", False)]),
    ("3x4=12, 3 × 4 = 13 and 8 ÷ 2 = 4, 9 − 4 = 5.", [("3x4", True), ("3 × 4", False), ("8 ÷ 2", True),
                                                     ("9 − 4", True)]),
    ("1,234 + 1 = 1,235; 2.5 * 2 = 5.0; 10 / 3 = 3.33; 7 / 2 = 3.", [("1,234 + 1", True), ("2.5 * 2", True),
                                                                   ("10 / 3", True), ("7 / 2", False)]),
    ("$5 * 3 = $15 and 3 - 5 = -2 and 3 / 6 = 50%", [("$5 * 3", True), ("3 - 5", True), ("3 / 6", True)]),
    ("3 + 4 * 2 = 11 and 30 - 8 * 3 = 30 - 24 = 6", [("3 + 4 * 2", True), ("30 - 8 * 3", True),
                                                     ("30 - 24", True)]),
    ("20 - 5 = 15 - 3 = 12", [("20 - 5", False), ("15 - 3", True)]),  # a running total is not an equality
    ("<<48/2=24>>24 and 5 - 1 - 1/2 = 3 1/2 and 1 1/2 / 1/2 = 3", [("48/2", True), ("5 - 1 - 1/2", True),
                                                                   ("1 1/2 / 1/2", True)]),
    ("21 / 10.5 = 2 and 1/0 = 3 and 4 / 0 = 1", [("21 / 10.5", True), ("1/0", False), ("4 / 0", False)]),
    # not read: parentheses, a glued word or number, ==, no numbers, one number a side, algebra
    ("(2 + 3) * 4 + 1 = 21; x2 + 1 = 3; 3 + 4 == 7; x = y; 7 = 7; 26=5+3x; $350 000 + 5 = $350 005", []),
    ("The box 3 + 4 = 7 has 10% of 150 = 75 + 15 things", [("3 + 4", True)]),
    ("no equations at all, 12 apples", []),
])
def test_find_equations(text, want):
    got = find_equations(text)
    assert [(e.expression, e.true) for e in got] == want


def test_result_span_is_the_right_side():
    text = "So Max finds 60 + 38 = 98 cupcakes. Then 3 - 5 = -2."
    e1, e2 = find_equations(text)
    assert text[e1.result_start:e1.result_end] == "98" and text[e1.start:e1.start + 7] == "60 + 38"
    assert text[e2.result_start:e2.result_end] == "2" and e2.result == -2


def test_arith_gold_solutions_are_all_true_and_a_slip_is_caught():
    rng = random.Random(0)
    for i in range(200):
        ans = generate_problem(rng, 1 + i % 4)["answer"]
        eqs = find_equations(ans)
        assert len(eqs) == 1 + i % 4 and all(e.true for e in eqs), ans
        # change the last digit of the first result: exactly that equation becomes false
        e = eqs[0]
        d = ans[e.result_end - 1]
        slip = ans[:e.result_end - 1] + str((int(d) + 1) % 10) + ans[e.result_end:]
        assert [x.true for x in find_equations(slip)] == [False] + [True] * (len(eqs) - 1)


def test_gsm8k_gold_equations_are_read_and_true():
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is not here")
    rows = [json.loads(line) for line in (d / "gsm8k" / "test.jsonl").open()]
    eqs = [e for r in rows for e in find_equations(r["answer"])]
    # the gold solutions' calculator annotations and prose equations; a handful are wrong in the data itself
    assert len(eqs) > 3 * len(rows)
    assert sum(e.true for e in eqs) / len(eqs) > 0.995


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMBEDDED_MODEL)


def _batch(tok, texts, G=96, Lb=32):
    eos = tok.eos_token_id
    rows = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)[:G]
        rows.append(ids + [eos] * (G - len(ids)))
    return SimpleNamespace(final=torch.tensor(rows), states=torch.zeros(len(texts), G // Lb, 1, Lb, dtype=torch.long))


def _ctx(tok, **kw):
    return RewardContext(tok, SpecialIds(mask=tok.mask_token_id, eos=tok.eos_token_id, pad=tok.eos_token_id), **kw)


TEXTS = [
    "So Ivy finds 12 * 5 = 60 cupcakes.\nSo Max finds 60 + 38 = 98 cupcakes.\nSam finds 98 * 4 = 392 cupcakes."
    "\n#### 392",
    "So Ivy finds 12 * 5 = 60 cupcakes.\nSo Max finds 60 + 38 = 97 cupcakes.\nSam finds 97 * 4 = 388 cupcakes."
    "\n#### 388",
    "Sam has many cupcakes.\n#### 392",
]


def test_equation_truth_reward_and_its_block_parts(tok):
    assert "equation_truth" in REWARDS and "math_verify+equation_truth" in REWARDS
    batch = _batch(tok, TEXTS)
    res = get_reward("equation_truth")(batch, [RLItem("a", (), "392")] * 3, _ctx(tok))
    assert torch.allclose(res.reward, torch.tensor([1.0, 2 / 3, 0.0]))
    assert res.correct.tolist() == [True, False, False]
    assert res.extras["no_equation"].tolist() == [False, False, True]
    assert res.extras["equations"].tolist() == [3, 3, 0]
    assert torch.allclose(res.block_reward.sum(1), res.reward)
    # each equation goes to the block of its result's last digit token (digits are single tokens here)
    for i, text in enumerate(TEXTS[:2]):
        want = torch.zeros(3, dtype=torch.long)
        for e in find_equations(text):
            n_tok = len(tok.encode(text[:e.result_end], add_special_tokens=False))
            want[(n_tok - 1) // 32] += 1
        assert res.extras["block_equations"][i].tolist() == want.tolist()
        assert want.count_nonzero() >= 2  # the example spreads over blocks
    # row 1: the slip 60 + 38 = 97 is false, 97 * 4 = 388 is true
    assert res.extras["block_true"][1].sum() == 2
    st = reward_stats(res)
    assert st["no_equation_share"] == pytest.approx(1 / 3) and st["equations_per_rollout"] == 2.0
    assert st["equation_truth"] == pytest.approx((1 + 2 / 3) / 3)


def test_combined_reward_weights_the_shaped_part(tok):
    batch = _batch(tok, TEXTS)
    items = [RLItem("a", (), "392")] * 3
    res = get_reward("math_verify+equation_truth")(batch, items, _ctx(tok, shaped_weight=0.25))
    assert torch.allclose(res.reward, torch.tensor([1.25, 0.25 * 2 / 3, 1.0]))
    assert res.correct.tolist() == [True, False, True]
    assert torch.allclose(res.block_reward.sum(1), res.reward)
    assert torch.allclose(res.block_reward[2], torch.tensor([0.0, 0.0, 1.0]))  # the 0/1 sits in the last block
    mv = get_reward("math_verify")(batch, items, _ctx(tok))
    assert mv.reward.tolist() == [1.0, 0.0, 1.0] and torch.equal(mv.block_reward.sum(1), mv.reward)
    assert reward_stats(mv) == {}
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        _ctx(tok, shaped_weight=-1)


def test_block_offsets_are_prefix_lengths(tok):
    text = TEXTS[0]
    ids = tok.encode(text, add_special_tokens=False)
    bounds = block_offsets(ids, tok, 32, 4)
    assert bounds[:2] == [len(tok.decode(ids[:32])), len(tok.decode(ids[:64]))]
    assert bounds[2] == len(text) and text.startswith(tok.decode(ids[:32]))  # past the end: the whole text
    with pytest.raises(ValueError, match="block_length"):
        get_reward("equation_truth")(SimpleNamespace(final=torch.zeros(1, 8, dtype=torch.long), states=None),
                                     [RLItem("a", ())], _ctx(tok))
