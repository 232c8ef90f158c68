"""The per-item results file of an eval run: one JSON line per finished (item, source, steps).

Lines are appended with fsync (:func:`remedi.files.append_jsonl`), a torn last line is cut off on resume,
and a rerun with other settings into the same folder is refused (:func:`check_resume`).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

from remedi.evaluation.data import Item
from remedi.files import append_jsonl, read_jsonl
from remedi.tasks.answer_check import check


def make_record(item: Item, source: str, steps: Optional[int], prompt: str, completion: str, fmt: str,
                **stats: Any) -> dict:
    v = check(completion, item.gold, fmt)
    return {"id": item.id, "source": source, "steps": steps, "prompt": prompt, "gold": item.gold,
            "completion": completion, "extracted": v.extracted, "correct": bool(v.correct),
            "string_match": v.string_match, "note": v.note, **stats, **({"meta": item.extra} if item.extra else {})}


def rescore_records(records: Sequence[dict], fmt: str) -> list[dict]:
    """Re-check stored completions with the current checker (no model): new extracted/correct/note."""
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

