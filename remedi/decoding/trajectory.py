"""Draw a denoising trajectory (``Generation.trajectory``) as a PNG and as a self-contained HTML page.

The picture is a grid: x = generated position, y = step (time runs downwards). A cell is grey while its
position is masked, coloured once it holds the token it ends with -- the colour is the step at which that
final token was unmasked -- and orange while it holds a token that is later taken back. A red x marks a
remask (a token masked again at that step), so one sees where the policy changed its mind. The final
tokens are written under each panel, horizontally, on a box of their colour (dark boxes get white text, so
late, yellow tokens stay readable); a dashed line marks where a new block starts. Every panel has the same
column width, so the panels line up.

Long generations wrap: positions are cut into panels of about 64 (whole blocks where blocks are short),
and each panel shows only the steps of its own blocks (before them its positions are all masked, after
them they are frozen), so gen_length 256 with 256 steps stays readable.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Optional

from remedi.files import atomic_path

MASKED_RGB = (0.90, 0.90, 0.90)
DISCARDED_RGB = (1.00, 0.60, 0.15)
REMASK_RGB = (0.85, 0.05, 0.05)
PANEL_WIDTH = 64


def _label(tokenizer, tid: Optional[int], width: int = 8) -> str:
    if tid is None:
        return ""
    s = tokenizer.decode([tid]) if tokenizer is not None else str(tid)
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    s = "".join(c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in s)
    if s.startswith("<|") and s.endswith("|>"):
        s = "<" + s[2:-2] + ">"
    if not s.strip():
        s = "\u2423" * max(1, len(s))  # visible blank
    return s if len(s) <= width else s[: width - 1] + "\u2026"


def analyse(traj: list[dict]) -> dict:
    """Per-cell states and per-position facts from a trajectory (shared by the PNG and the HTML)."""
    if not traj:
        raise ValueError("empty trajectory: generate with SamplerConfig(record_trajectory=True)")
    n_pos = max(st["span"][1] for st in traj)  # positions actually decoded (eos_gating may stop early)
    final = traj[-1]["tokens"][:n_pos]
    final_step = [None] * n_pos  # step of the last unmask of each position
    for st in traj:
        for p in st["unmasked"]:
            final_step[p] = st["step"]
    # state: 0 masked, 1 holds its final token (kept from then on), 2 holds a token later taken back
    state = [[0 if st["tokens"][p] is None else (1 if final_step[p] is not None and st["step"] >= final_step[p]
                                                   else 2) for p in range(n_pos)] for st in traj]
    remasks = [(p, st["step"]) for st in traj for p in st["remasked"]]
    return dict(n_pos=n_pos, final=final, final_step=final_step, state=state, remasks=remasks,
                n_steps=len(traj))


def _panels(traj: list[dict], n_pos: int) -> list[tuple[int, int, int, int]]:
    """(pos_lo, pos_hi, step_lo, step_hi) per panel: about PANEL_WIDTH positions, only their own steps."""
    spans = sorted({tuple(st["span"]) for st in traj})
    Lb = spans[0][1] - spans[0][0]
    width = Lb * max(1, PANEL_WIDTH // Lb) if Lb <= PANEL_WIDTH else PANEL_WIDTH
    out = []
    for lo in range(0, n_pos, width):
        hi = min(lo + width, n_pos)
        steps = [st["step"] for st in traj if st["span"][0] < hi and st["span"][1] > lo]
        out.append((lo, hi, min(steps), max(steps) + 1))
    return out


def _shorten(text: str, n: int = 110) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= n else flat[: n - 1] + "\u2026"


BOUNDARY_RGB = (0.15, 0.15, 0.15)
LABEL_CHARS = 6  # token labels in the PNG are cut to this many characters
COLUMN_INCHES = 0.26  # width of one position in the PNG


def _label_rows(labels: list[str]) -> list[int]:
    """Row 0 for every label that does not overlap the one before it in that row, else the first row free."""
    char = 8 * 0.6 / 72 / COLUMN_INCHES  # width of one 8-pt monospace character, in columns
    right: list[float] = []  # rightmost edge used so far in each row
    out = []
    for x, text in enumerate(labels):
        half = (len(text) * char + 0.15) / 2
        row = next((r for r, edge in enumerate(right) if x - half >= edge), len(right))
        right[row:row + 1] = [x + half]
        out.append(row)
    return out


def _short_label(tokenizer, tid: Optional[int]) -> str:
    """The PNG's label: a word's leading space dropped (a bare space stays visible as \u2423)."""
    s = _label(tokenizer, tid, LABEL_CHARS + 1)
    s = s[1:] if s.startswith(" ") and s.strip() else s
    return s if len(s) <= LABEL_CHARS else s[: LABEL_CHARS - 1] + "\u2026"


def _text_on(rgb) -> str:
    """Black or white, whichever reads better on ``rgb``."""
    r, g, b = rgb[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def draw_trajectory(gen, tokenizer, out_png, out_html=None, title: str = "", prompt: Optional[str] = None,
                    gold: Optional[str] = None, correct: Optional[bool] = None, answer: Optional[str] = None) -> dict:
    """Write the PNG (and optionally the HTML page) for one ``Generation``; returns :func:`analyse`'s facts.

    ``prompt``, ``answer`` (what the model answered: the extracted answer, else its text), ``gold`` and
    ``correct`` (when known) are printed in the title, so the picture says what was asked, what the model
    answered, what the right answer is and whether this decoding got it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    traj = gen.trajectory
    if traj is None:
        raise ValueError("this Generation has no trajectory: sample with SamplerConfig(record_trajectory=True)")
    a = analyse(traj)
    n_steps, cmap = a["n_steps"], matplotlib.colormaps["viridis"]
    norm = matplotlib.colors.Normalize(vmin=0, vmax=max(1, n_steps - 1))
    panels = _panels(traj, a["n_pos"])
    heights = [min(6.0, max(1.6, 0.09 * (s1 - s0) + 1.0)) for _, _, s0, s1 in panels]
    max_w = max(hi - lo for lo, hi, _, _ in panels)
    labels = [_short_label(tokenizer, t) for t in a["final"]]
    fig_w = 2.4 + COLUMN_INCHES * max_w
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_w, sum(heights) + 1.2 + 0.2 * len(panels)),
                             gridspec_kw=dict(height_ratios=heights), squeeze=False, layout="constrained")
    for ax, (lo, hi, s0, s1) in zip(axes[:, 0], panels):
        img = np.zeros((s1 - s0, hi - lo, 3))
        for r, n in enumerate(range(s0, s1)):
            for c, p in enumerate(range(lo, hi)):
                st = a["state"][n][p]
                img[r, c] = MASKED_RGB if st == 0 else DISCARDED_RGB if st == 2 else cmap(norm(a["final_step"][p]))[:3]
        ax.imshow(img, aspect="auto", interpolation="nearest", extent=(lo - 0.5, hi - 0.5, s1 - 0.5, s0 - 0.5))
        ax.set_xlim(lo - 0.5, lo + max_w - 0.5)  # every panel as wide as the widest: equal column widths
        rm = [(p, n) for p, n in a["remasks"] if lo <= p < hi and s0 <= n < s1]
        if rm:
            ax.scatter([p for p, _ in rm], [n for _, n in rm], marker="x", s=18, linewidths=1.1, color=REMASK_RGB)
        ax.set_xticks(range(lo, hi), [""] * (hi - lo))
        ax.tick_params(axis="x", which="major", length=2)
        rows = _label_rows(labels[lo:hi])
        for p, row in zip(range(lo, hi), rows):  # horizontal labels; one that would overlap goes one row down
            rgb = cmap(norm(a["final_step"][p]))[:3] if a["final_step"][p] is not None else MASKED_RGB
            ax.annotate(labels[p], xy=(p, 0), xycoords=("data", "axes fraction"), xytext=(0, -5 - 14 * row),
                        textcoords="offset points", ha="center", va="top", fontsize=8, family="monospace",
                        color=_text_on(rgb), bbox=dict(facecolor=rgb, edgecolor="none", pad=1.0))
        top = ax.secondary_xaxis("top")
        top.set_xticks([p for p in range(lo, hi) if p % 8 == 0])
        top.tick_params(labelsize=7)
        ax.set_ylabel("step", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        starts = [n for n in range(s0, s1) if n == 0 or traj[n - 1]["block"] != traj[n]["block"]]
        ax.set_yticks(sorted(set(starts) | {s1 - 1}))
        for n in starts:
            if n > s0:
                ax.axhline(n - 0.5, color=BOUNDARY_RGB, linewidth=0.9, linestyle="--")
    info = f"NFE {gen.nfe}, remasks {gen.remasks}, {len(gen.tokens)} tokens kept"
    lines = [title] if title else []
    if prompt:
        lines.append(f"prompt: {_shorten(prompt)}")
    if answer is not None or gold is not None or correct is not None:
        verdict = "" if correct is None else ("correct" if correct else "wrong")
        said = f"model answered {_shorten(answer, 60)!r}" if answer is not None else ""
        lines.append(", ".join(x for x in (said, f"gold answer {gold}" if gold is not None else "", verdict) if x))
    fig.suptitle("\n".join(lines + [info]), fontsize=10)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[:, 0].tolist(), aspect=40,
                 pad=0.01, label="step at which the final token was unmasked")
    handles = [Patch(color=MASKED_RGB, label="masked"), Patch(color=DISCARDED_RGB, label="token later remasked"),
               Line2D([], [], marker="x", linestyle="", color=REMASK_RGB, label="remask event"),
               Line2D([], [], color=BOUNDARY_RGB, linestyle="--", linewidth=0.9, label="block boundary (next block starts)")]
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False, ncol=4)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    if out_html is not None:
        write_html(gen, tokenizer, out_html, title, a, panels)
    return a


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(int(round(255 * v)) for v in rgb[:3])


