"""Tests for HumanEval/MBPP loading, prompting, code extraction and sandboxed scoring (remedi/tasks/code.py).

Tiny datasets in the real hub schemas are written to tmp_path; known-correct completions must score 1 and
known-wrong ones 0, with the programs really executed in the sandbox.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remedi.sandbox import Limits  # noqa: E402
from remedi.tasks import code as ct  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

LIMITS = Limits(wall_s=3, cpu_s=3, memory_mb=256)

HUMANEVAL = [
    {"task_id": "Toy/0", "entry_point": "add",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n'
               '    >>> add(2, 3)\n    5\n    """\n',
     "canonical_solution": "    return a + b\n",
     "test": "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
             "    assert candidate(-4, 4) == 0\n    assert candidate(10, 0) == 10\n"},
    {"task_id": "Toy/1", "entry_point": "reverse",
     "prompt": 'def reverse(s: str) -> str:\n    """Return s reversed.\n    >>> reverse("abc")\n    \'cba\'\n    """\n',
     "canonical_solution": "    return s[::-1]\n",
     "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n    assert candidate('') == ''\n"
             "    assert candidate('ab c') == 'c ba'\n"},
    {"task_id": "Toy/2", "entry_point": "total",
     "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n',
     "canonical_solution": "    return sum(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"},
]

MBPP = [
    {"task_id": 11, "prompt": "Write a function to add two numbers.", "code": "def add_nums(a, b):\n    return a + b\n",
     "test_imports": [], "test_list": ["assert add_nums(1, 2) == 3", "assert add_nums(-1, 1) == 0",
                                       "assert add_nums(0, 0) == 0"]},
    {"task_id": 12, "prompt": "Write a function to reverse a string.",
     "code": "def rev(s):\n    return s[::-1]\n", "test_imports": [],
     "test_list": ["assert rev('hello') == 'olleh'", "assert rev('') == ''"]},
    {"task_id": 13, "prompt": "Write a function returning the square root of the sum of squares.",
     "code": "def hyp(a, b):\n    return math.sqrt(a * a + b * b)\n", "test_imports": ["import math"],
     "test_list": ["assert math.isclose(hyp(3, 4), 5.0)", "assert hyp(0, 0) == 0"]},
]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def he_file(tmp_path) -> Path:
    return _write(tmp_path / "humaneval.jsonl", HUMANEVAL)


@pytest.fixture()
def mbpp_file(tmp_path) -> Path:
    return _write(tmp_path / "mbpp.jsonl", MBPP)


# ---- loading -------------------------------------------------------------------------------------------

def test_load_local_files_and_split_folder(tmp_path, he_file, mbpp_file):
    rows = ct.load_code_rows(str(he_file), "humaneval", None, None)
    assert [r["task_id"] for r in rows] == ["Toy/0", "Toy/1", "Toy/2"]
    assert rows[0]["entry_point"] == "add"
    folder = tmp_path / "mbpp_dir"
    folder.mkdir()
    _write(folder / "validation.jsonl", MBPP[:1])
    assert [r["task_id"] for r in ct.load_code_rows(str(folder), "mbpp", "validation", None)] == [11]
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        ct.load_code_rows(str(folder), "mbpp", None, None)
    assert len(ct.load_code_rows(str(mbpp_file), "mbpp", None, None)) == 3


def test_mbpp_full_config_text_field_is_accepted(tmp_path):
    row = {"task_id": 2, "text": "Write a function to double a number.", "code": "def dbl(x):\n    return 2 * x\n",
           "test_list": ["assert dbl(2) == 4"], "test_setup_code": "", "challenge_test_list": []}
    (r,) = ct.load_code_rows(str(_write(tmp_path / "full.jsonl", [row])), "mbpp", None, None)
    assert r["prompt"] == row["text"] and r["test_imports"] == []
    assert "double a number" in ct.build_prompt(r, "mbpp")


@pytest.mark.parametrize("lines,lineno,match", [
    (['{"task_id": "a"', ], 1, "invalid JSON"),
    ([None, "[1, 2, 3]"], 2, "expected a JSON object"),
    ([None, None, "{}"], 3, "missing field"),
])
def test_bad_rows_name_file_and_line(tmp_path, lines, lineno, match):
    good = json.dumps(HUMANEVAL[0])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((good if x is None else x) + "\n" for x in lines))
    with pytest.raises(ValueError, match=match) as exc:
        ct.load_code_rows(str(path), "humaneval", None, None)
    assert f"{path}:{lineno}:" in str(exc.value)


def test_missing_field_is_named(tmp_path):
    row = dict(HUMANEVAL[1])
    del row["entry_point"]
    path = _write(tmp_path / "he.jsonl", [HUMANEVAL[0], row])
    with pytest.raises(ValueError, match=r"he\.jsonl:2: humaneval row is missing field\(s\) entry_point"):
        ct.load_code_rows(str(path), "humaneval", None, None)
    mrow = {"task_id": 1, "code": "", "test_list": ["assert True"]}
    path = _write(tmp_path / "mb.jsonl", [mrow])
    with pytest.raises(ValueError, match=r"mb\.jsonl:1: .*prompt \(or text\)"):
        ct.load_code_rows(str(path), "mbpp", None, None)


def test_hub_loading_goes_through_datasets_with_defaults(monkeypatch):
    calls = []

    def load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return MBPP if name == "mbpp" else HUMANEVAL

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert len(ct.load_code_rows("mbpp", "mbpp", None, None)) == 3
    assert len(ct.load_code_rows("openai_humaneval", "humaneval", None, None)) == 3
    ct.load_code_rows("mbpp", "mbpp", "train", "full")
    assert calls == [("mbpp", "sanitized", "test"), ("openai_humaneval", None, "test"), ("mbpp", "full", "train")]
    with pytest.raises(FileNotFoundError):
        ct.load_code_rows("./missing.jsonl", "mbpp", None, None)
    with pytest.raises(ValueError, match="unknown code task format"):
        ct.load_code_rows("mbpp", "apps", None, None)


