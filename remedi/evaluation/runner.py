"""GSM8K / MATH-500 / arithmetic evaluation as a library: data, prompts, per-item seeds, records, reports.

The script ``eval_gsm_math.py`` parses flags and drives the loop; everything it needs to be testable
without a model lives here:

* datasets: ``openai/gsm8k`` (subset ``main``), ``HuggingFaceH4/MATH-500``, a local ``.jsonl``/``.json``
  (or a folder holding ``<split>.jsonl``), and ``arith``, the synthetic task of the embedded model;
* prompts: zero-shot chat (Instruct), few-shot "Question:/Answer:" text (Base), ``arith_prompt``;
* a per-item seed derived from (seed, item id), so results do not depend on batch size or GPU count;
* the per-item JSONL (appended line by line with fsync, a torn last line is cut off on resume);
* the summary: accuracy with a 95% Wilson interval, coverage, NFE, remasks per block, tokens/s, and
  paired tests (exact McNemar + paired bootstrap) between sources on the same items.

``datasets`` is imported only for hub datasets (the GPU image does not ship it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from remedi.evaluation.answer_check import FORMATS, check, extract_boxed, gold_gsm8k
from remedi.model.loading import EMBEDDED_MODEL, encode_prompt
from remedi.training.data import hub_records, read_records
from remedi.decoding.args import (MODEL_DEFAULTS_FILE, apply_model_defaults, explicit_flags,  # noqa: F401
                            model_sampling_defaults)
from remedi.evaluation.stats import mcnemar_exact, paired_bootstrap, wilson_interval

log = logging.getLogger(__name__)

ARITH = "arith"
ARITH_DATA_DIR = EMBEDDED_MODEL / "data"
EMBEDDED_UPS = EMBEDDED_MODEL / "ups_head.pt"
HUB_SUBSETS = {"openai/gsm8k": "main"}

INSTRUCTIONS = {
    "gsm8k": "Solve the problem step by step. At the end, write the final answer as a number after '####', "
             "for example '#### 42'.",
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
}


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One eval problem. ``gold`` is the final answer only; ``solution`` the worked answer (few-shot)."""

    id: str
    question: str
    gold: str
    solution: Optional[str] = None
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # "hub" | "file" | "arith"
    name: str  # hub id, or the file path
    fmt: str
    subset: Optional[str] = None
    split: str = "test"


def _infer_format(name: str) -> Optional[str]:
    low = name.lower()
    if "gsm" in low or ARITH in low:
        return "gsm8k"
    if "math" in low:
        return "math"
    return None


def _local_file(path: Path, split: str) -> Optional[Path]:
    if path.is_file():
        return path
    if path.is_dir():
        for ext in (".jsonl", ".json"):
            if (path / f"{split}{ext}").is_file():
                return path / f"{split}{ext}"
        raise FileNotFoundError(f"--dataset {path} is a folder without {split}.jsonl or {split}.json "
                                f"(--split {split}); found {sorted(p.name for p in path.iterdir())[:10]}")
    return None


def _first_row(path: Path) -> dict:
    """The first record of a .jsonl (one line read); {} for .json files or unreadable lines."""
    if path.suffix == ".json":
        return {}
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return {}
    return row if isinstance(row, dict) else {}


def _format_from_fields(row: dict) -> Optional[str]:
    if "problem" in row:
        return "math"
    if "question" in row and "answer" in row:
        return "gsm8k"
    return None


def resolve_dataset(dataset: Optional[str], subset: Optional[str] = None, split: str = "test",
                    fmt: Optional[str] = None) -> DatasetSpec:
    """Decide where items come from and which answer format applies (cheap: reads at most one line)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dataset in (None, "", ARITH):
        path = ARITH_DATA_DIR / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"the arithmetic task's {split} split {path} does not exist (the embedded model "
                                    "is not built yet?); pass --dataset openai/gsm8k or a local .jsonl")
        return DatasetSpec(ARITH, str(path), fmt or "gsm8k", None, split)
    local = _local_file(Path(dataset).expanduser(), split)
    if local is not None:
        row = _first_row(local)
        arith = local.resolve().parent == ARITH_DATA_DIR.resolve() or str(row.get("id", "")).startswith("arith-")
        kind = ARITH if arith else "file"
        guessed = fmt or _format_from_fields(row) or _infer_format(str(local))
        if guessed is None:
            raise ValueError(f"cannot tell the answer format of {local}: pass --format gsm8k or --format math")
        return DatasetSpec(kind, str(local), guessed, None, split)
    if dataset.count("/") != 1 or dataset.startswith((".", "/")) or dataset.endswith((".json", ".jsonl")):
        raise FileNotFoundError(f"--dataset {dataset!r} is neither an existing file/folder nor a hub id "
                                "like openai/gsm8k or HuggingFaceH4/MATH-500")
    guessed = fmt or _infer_format(dataset)
    if guessed is None:
        raise ValueError(f"cannot tell the answer format of {dataset}: pass --format gsm8k or --format math")
    return DatasetSpec("hub", dataset, guessed, subset or HUB_SUBSETS.get(dataset), split)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a local .jsonl / .json / .parquet file (the training data reader, one implementation)."""
    return read_records(Path(path))


