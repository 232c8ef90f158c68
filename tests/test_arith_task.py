"""Tests for the synthetic arithmetic task and its tokenizer (remedi/arith_task.py).

They re-derive every answer from the solution text itself, so a generator bug cannot hide behind the
generator's own bookkeeping.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remedi.tasks import arith as at  # noqa: E402

N_CHECK = 3000


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return at.generate_split("train", N_CHECK, seed=123)


@pytest.fixture(scope="module")
def tok(items):
    return at.train_tokenizer([at.item_text(x) for x in items], vocab_size=1024)


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert a % b == 0, f"inexact division {a} / {b}"
    return a // b


# ---------------------------------------------------------------------------------------------- data


def test_generate_problem_deterministic_and_fields():
    a = [at.generate_problem(random.Random(7), k) for k in (1, 2, 3, 4)]
    b = [at.generate_problem(random.Random(7), k) for k in (1, 2, 3, 4)]
    assert a == b
    for k, it in zip((1, 2, 3, 4), a):
        assert set(it) == {"question", "answer", "n_ops"} and it["n_ops"] == k
    with pytest.raises(ValueError):
        at.generate_problem(random.Random(0), 5)


def test_split_determinism_and_seed_sensitivity():
    s1 = at.generate_split("test", 300, seed=0)
    s2 = at.generate_split("test", 300, seed=0)
    s3 = at.generate_split("test", 300, seed=1)
    assert s1 == s2
    assert [x["question"] for x in s1] != [x["question"] for x in s3]
    # prefix-stable: a larger split starts with the smaller one, so ids keep their meaning
    assert at.generate_split("test", 500, seed=0)[:300] == s1


def test_make_splits_disjoint_ids_and_fields():
    sp = at.make_splits(3000, 300, 500, seed=0)
    assert {k: len(v) for k, v in sp.items()} == {"train": 3000, "validation": 300, "test": 500}
    qsets = {}
    for name, split in sp.items():
        qs = [x["question"] for x in split]
        assert len(set(qs)) == len(qs), f"duplicate questions inside {name}"
        qsets[name] = set(qs)
        for i, x in enumerate(split):
            assert set(x) == {"id", "question", "answer", "n_ops"}
            assert x["id"] == f"arith-{name}-{i:05d}"
            assert re.fullmatch(r"arith-(train|validation|test)-\d{5,}", x["id"])
    assert not qsets["train"] & qsets["validation"]
    assert not qsets["train"] & qsets["test"]
    assert not qsets["validation"] & qsets["test"]
    # test does not depend on the other split sizes
    assert at.make_splits(10, 10, 500, seed=0)["test"] == sp["test"]
    # exclusion really filters: forbidding the first test question changes nothing but skips it
    banned = sp["test"][0]["question"]
    again = at.generate_split("test", 5, seed=0, exclude=[banned])
    assert banned not in {x["question"] for x in again}


def test_every_solution_line_is_correct_arithmetic(items):
    for it in items:
        lines = it["answer"].split("\n")
        assert re.fullmatch(r"#### \d+", lines[-1]), it
        final = int(lines[-1][5:])
        assert at.FINAL_RE.findall(it["answer"]) == [str(final)]
        eqs = []
        for line in lines[:-1]:
            found = at.EQUATION_RE.findall(line)
            assert len(found) == 1, (line, it)
            a, op, b, c = int(found[0][0]), found[0][1], int(found[0][2]), int(found[0][3])
            assert _apply(a, op, b) == c, (line, it)
            assert 0 <= c <= 999 and 0 <= a <= 999 and 0 <= b <= 999
            eqs.append((a, b, c))
        assert len(eqs) == it["n_ops"], it
        assert eqs[-1][2] == final, it
        # every intermediate result feeds a later equation, so the answer depends on every step
        for i, (_, _, c) in enumerate(eqs[:-1]):
            assert any(c in (a2, b2) for a2, b2, _ in eqs[i + 1:]), (c, it)
        assert it["question"].endswith("?")


def test_n_ops_distribution_covers_1_to_4(items):
    counts = Counter(x["n_ops"] for x in items)
    assert set(counts) == {1, 2, 3, 4}
    for k in (1, 2, 3, 4):
        assert counts[k] > 0.15 * len(items), counts


def test_variety_of_question_shapes(items):
    obj_words = sorted({w for pair in at.OBJECTS + at.CONTAINERS for w in pair}, key=len, reverse=True)
    name_re = re.compile(r"\b(" + "|".join(at.NAMES) + r")\b")
    obj_re = re.compile(r"\b(" + "|".join(map(re.escape, obj_words)) + r")\b")

    def shape(q: str) -> str:
        return obj_re.sub("O", name_re.sub("N", re.sub(r"\d+", "#", q)))

    sample = items[:2000]
    shapes = Counter(shape(x["question"]) for x in sample)
    assert len(shapes) >= 50, len(shapes)
    # no single shape dominates
    assert shapes.most_common(1)[0][1] < 0.05 * len(sample)
    # sentence-level variety: distinct sentence templates across the sample
    sentences = {s for x in sample for s in re.split(r"(?<=[.?]) ", shape(x["question"]))}
    assert len(sentences) >= 50, len(sentences)
    assert len({x["answer"].split("\n")[-1] for x in sample}) >= 100  # many distinct final answers


# ------------------------------------------------------------------------------------------ tokenizer


def test_special_token_ids(tok):
    assert tok.convert_tokens_to_ids(at.SPECIAL_TOKENS) == [0, 1, 2, 3, 4, 5]
    assert at.SPECIAL_TOKENS == ["<|mdm_mask|>", "<|endoftext|>", "<|startoftext|>",
                                 "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (0, 1, 1, 2)
    assert tok.is_fast
    assert len(tok) <= 1024


def test_encode_adds_no_special_tokens(tok, items):
    q = items[0]["question"]
    with_sp = tok(q, add_special_tokens=True)["input_ids"]
    without = tok(q, add_special_tokens=False)["input_ids"]
    assert with_sp == without
    assert min(with_sp) >= len(at.SPECIAL_TOKENS)
    # special tokens written in text are recognised as single ids
    assert tok("<|startoftext|>hi<|eot_id|>")["input_ids"][0] == 2
    assert tok("<|startoftext|>hi<|eot_id|>")["input_ids"][-1] == 5


def test_chat_template(tok):
    msg = "Tom has 3 apples. How many apples does Tom have?"
    out = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
    assert out == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
        + msg
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    no_gen = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False)
    assert no_gen == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + msg + "<|eot_id|>"
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": msg},
        {"role": "assistant", "content": "3"},
    ]
    assert tok.apply_chat_template(conv, tokenize=False) == (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + msg + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n3<|eot_id|>"
    )
    ids = tok(out, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [2, 3] and ids.count(5) == 1
    assert len(ids) - len(tok(msg)["input_ids"]) <= 12  # role names are single tokens, not bytes


def test_round_trip_and_digits(tok, items):
    for it in items[:1000]:
        for text in (it["question"], it["answer"], at.item_text(it)):
            ids = tok(text)["input_ids"]
            assert tok.decode(ids) == text
    odd = "Ünïcode & emoji \U0001F600 \t tabs\n\nnew lines 00123"
    assert tok.decode(tok(odd)["input_ids"]) == odd  # byte-level: anything round-trips
    for it in items[:300]:
        for t in tok.convert_ids_to_tokens(tok(it["answer"])["input_ids"]):
            if any(ch.isdigit() for ch in t):
                assert len(t) == 1, t  # each digit is its own token
    assert tok.convert_ids_to_tokens(tok("12345")["input_ids"]) == list("12345")


def test_length_budget(tok, items):
    lens = [len(tok(at.item_text(x))["input_ids"]) for x in items]
    assert max(lens) <= 165, max(lens)


def test_save_and_autotokenizer_load(tok, items, tmp_path):
    from transformers import AutoTokenizer

    files = at.save_tokenizer(tok, tmp_path / "tok")
    names = {Path(f).name for f in files}
    assert names == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    stm = json.loads((tmp_path / "tok" / "special_tokens_map.json").read_text())
    assert stm["mask_token"] == "<|mdm_mask|>" and stm["bos_token"] == "<|startoftext|>"
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.is_fast
    assert (loaded.mask_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (0, 1, 1, 2)
    assert loaded.convert_tokens_to_ids(at.SPECIAL_TOKENS) == [0, 1, 2, 3, 4, 5]
    for it in items[:200]:
        text = at.item_text(it)
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text
    conv = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_script_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_arith_data", ROOT / "scripts" / "make_arith_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "data"
    summary = mod.main(["--out_dir", str(out), "--tokenizer_dir", str(tmp_path / "tk"),
                        "--n_train", "400", "--n_val", "50", "--n_test", "80", "--seed", "3"])
    for name, n in (("train", 400), ("validation", 50), ("test", 80)):
        rows = [json.loads(l) for l in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == n and rows[0]["id"] == f"arith-{name}-00000"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    assert (tmp_path / "tk" / "tokenizer.json").exists()
    assert summary["token_lengths"]["test"]["chat_total"]["max"] <= 192
    assert json.loads(capsys.readouterr().out)["sizes"]["train"] == 400
