"""Plots of an eval summary (:func:`remedi.evaluation.report.summarize` output): accuracy per source, accuracy against NFE.

matplotlib is imported lazily with the Agg backend, so this works on headless machines and importing the
module costs nothing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from remedi.files import atomic_path


def no_paths(text: str) -> str:
    """A title without machine paths: every absolute or home-relative path becomes its last component."""
    import re

    return re.sub(r"(?<!\S)[~/][^\s,;:()]*", lambda m: Path(m.group().rstrip("/")).name or m.group(), text)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


def _zoom(lo: float, hi: float, pad: float = 0.08) -> tuple[float, float]:
    """A y-range around the intervals (not 0-1), so 0.40 against 0.48 is visible; clipped to [0, 1]."""
    span = max(hi - lo, 0.05)
    return max(0.0, lo - pad * 4 * span), min(1.0 + 0.1 * span, hi + pad * 4 * span)


def run_title(summary: dict, title: str = "", model: Optional[str] = None) -> str:
    """Two lines: what was evaluated, then the model, the step count(s) and the mean NFE range."""
    groups = summary["groups"]
    steps = sorted({g["steps"] for g in groups if g["steps"] is not None})
    nfe = [g["mean_nfe"] for g in groups if g.get("mean_nfe") is not None]
    facts = [f"model {model}" if model else "",
             f"{', '.join(map(str, steps))} steps" if steps else "",
             (f"mean NFE {min(nfe):.1f}" + (f"\u2013{max(nfe):.1f}" if max(nfe) - min(nfe) >= 0.05 else "")) if nfe
             else ""]
    return no_paths("\n".join(x for x in (title, "; ".join(f for f in facts if f)) if x))


def plot_accuracy(summary: dict, path: str | os.PathLike, title: str = "", model: Optional[str] = None) -> Path:
    """Left: accuracy per (source, steps) with its 95% Wilson interval. Right: each source's paired difference
    from the best training-free source at the first step count (same items; bootstrap 95% interval, McNemar p),
    which shows what the overlapping Wilson intervals hide. The title names the model, steps and NFE."""
    from remedi.evaluation.report import best_heuristic, differences_vs

    plt = _pyplot()
    groups = summary["groups"]
    labels = [g["label"] for g in groups]
    acc = [g["accuracy"] for g in groups]
    err = [[g["accuracy"] - g["ci_lo"] for g in groups], [g["ci_hi"] - g["accuracy"] for g in groups]]
    first_steps = groups[0]["steps"] if groups else None
    ref = best_heuristic(summary, first_steps)
    diffs = differences_vs(summary, ref) if ref is not None else []
    width = max(4.0, 1.0 + 0.9 * len(groups))
    if diffs:
        fig, (ax, dx) = plt.subplots(1, 2, figsize=(width + 1.0 + 0.9 * len(diffs), 4.0),
                                     gridspec_kw=dict(width_ratios=[len(groups), max(2, len(diffs))]),
                                     layout="constrained")
    else:
        fig, ax = plt.subplots(figsize=(width, 3.8), layout="constrained")
    lo, hi = _zoom(min(g["ci_lo"] for g in groups), max(g["ci_hi"] for g in groups))
    ax.errorbar(range(len(groups)), acc, yerr=err, fmt="o", capsize=5, color="#4C72B0", markersize=6)
    for i, g in enumerate(groups):
        ax.text(i + 0.08, g["accuracy"], f"{g['accuracy']:.3f}", va="center", fontsize=8)
    ax.set_xticks(range(len(groups)), labels, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(groups) - 0.3)
    ax.set_ylim(lo, hi)
    ax.grid(axis="y", alpha=0.3)
    n = sorted({g["n"] for g in groups})
    ax.set_ylabel(f"{summary.get('metric', 'accuracy')}, 95% Wilson CI (n = {', '.join(map(str, n))})")
    ax.set_title("accuracy per source", fontsize=10)
    if diffs:
        x = range(len(diffs))
        colours = ["#C44E52" if d["hi"] < 0 else "#55A868" if d["lo"] > 0 else "#7F7F7F" for d in diffs]
        for i, d in enumerate(diffs):
            dx.errorbar([i], [d["diff"]], yerr=[[d["diff"] - d["lo"]], [d["hi"] - d["diff"]]], fmt="o", capsize=5,
                        color=colours[i], markersize=6)
            dx.annotate(f"{d['diff']:+.3f}\np = {d['p_value']:.2g}", (i, d["hi"]), xytext=(0, 4),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7.5)
        dx.axhline(0, color="black", linewidth=0.8)
        dx.set_xticks(list(x), [d["label"] for d in diffs], rotation=30, ha="right")
        dx.set_xlim(-0.6, len(diffs) - 0.4)
        span = max(max(d["hi"] for d in diffs), 0) - min(min(d["lo"] for d in diffs), 0)
        dx.set_ylim(min(min(d["lo"] for d in diffs), 0) - 0.1 * span, max(max(d["hi"] for d in diffs), 0) + 0.3 * span)
        dx.grid(axis="y", alpha=0.3)
        dx.set_ylabel(f"minus {ref['label']} (paired, bootstrap 95% CI)")
        dx.set_title(f"paired difference from {ref['label']}\n(the best training-free source)", fontsize=10)
    fig.suptitle(run_title(summary, title or "accuracy per source", model), fontsize=11)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def has_steps_sweep(summary: dict) -> bool:
    return len({g["steps"] for g in summary["groups"] if g["steps"] is not None}) > 1


def plot_accuracy_vs_nfe(summary: dict, path: str | os.PathLike, title: str = "",
                         model: Optional[str] = None) -> Optional[Path]:
    """One line per source: accuracy (with Wilson interval) against the step count, y zoomed to the data.

    Returns None (and writes nothing) when the results hold a single step count."""
    if not has_steps_sweep(summary):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sources = list(dict.fromkeys(g["source"] for g in summary["groups"]))  # run order
    for i, src in enumerate(sources):
        pts = sorted((g for g in summary["groups"] if g["source"] == src and g["steps"] is not None),
                     key=lambda g: g["steps"])
        dodge = 1.0 + 0.012 * (i - (len(sources) - 1) / 2)  # sources with equal accuracy stay visible
        x = [dodge * g["steps"] for g in pts]
        ax.errorbar(x, [g["accuracy"] for g in pts], capsize=3, marker="o", label=src,
                    yerr=[[g["accuracy"] - g["ci_lo"] for g in pts], [g["ci_hi"] - g["accuracy"] for g in pts]])
    steps = sorted({g["steps"] for g in summary["groups"] if g["steps"] is not None})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(x) for x in steps])
    ax.xaxis.set_minor_locator(plt.matplotlib.ticker.NullLocator())
    ax.set_xlabel("denoising steps (points dodged sideways; NFE = steps, fewer with EOS gating)", fontsize=8)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    rows = [g for g in summary["groups"] if g["steps"] is not None]
    ax.set_ylim(*_zoom(min(g["ci_lo"] for g in rows), max(g["ci_hi"] for g in rows)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(run_title(summary, title or "accuracy vs steps", model), fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
