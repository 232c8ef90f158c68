"""Draw the residual-UPS experiment's summary (scripts/residual_experiment.py): accuracy with 95% intervals and
each policy's paired difference from entropy, one panel pair per step count.

    python scripts/plot_residual.py results/embedded/round3/summary.json imgs/residual_round3.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from remedi.files import atomic_path  # noqa: E402

LABELS = {
    "entropy": "entropy (best heuristic)", "tps_prob": "TPS probability", "margin": "margin",
    "entropy_unmask_only": "entropy, unmask-only", "mix_0.2_untrained": "−entropy + 0.2·head (untrained)",
    "cma_linear": "residual, CMA-ES (all features)", "cma_linear_unmask_only": "residual, unmask-only twin",
    "cma_no_anchor": "residual, no anchor", "cma_feat_head": "residual, entropy + head only",
    "cma_feat_hidden": "residual, + hidden state", "slip_oracle": "slip oracle (gold-free)",
    "slip_repredict": "token action: second look at slips", "slip_repredict_true": "token action, arithmetic-checked",
}


def _extra_forwards(row: dict) -> str:
    """' (63 forwards)' for a row whose mean NFE is above its step count (a token action's second looks)."""
    nfe = row.get("nfe")
    return f" ({nfe:.0f} forwards)" if nfe is not None and nfe > row["steps"] + 0.5 else ""


def draw(summary: dict, out: Path) -> Path:
    steps = sorted({r["steps"] for r in summary["rows"]}, reverse=True)
    fig, axes = plt.subplots(len(steps), 2, figsize=(12, 4.2 * len(steps)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for row, st in zip(axes, steps):
        rs = [r for r in summary["rows"] if r["steps"] == st]
        names = [LABELS.get(r["policy"], r["policy"]) + _extra_forwards(r) for r in rs]
        y = range(len(rs))
        acc = [r["accuracy"] for r in rs]
        lo = [r["accuracy"] - r["ci95"][0] for r in rs]
        hi = [r["ci95"][1] - r["accuracy"] for r in rs]
        colors = ["tab:orange" if r["policy"].startswith("cma") else "tab:gray" if r["policy"] == "entropy"
                  else "tab:blue" for r in rs]
        row[0].barh(y, acc, xerr=[lo, hi], color=colors, alpha=0.85, capsize=3)
        row[0].set_yticks(list(y), names)
        row[0].invert_yaxis()
        row[0].set_xlim(min(acc) - 0.06, max(acc) + 0.05)
        row[0].set_xlabel("accuracy (95% Wilson interval)")
        row[0].set_title(f"{st} steps ({st} forwards unless a row says more), first {rs[0]['n']} test problems")
        d = [r.get("vs_entropy", {}).get("bootstrap", {"diff": 0.0, "lo": 0.0, "hi": 0.0}) for r in rs]
        row[1].errorbar([x["diff"] for x in d], list(y), xerr=[[x["diff"] - x["lo"] for x in d],
                                                               [x["hi"] - x["diff"] for x in d]],
                        fmt="o", color="black", capsize=3)
        for yi, r in zip(y, rs):
            p = r.get("vs_entropy", {}).get("mcnemar_p")
            if p is not None:
                row[1].annotate(f"p={p:.2g}", (r["vs_entropy"]["bootstrap"]["hi"], yi), xytext=(4, -3),
                                textcoords="offset points", fontsize=8)
        row[1].axvline(0, color="tab:gray", linestyle="--", linewidth=1)
        row[1].set_yticks(list(y), [""] * len(rs))
        row[1].invert_yaxis()
        row[1].set_xlabel("minus entropy, same problems (95% CI, McNemar p)")
    fig.suptitle("Embedded model, gen 96, block 32, exact sampler, greedy: a residual UPS anchored on entropy")
    fig.tight_layout()
    with atomic_path(out) as tmp:  # a killed run leaves no half-written picture
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python scripts/plot_residual.py SUMMARY.json OUT.png", file=sys.stderr)
        return 2
    src = Path(argv[0])
    try:
        summary = json.loads(src.read_text())
        rows = summary["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {src} is not a residual_experiment.py summary.json ({type(e).__name__}: {e}); pass the "
              "summary.json its --phase eval wrote", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {src} has no evaluated rows; run residual_experiment.py --phase eval first", file=sys.stderr)
        return 2
    print(f"wrote {draw(summary, Path(argv[1]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
