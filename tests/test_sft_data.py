"""SFT data: field maps, local files, errors that list what exists, tokenised layout, collate, sharding."""
import json
import sys
import types

import pytest

from remedi.training import data as D
from remedi.model.loading import encode_prompt
from tests.conftest import make_tokenizer, shared_data_dir

GSM = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many?",
        "answer": f"{i} + {i + 2} = {2 * i + 2}.\n#### {2 * i + 2}"} for i in range(10)]
EOS, EOT = 1, 5


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_json_and_split_folder(tmp_path):
    f = write_jsonl(tmp_path / "data.jsonl", GSM)
    rows, src = D.load_records(str(f))
    assert rows == GSM and src.endswith("data.jsonl")
    (tmp_path / "list.json").write_text(json.dumps(GSM[:3]))
    assert D.load_records(str(tmp_path / "list.json"))[0] == GSM[:3]
    (tmp_path / "obj.json").write_text(json.dumps({"data": GSM[:2], "version": 1}))
    assert D.load_records(str(tmp_path / "obj.json"))[0] == GSM[:2]
    folder = tmp_path / "gsm"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", GSM[:4])
    write_jsonl(folder / "test.jsonl", GSM[4:])
    assert D.load_records(str(folder), split="test")[0] == GSM[4:]
    assert D.load_records(str(folder))[0] == GSM[:4]
    with pytest.raises(ValueError, match=r"--split 'validation' not found.*\['test', 'train'\]"):
        D.load_records(str(folder), split="validation")
    with pytest.raises(ValueError, match="single file"):  # never a silent fallback to another split
        D.load_records(str(folder / "train.jsonl"), split="test")
    assert D.load_records(str(folder / "train.jsonl"), split="train")[0] == GSM[:4]


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(GSM[:3]), str(tmp_path / "d.parquet"))
    assert D.load_records(str(tmp_path / "d.parquet"))[0] == GSM[:3]


def test_fields_known_and_errors():
    assert D.resolve_fields("openai/gsm8k", None, None) == ("question", ("answer",), "\n\n")
    assert D.resolve_fields("HuggingFaceH4/MATH-500", None, None)[:2] == ("problem", ("solution",))
    assert D.KNOWN["HuggingFaceH4/MATH-500"].split == "test"
    assert D.resolve_fields("simplescaling/s1K-1.1", None, None)[1] == ("deepseek_thinking_trajectory",
                                                                        "deepseek_attempt")
    assert D.resolve_fields("simplescaling/s1K-1.1", None, "deepseek_attempt")[1] == ("deepseek_attempt",)
    assert D.resolve_fields("OpenCoder-LLM/opc-sft-stage2", None, None)[:2] == ("instruction", ("output",))
    with pytest.raises(ValueError, match="--prompt_field"):
        D.resolve_fields("my/data", None, None)
    with pytest.raises(ValueError, match=r"\['problem'\] not found; fields found: \['answer', 'question'\]"):
        D.check_fields(GSM, "problem", ("answer",), "x.jsonl")


def test_hub_missing_split_lists_available(monkeypatch):
    fake = types.SimpleNamespace(get_dataset_split_names=lambda name, subset: ["train", "test"],
                                 load_dataset=lambda name, subset, split: GSM[:2])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"--split 'validation' not found in openai/gsm8k \(main\); available"):
        D.load_records("openai/gsm8k", split="validation")
    rows, src = D.load_records("openai/gsm8k")
    assert rows == GSM[:2] and src == "openai/gsm8k/main[train]"
    rows, _ = D.load_records("OpenCoder-LLM/opc-sft-stage2", subset="educational_instruct,evol_instruct")
    assert len(rows) == 4
    with pytest.raises(ValueError, match="not a subset"):
        D.load_records("OpenCoder-LLM/opc-sft-stage2", subset="nope")


@pytest.mark.parametrize("chat", [False, True])
def test_tokenize_layout(tok, chat):
    data = D.tokenize_records(GSM[:3], tok, prompt_field="question", answer_fields=("answer",), answer_join="\n\n",
                              seq_len=200, chat=chat, eos_id=EOS, eot_id=EOT)
    assert len(data.examples) == 3 and data.n_truncated == data.n_skipped == 0
    e = data.examples[0]
    assert e.prompt_ids == encode_prompt(tok, GSM[0]["question"], chat)  # the prompt exactly as at inference
    end = [EOT, EOS] if chat else [EOS]
    assert e.answer_ids[-len(end):] == end
    assert tok.decode(e.answer_ids[: -len(end)]) == GSM[0]["answer"]


