"""The per-item results file of an eval run: one JSON line per finished (item, source, steps).

Lines are appended with fsync (:func:`remedi.files.append_jsonl`), a torn last line is cut off on resume,
and a rerun with other settings into the same folder is refused (:func:`check_resume`).

Answer formats (gsm8k, math) are judged by :func:`remedi.tasks.answer_check.check`. Code formats
(humaneval, mbpp) are judged by running the completion against the problem's tests in the sandbox
(:func:`remedi.tasks.code.score_completions`): ``correct`` = the tests passed, ``status`` = passed | failed |
timeout | memory | error, ``reason`` = the sandbox's one-line explanation, ``extracted`` = the code that
ran (None when empty), and ``problem`` = the row's prompt/tests, so ``--rescore`` re-executes from the
results file alone.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

from remedi.sandbox import Limits
from remedi.evaluation.data import Item, is_code
from remedi.files import append_jsonl, read_jsonl
from remedi.tasks import code
from remedi.tasks.answer_check import check

CODE_LIMITS = Limits()  # per program: 10 s wall / 10 s CPU, 1 GiB address space, no network


def execute_code(problems: Sequence[dict], completions: Sequence[str], fmt: str,
                 limits: Limits = CODE_LIMITS, workers: Optional[int] = None) -> list[dict]:
    """Run each completion against its problem's tests (concurrently, one sandboxed process each).

    Returns one dict per completion: ``extracted`` (the code that ran, None if empty), ``passed``,
    ``status``, ``reason``.
    """
    scores = code.score_completions(problems, list(completions), fmt, limits=limits, workers=workers)
    out = []
    for p, c, sc in zip(problems, completions, scores):
        body = code.extract_code(c or "", p, fmt)
        out.append({"extracted": body if body.strip() else None, "passed": bool(sc["passed"]),
                    "status": sc["status"], "reason": sc["reason"]})
    return out


def make_code_record(item: Item, source: str, steps: Optional[int], prompt: str, completion: str, fmt: str,
                     execution: Optional[dict] = None, **stats: Any) -> dict:
    """A code item's record; ``execution`` from :func:`execute_code` (run here when not given)."""
    if item.problem is None:
        raise ValueError(f"item {item.id}: a {fmt} item needs its problem (tests) to be scored")
    ex = execution if execution is not None else execute_code([item.problem], [completion], fmt)[0]
    return {"id": item.id, "source": source, "steps": steps, "prompt": prompt, "gold": item.gold,
            "completion": completion, "extracted": ex["extracted"], "correct": ex["passed"], "status": ex["status"],
            "reason": ex["reason"], "string_match": None, "note": ex["reason"], **stats, "problem": item.problem,
            **({"meta": item.extra} if item.extra else {})}


def make_record(item: Item, source: str, steps: Optional[int], prompt: str, completion: str, fmt: str,
                **stats: Any) -> dict:
    if is_code(fmt):
        return make_code_record(item, source, steps, prompt, completion, fmt, **stats)
    v = check(completion, item.gold, fmt)
    return {"id": item.id, "source": source, "steps": steps, "prompt": prompt, "gold": item.gold,
            "completion": completion, "extracted": v.extracted, "correct": bool(v.correct),
            "string_match": v.string_match, "note": v.note, **stats, **({"meta": item.extra} if item.extra else {})}


def rescore_code_records(records: Sequence[dict], fmt: str, limits: Limits = CODE_LIMITS) -> list[dict]:
    """Re-execute stored code completions against the tests stored with them (no model, no dataset)."""
    for n, r in enumerate(records):
        missing = [k for k in ("id", "completion", "problem") if k not in r]
        if missing:
            raise ValueError(f"record {n} lacks {missing} (has {sorted(r)}); --rescore of a {fmt} run needs id, "
                             "completion and problem (the tests)")
    ex = execute_code([r["problem"] for r in records], [r["completion"] or "" for r in records], fmt, limits)
    return [{**r, "source": r.get("source", "model"), "steps": r.get("steps"), "extracted": e["extracted"],
             "correct": e["passed"], "status": e["status"], "reason": e["reason"], "note": e["reason"]}
            for r, e in zip(records, ex)]


def rescore_records(records: Sequence[dict], fmt: str) -> list[dict]:
    """Re-check stored completions with the current checker (no model): new extracted/correct/note.

    Code formats re-execute the completions in the sandbox (:func:`rescore_code_records`)."""
    if is_code(fmt):
        return rescore_code_records(records, fmt)
    out = []
    for n, r in enumerate(records):
        missing = [k for k in ("id", "gold", "completion") if k not in r]
        if missing:
            raise ValueError(f"record {n} lacks {missing} (has {sorted(r)}); --rescore needs id, gold, completion")
        v = check(r["completion"] or "", str(r["gold"]), fmt)
        out.append({**r, "source": r.get("source", "model"), "steps": r.get("steps"), "extracted": v.extracted,
                    "correct": bool(v.correct), "string_match": v.string_match, "note": v.note})
    return out


def record_key(r: dict) -> tuple:
    return (str(r["id"]), r.get("source", "model"), r.get("steps"))


def read_results(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Records of a results JSONL (a torn last line is ignored, and cut off when ``repair``)."""
    return read_jsonl(path, repair=repair)


def append_records(path: str | os.PathLike, records: Iterable[dict]) -> None:
    append_jsonl(path, records)


def check_resume(old: dict, new: dict) -> None:
    """Refuse to mix results made with different settings into one results file."""
    diffs = [f"{k}: {old.get(k)!r} in the earlier run, {new.get(k)!r} now"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError("--output_dir holds results made with other settings; use a new --output_dir or the "
                         "same flags. Differences:\n  " + "\n  ".join(diffs))

