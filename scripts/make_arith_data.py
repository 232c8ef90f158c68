"""Write the synthetic arithmetic splits (jsonl) and train the tiny tokenizer on the train split.

Why a script: the embedded default LLaDA model is trained on this data, so the exact files must be
reproducible from a seed. Usage (from the repo root)::

    python scripts/make_arith_data.py --out_dir data/arith --tokenizer_dir data/arith/tokenizer

Prints a JSON summary (timings, n_ops counts, token-length statistics) on stdout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

from remedi.tasks.arith import item_text, make_splits, save_tokenizer, train_tokenizer  # noqa: E402


def _write_jsonl_atomic(path: Path, items: list[dict]) -> None:
    """Write to a temp file in the same directory, then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _percentile(sorted_vals: list[int], q: float) -> int:
    """Nearest-rank percentile (no numpy needed)."""
    if not sorted_vals:
        return 0
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def _length_stats(tok, items: list[dict]) -> dict:
    """Token lengths of question, answer, their sum, and the full chat-formatted SFT sequence.

    ``chat_total`` = chat prompt (BOS + headers) + answer + one EOS: what must fit in the context.
    """
    qs = [it["question"] for it in items]
    ans = [it["answer"] for it in items]
    backend = tok.backend_tokenizer  # same ids as tok(...), ~2x faster on 200k texts

    def lengths(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]

    q_len, a_len = lengths(qs), lengths(ans)
    # Render the template once around a sentinel (Jinja per item is the slow part); exact because
    # questions carry no surrounding whitespace for the template's trim to remove.
    sentinel = "\x00QUESTION\x00"
    head, tail = tok.apply_chat_template(
        [{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True
    ).split(sentinel)
    prompts = [head + q + tail for q in qs]
    p_len = lengths(prompts)
    out = {}
    for name, vals in (
        ("question", q_len),
        ("answer", a_len),
        ("question_plus_answer", [q + a for q, a in zip(q_len, a_len)]),
        ("chat_total", [p + a + 1 for p, a in zip(p_len, a_len)]),
    ):
        s = sorted(vals)
        out[name] = {
            "mean": round(sum(s) / len(s), 2),
            "p50": _percentile(s, 50),
            "p99": _percentile(s, 99),
            "max": s[-1],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out_dir", default="data/arith")
    ap.add_argument("--tokenizer_dir", default=None, help="default: <out_dir>/tokenizer")
    ap.add_argument("--n_train", type=int, default=200_000)
    ap.add_argument("--n_val", type=int, default=1_000)
    ap.add_argument("--n_test", type=int, default=3_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab_size", type=int, default=1024)
    args = ap.parse_args(argv)

    out_dir = Path(args.out_dir)
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else out_dir / "tokenizer"
    timings = {}

    t0 = time.perf_counter()
    splits = make_splits(args.n_train, args.n_val, args.n_test, seed=args.seed)
    timings["generate_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    for name, items in splits.items():
        _write_jsonl_atomic(out_dir / f"{name}.jsonl", items)
    timings["write_jsonl_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    tok = train_tokenizer((item_text(it) for it in splits["train"]), vocab_size=args.vocab_size)
    save_tokenizer(tok, tok_dir)
    timings["tokenizer_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    stats = {name: _length_stats(tok, items) for name, items in splits.items()}
    timings["length_stats_s"] = round(time.perf_counter() - t0, 2)

    summary = {
        "out_dir": str(out_dir),
        "tokenizer_dir": str(tok_dir),
        "seed": args.seed,
        "sizes": {k: len(v) for k, v in splits.items()},
        "n_ops": {k: dict(sorted(Counter(it["n_ops"] for it in v).items())) for k, v in splits.items()},
        "vocab_size": len(tok),
        "token_lengths": stats,
        "timings": timings,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