def test_truncate_and_skip_counts(tok):
    rows = [{"q": "short?", "a": "x " * 200}, {"q": "long " * 100, "a": "y"}, {"q": "ok?", "a": "fine"},
            {"q": "", "a": "empty prompt"}]
    data = D.tokenize_records(rows, tok, prompt_field="q", answer_fields=("a",), answer_join="", seq_len=40,
                              chat=False, eos_id=EOS, eot_id=EOT)
    assert (len(data.examples), data.n_truncated, data.n_skipped) == (2, 1, 2)
    assert len(data.examples[0].prompt_ids) + len(data.examples[0].answer_ids) == 40
    assert "1 answers truncated" in data.summary() and "2 skipped" in data.summary()


def test_collate_pads_answer_with_eos():
    ex = [D.Example([7, 8], [9, 1]), D.Example([7, 8, 9], [10, 11, 1])]
    ids, answer = D.collate(ex, pad_id=1, length=8)
    assert ids.tolist() == [[7, 8, 9, 1, 1, 1, 1, 1], [7, 8, 9, 10, 11, 1, 1, 1]]
    assert answer.tolist() == [[False, False, True, True, True, True, True, True],
                               [False, False, False, True, True, True, True, True]]
    ids, _ = D.collate(ex, pad_id=1)
    assert ids.shape == (2, 6)


def test_micro_batches_shard_and_order():
    n = 23
    a = D.micro_batches(n, 2, 2, 0, seed=3, epoch=0)
    b = D.micro_batches(n, 2, 2, 1, seed=3, epoch=0)
    assert len(a) == len(b) == 5  # 23 // 4 global batches; the tail is dropped
    flat = [i for x in a + b for i in x]
    assert len(set(flat)) == 20
    assert D.micro_batches(n, 2, 2, 0, seed=3, epoch=0) == a
    assert D.micro_batches(n, 2, 2, 0, seed=3, epoch=1) != a


def test_arith_dataset():
    rows, src = D.load_records("arith", arith_n=30, seed=1)
    assert len(rows) == 30 and "question" in rows[0] and "####" in rows[0]["answer"]
    with pytest.raises(ValueError, match="splits: train, validation, test"):
        D.load_records("arith", split="dev")


def test_shared_gsm8k_rows(tok):
    root = shared_data_dir()
    if root is None:
        pytest.skip("no ../shared/data")
    rows, _ = D.load_records(str(root / "gsm8k"), split="train")
    D.check_fields(rows, "question", ("answer",), "gsm8k")
    data = D.tokenize_records(rows[:20], tok, prompt_field="question", answer_fields=("answer",), answer_join="",
                              seq_len=256, chat=True, eos_id=EOS, eot_id=EOT)
    assert data.n_records == 20 and len(data.examples) + data.n_skipped == 20
    ids, answer = D.collate(data.examples[:2], pad_id=EOS, length=256)
    assert ids.shape == (2, 256) and answer[:, -1].all()


def test_malformed_local_files_name_file_and_line(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(GSM[0]) + "\n[1, 2, 3]\n")
    with pytest.raises(ValueError, match=rf"{f}:2: a JSON list, not a record object"):
        D.load_records(str(f))
    f.write_text(json.dumps(GSM[0]) + "\n{\"question\": \"torn\n")
    with pytest.raises(ValueError, match=rf"{f}:2: not a JSON line"):
        D.load_records(str(f))
    j = tmp_path / "bad.json"
    j.write_text(json.dumps([GSM[0], "text"]))
    with pytest.raises(ValueError, match=rf"{j}: element 1 of the record list is a JSON str"):
        D.load_records(str(j))
    for name in ("empty.jsonl", "blank.jsonl", "empty.json"):
        e = tmp_path / name
        e.write_text("\n\n" if name == "blank.jsonl" else "[]" if name.endswith(".json") else "")
        with pytest.raises(ValueError, match=rf"{e} holds no records \(the file is empty\)"):
            D.load_records(str(e))