def rows_to_items(rows: Sequence[dict], fmt: str, split: str, source: str) -> list[Item]:
    """Map raw rows to Items for ``fmt``; raises naming the fields found when the needed ones are absent."""
    if not rows:
        raise ValueError(f"{source} has no rows")
    found = sorted(rows[0].keys())
    qkey = next((k for k in (("question", "problem") if fmt == "gsm8k" else ("problem", "question"))
                 if k in rows[0]), None)
    akey = "answer" if "answer" in rows[0] else ("solution" if fmt == "math" and "solution" in rows[0] else None)
    if qkey is None or akey is None:
        need = "question + answer" if fmt == "gsm8k" else "problem + answer (or solution)"
        raise ValueError(f"{source} lacks the fields --format {fmt} needs ({need}); fields found: {found}")
    items, seen = [], set()
    for i, r in enumerate(rows):
        iid = str(r.get("id", r.get("unique_id", f"{split}-{i:05d}")))
        if iid in seen:
            raise ValueError(f"{source}: duplicate item id {iid!r} (row {i}); ids must be unique")
        seen.add(iid)
        if fmt == "gsm8k":
            gold, solution = gold_gsm8k(str(r[akey])), str(r[akey])
        else:
            solution = r.get("solution")
            gold = str(r["answer"]) if "answer" in r else (extract_boxed(str(solution)) or str(solution))
        extra = {k: v for k, v in r.items() if k in ("n_ops", "level", "subject", "type")}
        items.append(Item(iid, str(r[qkey]), gold, solution, extra))
    return items


def load_items(spec: DatasetSpec) -> list[Item]:
    if spec.kind == "hub":
        rows, src = hub_records(spec.name, spec.subset, spec.split), f"{spec.name} ({spec.subset}, {spec.split})"
    else:
        rows, src = read_rows(spec.name), spec.name
    return rows_to_items(rows, spec.fmt, spec.split, src)


def fewshot_source(spec: DatasetSpec, fewshot_file: Optional[str]) -> DatasetSpec:
    """Where few-shot exemplars come from: --fewshot_file, else the train split of the same dataset."""
    if fewshot_file:
        return resolve_dataset(fewshot_file, split="train", fmt=spec.fmt)
    if spec.kind == "hub":
        return DatasetSpec("hub", spec.name, spec.fmt, spec.subset, "train")
    sibling = Path(spec.name).with_name("train.jsonl")
    if sibling.is_file() and sibling.resolve() != Path(spec.name).resolve():
        return DatasetSpec(spec.kind, str(sibling), spec.fmt, None, "train")
    raise ValueError(f"--fewshot needs exemplars: {spec.name} has no train.jsonl beside it; pass --fewshot_file")


def fewshot_exemplars(items: Sequence[Item], n: int, exclude_ids: Iterable[str] = ()) -> list[Item]:
    """The first ``n`` items with a worked solution (fixed for every question, as in lm-eval)."""
    skip = set(exclude_ids)
    out = [it for it in items if it.solution and it.id not in skip][:n]
    if len(out) < n:
        raise ValueError(f"--fewshot {n}: only {len(out)} exemplars with a worked solution are available")
    return out


def select_items(items: Sequence[Item], start: int = 0, max_samples: Optional[int] = None,
                 shuffle: bool = False, seed: int = 0) -> tuple[list[Item], str]:
    """Deterministic selection: (optionally seed-shuffled) split order, then ``[start, start+max_samples)``.

    Returns the items and a note (empty unless ``max_samples`` overshoots the split).
    """
    if start < 0:
        raise ValueError(f"--start {start} must be >= 0")
    order = list(items)
    if shuffle:
        random.Random(f"eval-order:{seed}").shuffle(order)
    if start >= len(order):
        raise ValueError(f"--start {start} is past the end of the split ({len(order)} items)")
    end = len(order) if max_samples is None or max_samples < 0 else start + max_samples
    note = ""
    if end > len(order):
        note = (f"--max_samples {max_samples} from --start {start} exceeds the split ({len(order)} items); "
                f"running the {len(order) - start} that exist")
        end = len(order)
    return order[start:end], note


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def arith_prompt(question: str) -> str:
    """The prompt the embedded arithmetic model is trained on: the bare question.

    Training (remedi.training.data, plain format) encodes the question and the answer separately and
    concatenates the ids, so the answer's first token follows the question's last one directly.
    """
    return question


