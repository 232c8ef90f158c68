"""HumanEval and MBPP: load problems, render prompts, pull code out of completions, score them in a sandbox.

Row schemas (the hub datasets' own field names):

* ``humaneval`` (``openai_humaneval``): ``task_id``, ``prompt`` (signature + docstring), ``canonical_solution``
  (optional here), ``test`` (defines ``check(candidate)``), ``entry_point``.
* ``mbpp`` (``mbpp``, config ``sanitized``): ``task_id``, ``prompt``, ``code`` (reference, optional here),
  ``test_imports`` (optional, default ``[]``), ``test_list``. Rows of the full config, which call the problem
  text ``text``, are accepted too; rows are normalised so ``prompt`` always holds the problem text.

Choices made here (kept deliberately simple):

* HumanEval is completion-style: the prompt *is* the function header and docstring, and the completion is
  expected to continue the function body. A completion that instead (re)defines the entry point itself
  (``def <entry_point>(`` at any indentation) is treated as a full solution and kept whole; it is placed after
  the prompt, whose function then has just its docstring as body and is overridden by the new definition.
* Body continuations are cut at the first top-level stop sequence (``\\ndef ``, ``\\nclass ``,
  ``\\nif __name__``, ``\\nprint(``, ``\\n#``): anything the model writes after the function body at column
  0 is dropped, so stray test code or a second function cannot break or fake the check.
* MBPP uses an instruction prompt: the problem text, the first test assert as an example (it fixes the
  function name and signature), and a request for the complete function in a ``python`` code block. MBPP
  completions are not cut at stop sequences (helpers and imports are legitimate there), only unfenced.
* Fences: if the completion contains a markdown code fence, the first fenced block (preferring one tagged
  ``python``/``py``/untagged) is used; an unclosed fence runs to the end of the text.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from remedi.sandbox import Limits, require_strong, run_many

__all__ = ["FORMATS", "HUMANEVAL_STOP", "load_code_rows", "build_prompt", "extract_code", "build_program",
           "score_completions", "strip_fences"]

FORMATS = ("humaneval", "mbpp")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
_REQUIRED = {"humaneval": ("task_id", "prompt", "test", "entry_point"), "mbpp": ("task_id", "test_list")}


def _fmt(fmt: str) -> str:
    f = str(fmt).lower().replace("-", "").replace("_", "")
    f = {"openaihumaneval": "humaneval", "humaneval": "humaneval", "mbpp": "mbpp"}.get(f, f)
    if f not in FORMATS:
        raise ValueError(f"unknown code task format {fmt!r}; expected one of {list(FORMATS)}")
    return f


def _normalise(row: Any, fmt: str, where: str) -> dict:
    """Check one row against the schema and return a plain dict copy (``prompt`` always set for MBPP)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object for a {fmt} row, got {type(row).__name__}")
    row = dict(row)
    missing = [k for k in _REQUIRED[fmt] if k not in row]
    if fmt == "mbpp":
        if "prompt" not in row and "text" in row:
            row["prompt"] = row["text"]
        if "prompt" not in row:
            missing.insert(1, "prompt (or text)")
    if missing:
        raise ValueError(f"{where}: {fmt} row is missing field(s) {', '.join(missing)}")
    if fmt == "humaneval":
        for k in ("prompt", "test", "entry_point"):
            if not isinstance(row[k], str):
                raise ValueError(f"{where}: field {k} must be a string, got {type(row[k]).__name__}")
        if not row["entry_point"].isidentifier():
            raise ValueError(f"{where}: entry_point {row['entry_point']!r} is not a Python identifier")
    else:
        tests = row["test_list"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"{where}: field test_list must be a non-empty list of strings")
        imports = row.get("test_imports") or []
        if not isinstance(imports, list) or not all(isinstance(t, str) for t in imports):
            raise ValueError(f"{where}: field test_imports must be a list of strings")
        row["test_imports"] = list(imports)
        if not isinstance(row["prompt"], str):
            raise ValueError(f"{where}: field prompt must be a string, got {type(row['prompt']).__name__}")
    return row


