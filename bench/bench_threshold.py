"""Accuracy against NFE: parallel threshold decoding versus the step-count schedule, on a trained model.

    python bench/bench_threshold.py --out bench/results/threshold          # embedded model, arith test split
    python bench/bench_threshold.py --model_name DIR --dataset data.jsonl --n_items 2 --out /tmp/t  # smoke

For every source (default: llada_low_confidence, plus ups when the model has a UPS) the same items are
decoded with the step schedule at several step counts (``--steps_list``) and with threshold decoding at
several thresholds (``--thresholds``; ``--remask_threshold`` adds the UPS-style remasking for the remask
sources). Each point is (mean NFE per item, accuracy with a 95% Wilson interval, seconds per item).
"Speed-up at equal accuracy" of a threshold point = the NFE of the cheapest schedule point that is at
least as accurate, divided by the threshold point's NFE (None when no schedule point is as accurate).

Writes ``accuracy_vs_nfe.png`` and ``threshold.json`` into ``--out`` and prints a table. Items, prompts
and answer checks are remedi.evaluation.runner's (the arithmetic task by default, per-item seeds), so the numbers
line up with eval_gsm_math.py runs at the same settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remedi.evaluation import data as ge  # noqa: E402
from remedi.session import default_ups_head, item_generator  # noqa: E402
from remedi.tasks.answer_check import check  # noqa: E402
from remedi.files import atomic_path, write_json_atomic  # noqa: E402
from remedi.model.checkpoint import versions  # noqa: E402
from remedi.model.loading import EMBEDDED_MODEL, load_for_inference  # noqa: E402
from remedi.decoding.sampler import generate  # noqa: E402
from remedi.decoding.args import SamplingArgs  # noqa: E402
from remedi.evaluation.stats import wilson_interval  # noqa: E402


def _csv(s: str, typ):
    return [typ(x) for x in s.split(",") if x.strip()]


def evaluate(loaded, items, prompts, scfg, fmt: str, seed: int, batch_size: int, device) -> dict:
    """Decode every item with one sampler config: accuracy, Wilson interval, mean NFE, seconds per item."""
    correct, nfe, secs = [], [], 0.0
    for lo in range(0, len(items), batch_size):
        its = items[lo:lo + batch_size]
        gens = [item_generator(seed, it.id, device) for it in its]
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = generate(loaded.model, [prompts[it.id] for it in its], scfg, loaded.ids, gens)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        secs += time.perf_counter() - t
        for it, out in zip(its, outs):
            text = loaded.tokenizer.decode(out.tokens, skip_special_tokens=True)
            correct.append(bool(check(text, it.gold, fmt).correct))
            nfe.append(out.nfe)
    n, k = len(correct), sum(correct)
    lo_ci, hi_ci = wilson_interval(k, n)
    return {"n": n, "correct": k, "accuracy": k / n, "ci_lo": lo_ci, "ci_hi": hi_ci, "nfe": sum(nfe) / n,
            "seconds_per_item": secs / n}


def speedups(points: list[dict]) -> None:
    """Fill ``speedup_equal_acc`` of each threshold point from the schedule points of its source."""
    for p in points:
        if p["kind"] != "threshold":
            continue
        ok = [q["nfe"] for q in points if q["kind"] == "steps" and q["source"] == p["source"]
              and q["accuracy"] >= p["accuracy"]]
        p["speedup_equal_acc"] = round(min(ok) / p["nfe"], 2) if ok else None


def plot(points: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, src in enumerate(dict.fromkeys(p["source"] for p in points)):
        color = f"C{i}"
        for kind, marker, style in (("steps", "o", "-"), ("threshold", "s", "--")):
            ps = sorted((p for p in points if p["source"] == src and p["kind"] == kind), key=lambda p: p["nfe"])
            if not ps:
                continue
            x, y = [p["nfe"] for p in ps], [p["accuracy"] for p in ps]
            err = [[p["accuracy"] - p["ci_lo"] for p in ps], [p["ci_hi"] - p["accuracy"] for p in ps]]
            ax.errorbar(x, y, yerr=err, marker=marker, linestyle=style, color=color, capsize=3,
                        label=f"{src} ({'step schedule' if kind == 'steps' else 'threshold'})")
            for p in ps:
                ax.annotate(f"{p['steps']}" if kind == "steps" else f"{p['threshold']:g}", (p["nfe"], p["accuracy"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("NFE per item (forward passes)")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default=str(EMBEDDED_MODEL))
    ap.add_argument("--ups_head", default=None, help="default: the embedded model's ups_head.pt if present")
    ap.add_argument("--dataset", default=None, help="as eval_gsm_math.py --dataset (default: the arithmetic task)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--format", default=None)
    ap.add_argument("--n_items", type=int, default=200)
    ap.add_argument("--sources", default=None, help="default llada_low_confidence, plus ups with a UPS")
    ap.add_argument("--steps_list", default=None, help="schedule step counts (default: gen_length / 8, 4, 2, 1)")
    ap.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99")
    ap.add_argument("--remask_threshold", type=float, default=None,
                    help="also remask below this in threshold mode (remask sources only)")
    ap.add_argument("--gen_length", type=int, default=None, help="default: the model's defaults.json, else "
                    "the sampler's")
    ap.add_argument("--block_length", type=int, default=None)
    ap.add_argument("--cache", default="none")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/threshold")
    args = ap.parse_args(argv)

    ups_head = args.ups_head
    embedded = Path(args.model_name).resolve() == EMBEDDED_MODEL.resolve()
    if ups_head is None and embedded:
        ups_head = default_ups_head(args.model_name)
    s = SamplingArgs().resolve(args.model_name)
    for k in ("gen_length", "block_length", "cache"):
        if getattr(args, k) is not None:
            setattr(s, k, getattr(args, k))
    s.threshold = s.remask_threshold = None
    spec = ge.resolve_dataset(args.dataset, None, args.split, args.format)
    items, _ = ge.select_items(ge.load_items(spec), 0, args.n_items)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_for_inference(args.model_name, ups_head, None, device=device, dtype=args.dtype)
    style = ge.prompt_style(spec, args.chat)
    prompts = {it.id: ge.encode(loaded.tokenizer, ge.build_prompt(it.question, spec.fmt, style), style)[0]
               for it in items}
    sources = _csv(args.sources, str) if args.sources else \
        ["llada_low_confidence"] + (["ups"] if loaded.model.ups_arch else [])
    nb = s.gen_length // s.block_length
    steps_list = _csv(args.steps_list, int) if args.steps_list else \
        sorted({max(nb, (s.gen_length // d) // nb * nb) for d in (8, 4, 2, 1)})
    thresholds = _csv(args.thresholds, float)
    points = []
    t0 = time.perf_counter()
    for src in sources:
        for st in steps_list:
            cfg = dataclasses.replace(s.to_sampler_config(src), steps=st)
            points.append({"source": src, "kind": "steps", "steps": st, "threshold": None,
                           **evaluate(loaded, items, prompts, cfg, spec.fmt, args.seed, args.batch_size, device)})
            print(points[-1], flush=True)
        for thr in thresholds:
            rthr = args.remask_threshold if args.remask_threshold is not None and args.remask_threshold <= thr else None
            cfg = dataclasses.replace(s.to_sampler_config(src), threshold=thr, remask_threshold=rthr)
            points.append({"source": src, "kind": "threshold", "steps": None, "threshold": thr,
                           "remask_threshold": rthr,
                           **evaluate(loaded, items, prompts, cfg, spec.fmt, args.seed, args.batch_size, device)})
            print(points[-1], flush=True)
    speedups(points)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(args.model_name).name}: {spec.name if spec.kind != ge.ARITH else 'arith'} ({len(items)} items), " \
            f"gen {s.gen_length}, block {s.block_length}, cache {s.cache}"
    png = plot(points, out / "accuracy_vs_nfe.png", title)
    cols = ["source", "kind", "steps", "threshold", "nfe", "accuracy", "ci_lo", "ci_hi", "seconds_per_item",
            "speedup_equal_acc"]
    print("  ".join(cols))
    for p in points:
        print("  ".join(f"{p.get(c):.3f}" if isinstance(p.get(c), float) else str(p.get(c)) for c in cols))
    record = {"bench": "threshold", "model_name": args.model_name, "ups_head": ups_head, "dataset": spec.name,
              "split": spec.split, "n_items": len(items), "device": str(device),
              "card": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else "cpu",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "sampling": dataclasses.asdict(s), "args": vars(args), "points": points,
              "seconds": round(time.perf_counter() - t0, 1), "versions": versions(), "plot": str(png)}
    write_json_atomic(out / "threshold.json", record)
    print(f"wrote {out / 'threshold.json'} and {png}")
    return record


if __name__ == "__main__":
    main()
