"""Draw imgs/architecture.png: the token prediction stream (TPS) with the two UPS variants.

    python scripts/draw_architecture.py [--out imgs/architecture.png]

Left: the lightweight head on the final hidden state (detached). Right: the paper's dual-stream UPS,
extra blocks tapped after backbone blocks 0, 10, 20, 30 that feed back through zero-initialised bridges.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

TPS, UPS, IO, BRIDGE = "#cfe2f3", "#fce5cd", "#eeeeee", "#d9ead3"


def box(ax, x, y, w, h, text, color, fs=9):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="#444444", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=fs)


def arrow(ax, x0, y0, x1, y1, style="-|>", color="#444444", ls="-"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=10, color=color, lw=1.2,
                                 linestyle=ls))


def backbone(ax, x, labels, y0=1.0, dy=0.9):
    ys = []
    for i, lab in enumerate(labels):
        y = y0 + (i + 1) * dy
        box(ax, x, y, 1.9, 0.55, lab, TPS)
        arrow(ax, x, y - dy + 0.28, x, y - 0.28)
        ys.append(y)
    return ys


def draw(out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 7.5))
    for ax in axes:
        ax.set_xlim(0, 6)
        ax.set_ylim(0, 11.0)
        ax.axis("off")

    # ---------------------------------------------------------------- head variant
    ax = axes[0]
    ax.set_title("UPS head (toolkit's light variant)", fontsize=12)
    box(ax, 2.2, 1.0, 2.6, 0.55, "x_t: prompt | answer with [M] and tokens", IO, 8)
    ys = backbone(ax, 2.2, ["block 0", "block 1", "...", "block 31", "ln_f"])
    box(ax, 2.2, ys[-1] + 1.2, 1.9, 0.55, "ff_out (LM head)", TPS)
    arrow(ax, 2.2, ys[-1] + 0.28, 2.2, ys[-1] + 0.92)
    box(ax, 2.2, ys[-1] + 2.3, 2.2, 0.55, "TPS: p(x0 | x_t)", IO)
    arrow(ax, 2.2, ys[-1] + 1.48, 2.2, ys[-1] + 2.02)
    box(ax, 4.7, ys[-1] + 1.2, 1.8, 0.75, "UPS head\nLinear(d,1) or\nLinear-GELU-Linear", UPS, 8)
    arrow(ax, 3.15, ys[-1], 4.7, ys[-1] + 0.8, ls="--")
    ax.text(3.95, ys[-1] + 0.2, "detach\n(no grad to backbone)", fontsize=7, color="#aa0000")
    box(ax, 4.7, ys[-1] + 2.3, 1.8, 0.55, "h_i: keep / remask", IO, 8)
    arrow(ax, 4.7, ys[-1] + 1.58, 4.7, ys[-1] + 2.02)

    # ---------------------------------------------------------------- stream variant
    ax = axes[1]
    ax.set_title("UPS stream (RemeDi paper, official checkpoints)", fontsize=12)
    box(ax, 1.6, 1.0, 2.6, 0.55, "x_t", IO)
    labels = ["block 0", "blocks 1-9", "block 10", "blocks 11-19", "block 20", "blocks 21-29", "block 30",
              "block 31 + ln_f"]
    ys = backbone(ax, 1.6, labels, y0=1.0, dy=0.88)
    taps = [ys[0], ys[2], ys[4], ys[6]]
    prev = None
    for k, y in enumerate(taps):
        box(ax, 4.3, y + 0.25, 1.7, 0.5, f"blocks_upm.{k}", UPS, 8)
        arrow(ax, 2.55, y, 3.45, y + 0.2)  # x (and x + u) into the UPS block
        if prev is not None:
            arrow(ax, 4.3, prev + 0.5, 4.3, y, color="#b45f06")  # u carried up
        box(ax, 3.0, y + 0.6, 0.9, 0.3, f"bridge {k}", BRIDGE, 6)
        arrow(ax, 3.45, y + 0.45, 2.6, y + 0.38, color="#38761d")  # back into the backbone
        prev = y + 0.25
    ax.text(3.9, 0.35, "u = x (first tap) or x + u;  u = upm_block(u);  x = x + bridge(norm(u))\n"
            "bridges start at zero: the backbone's outputs are unchanged at init", fontsize=7, ha="center")
    box(ax, 4.3, ys[-1] + 0.9, 1.9, 0.55, "ln_f_upm -> linear_confidence", UPS, 7)
    arrow(ax, 4.3, prev + 0.25, 4.3, ys[-1] + 0.62, color="#b45f06")
    box(ax, 4.3, ys[-1] + 1.8, 1.7, 0.5, "h_i per position", IO, 8)
    arrow(ax, 4.3, ys[-1] + 1.18, 4.3, ys[-1] + 1.55)
    box(ax, 1.6, ys[-1] + 0.9, 1.9, 0.55, "ff_out -> TPS logits", TPS, 8)
    arrow(ax, 1.6, ys[-1] + 0.28, 1.6, ys[-1] + 0.62)

    fig.text(0.5, 0.02, "Sampler step: rank every position of the current block by its confidence (UPS sigmoid(h) or a "
             "TPS score), keep the top K_n, re-mask the rest — including tokens decoded earlier.", ha="center",
             fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "imgs" / "architecture.png"))
    draw(Path(ap.parse_args(argv).out))


if __name__ == "__main__":
    main()