def prompt_style(spec: DatasetSpec, chat: bool) -> str:
    """plain | chat for real datasets; arith | arith_chat (the bare question as the user message) for arith."""
    if spec.kind == ARITH:
        return "arith_chat" if chat else ARITH
    return "chat" if chat else "plain"


def build_prompt(question: str, fmt: str, style: str, exemplars: Sequence[Item] = ()) -> str:
    """The text given to the tokenizer (for chat: the user message, before the chat template)."""
    shots = "".join(f"Question: {ex.question}\nAnswer: {ex.solution}\n\n" for ex in exemplars)
    if style == ARITH:
        return "".join(arith_prompt(ex.question) + f"{ex.solution}\n\n" for ex in exemplars) + arith_prompt(question)
    if style == "arith_chat":
        return "".join(arith_prompt(ex.question) + f"{ex.solution}\n\n" for ex in exemplars) + question
    if style == "chat":
        return f"{shots}{question}\n{INSTRUCTIONS[fmt]}"
    if style == "plain":
        return f"{shots}Question: {question}\nAnswer:"
    raise ValueError(f"unknown prompt style {style!r}")


def encode(tokenizer, text: str, style: str) -> tuple[list[int], str]:
    """Token ids and the exact text the model sees (chat template applied when style is chat)."""
    chat = style.endswith("chat")
    ids = encode_prompt(tokenizer, text, chat=chat)
    shown = text
    if chat:
        shown = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False)
    return ids, shown


# --------------------------------------------------------------------------------------------------
# Seeds and generation
# --------------------------------------------------------------------------------------------------