def test_record_missing_a_field_names_record_and_field(tok):
    rows = [GSM[0], {"question": "What is 2 + 2?"}, GSM[1]]
    with pytest.raises(ValueError, match=r"x.jsonl: record 2 has no field 'answer' \(its fields: \['question'\]\)"):
        D.tokenize_records(rows, tok, prompt_field="question", answer_fields=("answer",), answer_join="",
                           seq_len=200, chat=False, eos_id=EOS, eot_id=EOT, source="x.jsonl")
    # a present but empty (or null) field is skipped and counted as such, not as "too long"
    rows = [GSM[0], {"question": "Q?", "answer": None}]
    data = D.tokenize_records(rows, tok, prompt_field="question", answer_fields=("answer",), answer_join="",
                              seq_len=200, chat=False, eos_id=EOS, eot_id=EOT, source="x.jsonl")
    assert (len(data.examples), data.n_skipped, data.n_empty) == (1, 1, 1)
    assert "(0 prompt alone too long, 1 with an empty or non-text field)" in data.summary()


def test_one_format_inference_for_eval_and_rl(tmp_path):
    """Evaluation and RL read a dataset's answer format through remedi.tasks.records.infer_format: the first
    row's fields win over the name, the name decides when the fields do not; RL refuses code formats."""
    from remedi.evaluation.data import resolve_dataset
    from remedi.rl.data import answer_format
    from remedi.tasks.records import infer_format

    assert infer_format("openai/gsm8k") == "gsm8k" and infer_format("HuggingFaceH4/MATH-500") == "math"
    assert infer_format("gsm_like.jsonl", {"problem": "p", "answer": "1"}) == "math"  # fields first
    assert infer_format("x.jsonl", {"task_id": 1, "entry_point": "f", "test": "t"}) == "humaneval"
    assert infer_format("stuff.jsonl", {"q": 1}) is None
    f = tmp_path / "mystery.jsonl"
    f.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    assert resolve_dataset(str(f)).fmt == answer_format(str(f), [{"problem": "1+1?", "answer": "2"}]) == "math"
    with pytest.raises(ValueError, match="--format gsm8k or --format math"):
        answer_format("mbpp", [{"task_id": 1, "test_list": []}])
    with pytest.raises(ValueError, match="cannot tell"):
        answer_format("stuff", [{"q": 1}])


def test_huge_records_are_dropped_or_cut_before_tokenising(tok, tmp_path):
    """A 20-million-character record is judged by its length in characters (no token can spell more than the
    vocabulary's longest string), so it costs no tokenising; the summary and the too-few-examples error name
    the record and why. A long answer is cut before tokenising and keeps exactly the tokens it had."""
    import time

    huge = "7 + 8 = 15. " * 1_700_000  # ~20 MB, one line in a .jsonl
    long_answer = "x y " * 20_000
    rows = [{"q": huge, "a": "15"}, {"q": "ok?", "a": long_answer}, {"q": "fine?", "a": "yes"}]
    t0 = time.perf_counter()
    data = D.tokenize_records(rows, tok, prompt_field="q", answer_fields=("a",), answer_join="", seq_len=40,
                              chat=False, eos_id=EOS, eot_id=EOT)
    assert time.perf_counter() - t0 < 5
    assert (len(data.examples), data.n_skipped, data.n_truncated) == (2, 1, 1)
    assert data.dropped == [(1, "prompt of 20,400,000 characters, longer than --seq_len 40 tokens")]
    assert "dropped: record 1 (prompt of 20,400,000 characters" in data.summary()
    full = list(tok(long_answer, add_special_tokens=False)["input_ids"])
    kept = data.examples[0].answer_ids
    assert kept == full[:len(kept)] and len(data.examples[0].prompt_ids) + len(kept) == 40

    # the training script: every record too long -> the step error says they were dropped and why
    from remedi.train_remask_sft import main as sft_main
    from tests.conftest import build_model_dir, train_argv

    data_file = tmp_path / "huge.jsonl"
    data_file.write_text(json.dumps({"question": huge, "answer": "15"}) + "\n")
    model = build_model_dir(tmp_path / "m")
    with pytest.raises(ValueError, match=r"0 examples cannot fill one optimiser step .*1 of 1 records dropped; "
                                         r"dropped: record 1 \(prompt of 20,400,000 characters"):
        sft_main(train_argv(model, data_file, tmp_path / "out", "--max_steps", "1"))