# ---- prompts and extraction ----------------------------------------------------------------------------

def test_prompts():
    assert ct.build_prompt(HUMANEVAL[0], "humaneval") == HUMANEVAL[0]["prompt"]
    p = ct.build_prompt(MBPP[0], "mbpp")
    assert MBPP[0]["prompt"] in p and MBPP[0]["test_list"][0] in p
    assert MBPP[0]["test_list"][1] not in p and "```python" in p


def test_fence_stripping():
    assert ct.strip_fences("Here you go:\n```python\ndef f():\n    return 1\n```\nDone.") == \
        "def f():\n    return 1\n"
    assert ct.strip_fences("```\nx = 1\n```") == "x = 1\n"
    assert ct.strip_fences("```py\nx = 2\n") == "x = 2\n"  # unclosed fence runs to the end
    assert ct.strip_fences("```text\nnot code\n```\n```python\ny = 3\n```") == "y = 3\n"
    assert ct.strip_fences("no fences at all") == "no fences at all"


def test_extract_code_cuts_body_continuations_only():
    row = HUMANEVAL[0]
    body = "    return a + b\n\n\ndef unrelated():\n    pass\n"
    assert ct.extract_code(body, row, "humaneval") == "    return a + b\n"
    for tail in ("\nprint(add(1, 2))\n", "\n# test\nassert add(1, 1) == 3\n", "\nif __name__ == '__main__':\n    x\n",
                 "\nclass A:\n    pass\n"):
        assert ct.extract_code("    return a + b\n" + tail, row, "humaneval") == "    return a + b\n"
    full = "```python\nimport math\n\n\ndef add(a, b):\n    return helper(a) + b\n\n\ndef helper(x):\n    return x\n```"
    assert ct.extract_code(full, row, "humaneval") == \
        "import math\n\n\ndef add(a, b):\n    return helper(a) + b\n\n\ndef helper(x):\n    return x\n"
    mb = "```python\ndef rev(s):\n    return s[::-1]\n\n# done\nprint(rev('a'))\n```"
    assert ct.extract_code(mb, MBPP[1], "mbpp") == "def rev(s):\n    return s[::-1]\n\n# done\nprint(rev('a'))\n"


def test_build_program_layout():
    prog = ct.build_program(HUMANEVAL[0], "    return a + b\n", "humaneval")
    assert prog == HUMANEVAL[0]["prompt"] + "    return a + b\n" + "\n" + HUMANEVAL[0]["test"] + "\ncheck(add)\n"
    prog = ct.build_program(MBPP[2], MBPP[2]["code"], "mbpp")
    assert prog.startswith("import math\n\n" + MBPP[2]["code"])
    assert prog.rstrip().endswith(MBPP[2]["test_list"][-1])


# ---- scoring ------------------------------------------------------------------------------------------

def test_humaneval_scoring(he_file):
    rows = ct.load_code_rows(str(he_file), "humaneval", None, None)
    right = ["    return a + b\n\n\ndef extra():\n    return 0\nprint(add(2, 2))\n",
             "```python\ndef reverse(s: str) -> str:\n    return ''.join(reversed(s))\n```\n",
             rows[2]["canonical_solution"]]
    wrong = ["    return a - b\n", "    return s\n", "    return sum(xs) +\n"]
    res = ct.score_completions(rows, right, "humaneval", LIMITS, workers=2)
    assert [r["passed"] for r in res] == [True, True, True], res
    assert [r["task_id"] for r in res] == ["Toy/0", "Toy/1", "Toy/2"]
    res = ct.score_completions(rows, wrong, "humaneval", LIMITS, workers=2)
    assert [r["passed"] for r in res] == [False, False, False]
    assert [r["status"] for r in res] == ["failed"] * 3
    assert res[0]["reason"].startswith("AssertionError") and res[2]["reason"].startswith("SyntaxError")


def test_canonical_solutions_pass_and_a_hang_times_out(he_file):
    rows = ct.load_code_rows(str(he_file), "humaneval", None, None)
    samples = [[r["canonical_solution"], "    while True:\n        pass\n"] for r in rows]
    res = ct.score_completions(rows, samples, "humaneval", Limits(wall_s=1, cpu_s=5, memory_mb=256), workers=4)
    assert [(r["task_id"], r["sample"], r["status"]) for r in res] == [
        (t, j, s) for t in ("Toy/0", "Toy/1", "Toy/2") for j, s in ((0, "passed"), (1, "timeout"))]


def test_mbpp_scoring(mbpp_file):
    rows = ct.load_code_rows(str(mbpp_file), "mbpp", None, None)
    right = [f"Sure! Here is the function:\n```python\n{r['code']}```\nIt works." for r in rows]
    wrong = ["```python\ndef add_nums(a, b):\n    return a * b\n```", "def rev(s):\n    return s\n",
             "def hyp(a, b):\n    return a + b\n"]
    assert [r["passed"] for r in ct.score_completions(rows, right, "mbpp", LIMITS, workers=2)] == [True] * 3
    res = ct.score_completions(rows, wrong, "mbpp", LIMITS, workers=2)
    assert [r["passed"] for r in res] == [False] * 3
    assert all(r["status"] == "failed" and r["reason"].startswith("AssertionError") for r in res)


def test_score_completions_validates_lengths(he_file):
    rows = ct.load_code_rows(str(he_file), "humaneval", None, None)
    with pytest.raises(ValueError, match="3 rows"):
        ct.score_completions(rows, ["    return 1\n"], "humaneval", LIMITS)