def item_seed(seed: int, item_id: str) -> int:
    """A 63-bit seed from (run seed, item id): stable across processes, batch sizes and GPU counts."""
    digest = hashlib.sha256(f"{int(seed)}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def item_generator(seed: int, item_id: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(item_seed(seed, item_id))


def sampler_config(sampling, strategy: str, steps: int):
    """The sampler's config for one (strategy, steps) from the shared SamplingArgs."""
    cfg = sampling.to_sampler_config(strategy)
    return dataclasses.replace(cfg, steps=int(steps))


def _generate(model, prompts, cfg, ids, generators):
    from remedi.decoding.sampler import generate  # lazy: tests swap this function for a fake

    return generate(model, prompts, cfg, ids, generators=generators)


def run_batch(model, tokenizer, ids, items: Sequence[Item], prompt_ids: Sequence[list[int]],
              prompt_texts: Sequence[str], source: str, steps: int, sampling, fmt: str, seed: int,
              device) -> list[dict]:
    """Generate for one batch of items with one source and step count; returns finished records."""
    cfg = sampler_config(sampling, source, steps)
    gens = [item_generator(seed, it.id, device) for it in items]
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = _generate(model, [list(p) for p in prompt_ids], cfg, ids, gens)
    wall = time.perf_counter() - t0
    records = []
    for it, text, out in zip(items, prompt_texts, outs):
        completion = tokenizer.decode(out.tokens, skip_special_tokens=True)
        records.append(make_record(it, source, steps, text, completion, fmt, nfe=out.nfe, remasks=out.remasks,
                                   remasks_per_block=list(out.remasks_per_block), seconds=wall / len(items),
                                   gen_tokens=len(out.tokens)))
    return records


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


# --------------------------------------------------------------------------------------------------
# The per-item results file
# --------------------------------------------------------------------------------------------------


def record_key(r: dict) -> tuple:
    return (str(r["id"]), r.get("source", "model"), r.get("steps"))


def read_results(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Records of a results JSONL. A torn last line (a run killed mid-write) is ignored, and cut off the
    file when ``repair`` so appends start on a clean line; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, keep = [], 0  # keep: bytes of the file that hold complete, valid lines
    for n, line in enumerate(lines):
        last = n == len(lines) - 1
        if line.strip():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise json.JSONDecodeError("not an object", line.decode(errors="replace"), 0)
                records.append(rec)
            except json.JSONDecodeError:
                if not last:
                    raise ValueError(f"{path}: line {n + 1} is not valid JSON; fix or remove it "
                                     "(only a torn last line is repaired automatically)") from None
                log.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted run", path, len(line))
                break
        keep += len(line) + (0 if last else 1)
    if repair and data and (keep != len(data) or not data.endswith(b"\n")):
        with open(path, "r+b") as f:
            f.truncate(keep)
            if keep and not data[:keep].endswith(b"\n"):
                f.seek(keep)
                f.write(b"\n")
            os.fsync(f.fileno())
    return records


def append_records(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append complete lines and fsync, so a kill loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# Run configuration: model-folder defaults and resume checks
# --------------------------------------------------------------------------------------------------


def check_resume(old: dict, new: dict) -> None:
    """Refuse to mix results made with different settings into one results file."""
    diffs = [f"{k}: {old.get(k)!r} in the earlier run, {new.get(k)!r} now"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError("--output_dir holds results made with other settings; use a new --output_dir or the "
                         "same flags. Differences:\n  " + "\n  ".join(diffs))


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Per (source, steps): accuracy + Wilson 95% CI, coverage, NFE, remasks/block, tokens/s; and for every
    pair of sources at the same steps, McNemar exact + paired bootstrap on the items both have."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r.get("source", "model"), r.get("steps")), {})[str(r["id"])] = r
    many_steps = len({k[1] for k in groups}) > 1
    rows = []
    for (src, steps), by_id in groups.items():
        recs = list(by_id.values())
        n, k = len(recs), sum(bool(r["correct"]) for r in recs)
        lo, hi = wilson_interval(k, n)
        blocks = sum(len(r.get("remasks_per_block") or []) for r in recs)
        secs = sum(r.get("seconds") or 0.0 for r in recs)
        toks = sum(r.get("gen_tokens") or 0 for r in recs)
        rows.append({
            "label": f"{src}@{steps}" if many_steps else src, "source": src, "steps": steps, "n": n,
            "correct": k, "accuracy": k / n, "ci_lo": lo, "ci_hi": hi,
            "coverage": sum(r.get("extracted") is not None for r in recs) / n,
            "mean_nfe": _mean([r.get("nfe") for r in recs]),
            "remasks_per_block": (sum(r.get("remasks") or 0 for r in recs) / blocks) if blocks else None,
            "tokens_per_s": toks / secs if secs > 0 else None,
            "mean_gen_tokens": _mean([r.get("gen_tokens") for r in recs]),
        })
    rows.sort(key=lambda g: (g["steps"] is None, g["steps"] or 0))  # stable: sources keep their run order
    pairs = []
    for a, b in combinations(rows, 2):
        if a["steps"] != b["steps"]:
            continue
        ra, rb = groups[(a["source"], a["steps"])], groups[(b["source"], b["steps"])]
        common = sorted(set(ra) & set(rb))
        if not common:
            continue
        ca = [bool(ra[i]["correct"]) for i in common]
        cb = [bool(rb[i]["correct"]) for i in common]
        mc, bs = mcnemar_exact(ca, cb), paired_bootstrap(ca, cb, n_boot=n_boot, seed=seed)
        pairs.append({"a": a["label"], "b": b["label"], "steps": a["steps"], "n": len(common),
                      "acc_a": sum(ca) / len(common), "acc_b": sum(cb) / len(common), "diff": bs["diff"],
                      "diff_lo": bs["lo"], "diff_hi": bs["hi"], **mc})
    return {"groups": rows, "pairs": pairs, "n_records": len(records)}


def _f(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def render_markdown(summary: dict, title: str = "") -> str:
    lines = [f"## {title}", ""] if title else []
    lines += ["| source | n | accuracy | 95% CI | coverage | mean NFE | remasks/block | tok/s |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for g in summary["groups"]:
        lines.append(f"| {g['label']} | {g['n']} | {g['accuracy']:.3f} | [{g['ci_lo']:.3f}, {g['ci_hi']:.3f}] | "
                     f"{g['coverage']:.3f} | {_f(g['mean_nfe'], '.1f')} | {_f(g['remasks_per_block'], '.2f')} | "
                     f"{_f(g['tokens_per_s'], '.1f')} |")
    if summary["pairs"]:
        lines += ["", "Paired comparisons on the same items (a - b; McNemar exact test, paired bootstrap 95% CI):",
                  "", "| a | b | n | acc a | acc b | diff | bootstrap 95% CI | a only | b only | McNemar p |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for p in summary["pairs"]:
            lines.append(f"| {p['a']} | {p['b']} | {p['n']} | {p['acc_a']:.3f} | {p['acc_b']:.3f} | "
                         f"{p['diff']:+.3f} | [{p['diff_lo']:+.3f}, {p['diff_hi']:+.3f}] | {p['b10']} | {p['b01']} | "
                         f"{p['p_value']:.3g} |")
    return "\n".join(lines) + "\n"
