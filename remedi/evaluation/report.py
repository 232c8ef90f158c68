"""Summaries of an eval run: accuracy with 95% Wilson intervals, NFE, remasks per block, tokens/s, and
paired tests (exact McNemar, paired bootstrap) between every two sources on the items both ran.

For code runs (records with a sandbox ``status``) accuracy is pass@1 (one greedy sample per problem) and
each group also counts the statuses (passed / failed / timeout / memory / error)."""
from __future__ import annotations

from itertools import combinations
from typing import Optional, Sequence

from remedi.evaluation.stats import mcnemar_exact, paired_bootstrap, wilson_interval


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
            **({"status": _count(r.get("status") for r in recs)} if any("status" in r for r in recs) else {}),
            **({"pass_at_k": pass_at_k_table(recs)} if _samples(recs) else {}),
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
    code = bool(records) and all("status" in r for r in records)
    return {"groups": rows, "pairs": pairs, "n_records": len(records), "metric": "pass@1" if code else "accuracy"}


LEARNED = ("ups",)
"""Sources that are learned; every other source is a training-free heuristic."""


def best_heuristic(summary: dict, steps=None) -> Optional[dict]:
    """The group of the most accurate training-free source at ``steps`` (the reference of the paired plot)."""
    rows = [g for g in summary["groups"] if g["source"] not in LEARNED and g["steps"] == steps]
    return max(rows, key=lambda g: g["accuracy"]) if rows else None


def differences_vs(summary: dict, ref: dict) -> list[dict]:
    """Every other group at ref's step count against ``ref``: {label, diff = acc(group) - acc(ref), bootstrap 95%
    CI, McNemar p, n}, on the items both ran (the paired comparison, oriented group minus reference)."""
    out = []
    for p in summary["pairs"]:
        if p["steps"] != ref["steps"] or ref["label"] not in (p["a"], p["b"]):
            continue
        if p["a"] == ref["label"]:
            other, d, lo, hi = p["b"], -p["diff"], -p["diff_hi"], -p["diff_lo"]
        else:
            other, d, lo, hi = p["a"], p["diff"], p["diff_lo"], p["diff_hi"]
        out.append({"label": other, "diff": d, "lo": lo, "hi": hi, "p_value": p["p_value"], "n": p["n"]})
    order = [g["label"] for g in summary["groups"]]
    return sorted(out, key=lambda x: order.index(x["label"]))


def _samples(recs) -> Optional[dict]:
    """{base item id: [correct, ...]} when every id is '<id>#<k>' (eval --n_samples > 1), else None."""
    by_item: dict = {}
    for r in recs:
        base, sep, k = str(r["id"]).rpartition("#")
        if not sep or not k.isdigit():
            return None
        by_item.setdefault(base, []).append(bool(r["correct"]))
    return by_item if any(len(v) > 1 for v in by_item.values()) else None


def pass_at_k_table(recs) -> dict:
    """pass@k (unbiased estimator, averaged over items) for k = 1, 2, 4, ... up to the fewest samples."""
    from remedi.sandbox import pass_at_k

    by_item = _samples(recs)
    n_min = min(len(v) for v in by_item.values())
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n_min]
    return {str(k): sum(pass_at_k(len(v), sum(v), k) for v in by_item.values()) / len(by_item) for k in ks}


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def _f(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _pass_at_k_lines(summary: dict) -> list[str]:
    rows = [g for g in summary["groups"] if g.get("pass_at_k")]
    if not rows:
        return []
    ks = list(rows[0]["pass_at_k"])
    out = ["", "pass@k over the samples of each item (unbiased estimator):", "",
           "| source | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    out += [f"| {g['label']} | " + " | ".join(f"{g['pass_at_k'].get(k, float('nan')):.3f}" for k in ks) + " |"
            for g in rows]
    return out


def render_markdown(summary: dict, title: str = "") -> str:
    lines = [f"## {title}", ""] if title else []
    metric = summary.get("metric", "accuracy")
    lines += [f"| source | n | {metric} | 95% CI | coverage | mean NFE | remasks/block | wall-clock tok/s |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for g in summary["groups"]:
        lines.append(f"| {g['label']} | {g['n']} | {g['accuracy']:.3f} | [{g['ci_lo']:.3f}, {g['ci_hi']:.3f}] | "
                     f"{g['coverage']:.3f} | {_f(g['mean_nfe'], '.1f')} | {_f(g['remasks_per_block'], '.2f')} | "
                     f"{_f(g['tokens_per_s'], '.1f')} |")
    lines += ["", "wall-clock tok/s: generated tokens per second of wall time in this run, on this machine; it moves "
              "with machine load and batch size, so it is no property of a source (compare mean NFE instead)."]
    if any("status" in g for g in summary["groups"]):
        lines += ["", "Sandbox outcomes: " + "; ".join(
            f"{g['label']}: " + ", ".join(f"{k} {v}" for k, v in g.get("status", {}).items())
            for g in summary["groups"])]
    lines += _pass_at_k_lines(summary)
    if summary["pairs"]:
        lines += ["", "Paired comparisons on the same items (a - b; McNemar exact test, paired bootstrap 95% CI):",
                  "", "| a | b | n | acc a | acc b | diff | bootstrap 95% CI | a only | b only | McNemar p |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for p in summary["pairs"]:
            lines.append(f"| {p['a']} | {p['b']} | {p['n']} | {p['acc_a']:.3f} | {p['acc_b']:.3f} | "
                         f"{p['diff']:+.3f} | [{p['diff_lo']:+.3f}, {p['diff_hi']:+.3f}] | {p['b10']} | {p['b01']} | "
                         f"{p['p_value']:.3g} |")
    return "\n".join(lines) + "\n"