def _read_jsonl(path: Path, fmt: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_normalise(obj, fmt, where))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_code_rows(dataset: str, fmt: str, split: str | None = None, subset: str | None = None) -> list[dict]:
    """Rows of a HumanEval or MBPP dataset, checked against the schema.

    ``dataset`` is a local ``.jsonl`` file, a folder holding ``<split>.jsonl``, or a hub id loaded with
    ``datasets.load_dataset(dataset, subset, split=split)``. ``split`` defaults to ``"test"``; ``subset``
    defaults to ``"sanitized"`` for MBPP and to none for HumanEval. Errors name the file and line (or the hub
    id and row index).
    """
    fmt = _fmt(fmt)
    split = split or "test"
    p = Path(os.path.expanduser(str(dataset)))
    if p.is_dir():
        f = p / f"{split}.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"{p}: no {split}.jsonl in this folder")
        return _read_jsonl(f, fmt)
    if p.is_file():
        return _read_jsonl(p, fmt)
    if str(dataset).endswith((".jsonl", ".json")) or str(dataset).startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{dataset}: no such file or folder")
    if subset is None and fmt == "mbpp":
        subset = "sanitized"
    try:
        import datasets  # lazily: only hub loading needs it
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"loading {dataset!r} from the hub needs the 'datasets' package") from e
    ds = datasets.load_dataset(dataset, subset, split=split)
    return [_normalise(dict(r), fmt, f"{dataset}[{split}][{i}]") for i, r in enumerate(ds)]


def build_prompt(row: dict, fmt: str) -> str:
    """The text given to the model: HumanEval's function prompt as is; an instruction for MBPP."""
    fmt = _fmt(fmt)
    if fmt == "humaneval":
        return row["prompt"]
    text = str(row.get("prompt", row.get("text", ""))).strip()
    return (
        "Write a Python function that solves the following problem.\n\n"
        f"Problem: {text}\n\n"
        "Your function must pass tests like this one:\n"
        f"{row['test_list'][0].strip()}\n\n"
        "Answer with the complete function (and any imports it needs) in a ```python code block."
    )


_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def strip_fences(text: str) -> str:
    """The first fenced code block of ``text`` (python/py/untagged preferred), or ``text`` if it has none."""
    if "```" not in text:
        return text
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if not blocks:  # e.g. an opening fence on the very last line, with nothing after it
        return text.split("```", 1)[0]
    for lang, body in blocks:
        if lang in ("", "python", "py", "python3"):
            return body
    return blocks[0][1]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def extract_code(completion: str, row: dict, fmt: str) -> str:
    """The code part of a completion (see the module docstring for the rules)."""
    fmt = _fmt(fmt)
    code = strip_fences(completion)
    if fmt == "mbpp":
        return code.strip("\n") + "\n"
    if _defines(code, row["entry_point"]):
        return code.strip("\n") + "\n"
    cut = len(code)
    for stop in HUMANEVAL_STOP:
        i = code.find(stop)
        if i != -1:
            cut = min(cut, i)
    return code[:cut].rstrip() + "\n"


def build_program(row: dict, completion: str, fmt: str) -> str:
    """The program that checks one (already extracted) completion; it exits 0 iff the tests pass.

    HumanEval: ``prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n"`` (a newline is inserted
    after the prompt when the completion is a full definition). MBPP: ``test_imports`` + code + the asserts.
    """
    fmt = _fmt(fmt)
    if fmt == "humaneval":
        prompt = row["prompt"]
        if _defines(completion, row["entry_point"]) and not prompt.endswith("\n"):
            prompt += "\n"
        return prompt + completion + "\n" + row["test"] + f"\ncheck({row['entry_point']})\n"
    imports = "\n".join(row.get("test_imports") or [])
    asserts = "\n".join(row["test_list"])
    return (imports + "\n\n" if imports else "") + completion + "\n\n" + asserts + "\n"


def score_completions(rows: Sequence[dict], completions: Sequence[str | Sequence[str]], fmt: str,
                      limits: Limits = Limits(), workers: int | None = None) -> list[dict]:
    """Run every completion against its row's tests in the sandbox.

    ``completions[i]`` is one string or a list of samples for ``rows[i]``. Returns one dict per sample, in
    order: ``task_id``, ``sample`` (index within the row), ``passed``, ``status``, ``reason``. Raises
    :class:`remedi.sandbox.SandboxError` first when this host lacks a required containment layer (see
    :func:`remedi.sandbox.require_strong`).
    """
    fmt = _fmt(fmt)
    require_strong(limits.network)
    if len(rows) != len(completions):
        raise ValueError(f"got {len(completions)} completion entries for {len(rows)} rows")
    programs, meta = [], []
    for row, comp in zip(rows, completions):
        samples = [comp] if isinstance(comp, str) else list(comp)
        for j, c in enumerate(samples):
            if not isinstance(c, str):
                raise ValueError(f"task {row.get('task_id')!r}: completion {j} is {type(c).__name__}, not str")
            programs.append(build_program(row, extract_code(c, row, fmt), fmt))
            meta.append((row.get("task_id"), j))
    results = run_many(programs, limits, workers=workers)
    return [{"task_id": tid, "sample": j, "passed": r.passed, "status": r.status, "reason": r.reason}
            for (tid, j), r in zip(meta, results)]