def write_html(gen, tokenizer, out_html, title: str = "", a: Optional[dict] = None, panels=None) -> None:
    """A table per panel: one row per step, token strings in the cells, hover for the score."""
    import matplotlib

    traj = gen.trajectory
    a = a or analyse(traj)
    panels = panels or _panels(traj, a["n_pos"])
    cmap = matplotlib.colormaps["viridis"]
    vmax = max(1, a["n_steps"] - 1)
    col = lambda n: _hex(cmap(n / vmax))  # noqa: E731
    remask_at = set(a["remasks"])
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title or 'trajectory')}</title><style>"
           "body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse;margin:12px 0}"
           "td,th{border:1px solid #ccc;padding:1px 3px;font-family:monospace;font-size:11px;white-space:pre;"
           "min-width:14px;text-align:center} td.m{background:#e6e6e6} td.d{background:#ff9926}"
           "td.r{outline:2px solid #d90d0d;outline-offset:-2px;color:#d90d0d} th.s{text-align:right}"
           ".k{display:inline-block;padding:0 6px;margin-right:8px}</style></head><body>",
           f"<h3>{e(title)}</h3>" if title else "",
           f"<p>NFE {gen.nfe}, remasks {gen.remasks} (per block {gen.remasks_per_block}), "
           f"{len(gen.tokens)} tokens kept, {gen.seconds:.3f} s</p>",
           "<p><span class='k' style='background:#e6e6e6'>masked</span><span class='k' style='background:#ff9926'>"
           "token later remasked</span><span class='k' style='outline:2px solid #d90d0d'>&times; remasked at this "
           "step</span>coloured: final token, colour = step of its final unmask (dark early, yellow late)</p>",
           "<p>Final text: <code>" + e(tokenizer.decode(gen.tokens) if tokenizer is not None else str(gen.tokens))
           + "</code></p>"]
    for lo, hi, s0, s1 in panels:
        out.append("<table><tr><th class='s'>position</th>" + "".join(f"<th>{p}</th>" for p in range(lo, hi))
                   + "</tr><tr><th class='s'>final</th>")
        for p in range(lo, hi):
            fs = a["final_step"][p]
            style = f" style='color:{col(fs)}'" if fs is not None else ""
            out.append(f"<th{style}>{e(_label(tokenizer, a['final'][p], 12))}</th>")
        out.append("</tr>")
        for n in range(s0, s1):
            st = traj[n]
            out.append(f"<tr><th class='s'>step {n} (block {st['block']})</th>")
            for p in range(lo, hi):
                state, tid = a["state"][n][p], st["tokens"][p]
                conf = st["conf"].get(p, st["conf"].get(str(p)))
                tip = f"pos {p}, step {n}" + (f", score {conf:.4g}" if conf is not None and math.isfinite(conf)
                                              else ", score -inf" if conf is not None else "")
                cls = ["m"] if state == 0 else ["d"] if state == 2 else []
                style = "" if state != 1 else f" style='background:{col(a['final_step'][p])};color:" \
                    f"{'#000' if a['final_step'][p] > 0.6 * vmax else '#fff'}'"
                text = _label(tokenizer, tid, 12)
                if (p, n) in remask_at:
                    cls.append("r")
                    text = "\u00d7"
                    tip += ", remasked here"
                cattr = f" class='{' '.join(cls)}'" if cls else ""
                out.append(f"<td{cattr}{style} title='{e(tip)}'>{e(text)}</td>")
            out.append("</tr>")
        out.append("</table>")
    out.append("</body></html>")
    with atomic_path(Path(out_html)) as tmp:
        Path(tmp).write_text("".join(out), encoding="utf-8")
