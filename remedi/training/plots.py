"""Training curves from a run's metrics.jsonl.

    python -m remedi.training.plots runs/train_remask_sft-.../metrics.jsonl --out curves.png

Panels: TPS / UPS loss, UPS accuracy by set (clean, incorrect, masked), AUROC (clean vs incorrect among
unmasked tokens; TPS-argmax right vs wrong among masked ones; with --noise_source self also right vs wrong
self predictions and clean vs random replacements), learning rates, tokens/s, gradient norm.
"""

import argparse
from pathlib import Path
from typing import Optional

from remedi.files import read_jsonl

PANELS = [
    ("loss", ["tps_loss", "ups_loss"]),
    ("UPS accuracy", ["ups_acc_clean", "ups_acc_incorrect", "ups_acc_masked"]),
    ("UPS AUROC", ["auroc_unmasked", "auroc_masked", "auroc_self", "auroc_random"]),
    ("learning rate", None),  # every lr_* key
    ("wall-clock tokens/s (moves with machine load)", ["tokens_per_s"]),
    ("grad norm", ["grad_norm"]),
]


def read_metrics(path) -> list[dict]:
    """The lines of a metrics.jsonl; a torn last line of a running or killed run is skipped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    return read_jsonl(path)


def plot(rows: list[dict], out) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("metrics file has no lines yet")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    steps = [r["step"] for r in rows]
    for ax, (title, keys) in zip(axes.flat, PANELS):
        keys = keys or sorted({k for r in rows for k in r if k.startswith("lr_")})
        for k in keys:
            pts = [(s, r[k]) for s, r in zip(steps, rows) if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, out)


def save_figure(fig, out) -> Path:
    """Lay out, write the PNG atomically (parents created) and close the figure."""
    import matplotlib.pyplot as plt

    from remedi.files import atomic_path

    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


def curves_cli(doc: str, written_by: str, draw, argv=None, title: Optional[str] = None) -> Path:
    """The command line of a curves module (training and RL): ``metrics.jsonl --out PNG [--title T]``;
    ``draw(rows, out[, title])`` writes the picture."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("metrics", help=f"metrics.jsonl written by {written_by}")
    ap.add_argument("--out", required=True, help="PNG to write")
    if title is not None:
        ap.add_argument("--title", default=title)
    a = ap.parse_args(argv)
    rows = read_metrics(a.metrics)
    out = draw(rows, a.out) if title is None else draw(rows, a.out, a.title)
    print(f"wrote {out}")
    return out


def main(argv=None) -> Path:
    return curves_cli(__doc__, "train_remask_sft.py / train_remask_lora.py", lambda rows, out: plot(rows, out), argv)


if __name__ == "__main__":
    main()
