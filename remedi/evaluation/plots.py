"""Plots of an eval summary (:func:`remedi.evaluation.report.summarize` output): accuracy per source, accuracy against NFE.

matplotlib is imported lazily with the Agg backend, so this works on headless machines and importing the
module costs nothing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from remedi.files import atomic_path


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


def plot_accuracy(summary: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Bar chart: accuracy per (source, steps) with its 95% Wilson interval as error bars."""
    plt = _pyplot()
    groups = summary["groups"]
    labels = [g["label"] for g in groups]
    acc = [g["accuracy"] for g in groups]
    err = [[g["accuracy"] - g["ci_lo"] for g in groups], [g["ci_hi"] - g["accuracy"] for g in groups]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(groups)), 3.6))
    lo, hi = _zoom(min(g["ci_lo"] for g in groups), max(g["ci_hi"] for g in groups))
    ax.errorbar(range(len(groups)), acc, yerr=err, fmt="o", capsize=5, color="#4C72B0", markersize=6)
    for i, g in enumerate(groups):
        ax.text(i + 0.08, g["accuracy"], f"{g['accuracy']:.3f}", va="center", fontsize=8)
    ax.set_xticks(range(len(groups)), labels, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(groups) - 0.3)
    ax.set_ylim(lo, hi)
    ax.grid(axis="y", alpha=0.3)
    n = sorted({g["n"] for g in groups})
    ax.set_ylabel(f"accuracy, 95% Wilson CI (n = {', '.join(map(str, n))})")
    ax.set_title(title or "accuracy per source")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def has_steps_sweep(summary: dict) -> bool:
    return len({g["steps"] for g in summary["groups"] if g["steps"] is not None}) > 1


def plot_accuracy_vs_nfe(summary: dict, path: str | os.PathLike, title: str = "") -> Optional[Path]:
    """One line per source: accuracy (with Wilson band) against mean NFE across the step counts run.

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
        x = [dodge * (g["mean_nfe"] if g["mean_nfe"] is not None else g["steps"]) for g in pts]
        ax.errorbar(x, [g["accuracy"] for g in pts], capsize=3, marker="o", label=src,
                    yerr=[[g["accuracy"] - g["ci_lo"] for g in pts], [g["ci_hi"] - g["accuracy"] for g in pts]])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("mean NFE (model forward passes per item; points dodged sideways)")
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(title or "accuracy vs NFE")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
