"""Curves of a Remask-RL run from its metrics.jsonl (one line per update).

    python -m remedi.rl.plots runs/train_remask_rl-.../metrics.jsonl --out curves.png

Left: mean reward over the update's rollouts (band: +- one standard error of that mean), the fraction
answered correctly (the same curve for a 0/1 reward, drawn dashed on top), and where logged the greedy
decode's (the evaluated decision's) reward and accuracy, the share of true equations and the share of
groups whose advantages are all zero. Right: what the position policy does: remasks per block in the
rollouts and in the greedy decode (close together when the rollouts train the evaluated policy), the
entropy of its Plackett-Luce draws, and the share of remasked positions that get the same token back.
Rollouts per second go in the title of the right panel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from remedi.training.plots import curves_cli, save_figure


def plot_curves(rows: Sequence[dict], out, title: str = "Remask RL") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("metrics.jsonl has no lines yet")
    u = [r["update"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    from matplotlib.ticker import MaxNLocator

    mean = [r["reward_mean"] for r in rows]
    se = [r.get("reward_std", 0.0) / max(1, r.get("rollouts", 1)) ** 0.5 for r in rows]
    marker = "o" if len(rows) < 40 else None
    ax.plot(u, mean, marker=marker, label="reward (mean over rollouts)")
    ax.fill_between(u, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)], alpha=0.2,
                    label="+- 1 standard error")
    ax.plot(u, [r["accuracy"] for r in rows], marker="x" if marker else None, linestyle="--",
            label="accuracy (answer correct)")
    for key, style, label in (("greedy_reward_mean", "-.", "greedy decode: reward"),
                              ("greedy_accuracy", ":", "greedy decode: accuracy"),
                              ("equation_truth", "-", "share of true equations"),
                              ("zero_advantage_share", ":", "groups with zero advantage")):
        if all(key in r for r in rows):
            ax.plot(u, [r[key] for r in rows], linestyle=style, label=label, alpha=0.8)
    ax.set_xlabel("update (optimiser step)")
    ax.set_ylabel("per rollout")
    ax.set_title("reward and accuracy of the rollouts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for a in (ax, bx):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.plot(u, [r["remasks_per_block"] for r in rows], marker=marker, color="tab:red", label="remasks / block")
    if all("greedy_remasks_per_block" in r for r in rows):
        bx.plot(u, [r["greedy_remasks_per_block"] for r in rows], marker=marker, color="tab:red", linestyle="--",
                alpha=0.7, label="remasks / block, greedy decode")
    bx.set_xlabel("update (optimiser step)")
    bx.set_ylabel("remasks per block", color="tab:red")
    speed = [r["rollouts_per_s"] for r in rows if "rollouts_per_s" in r]
    bx.set_title("position policy" + (f" ({sum(speed) / len(speed):.2f} rollouts/s)" if speed else ""))
    bx.grid(alpha=0.3)
    cx = bx.twinx()
    cx.plot(u, [r["pl_entropy"] for r in rows], marker=marker, color="tab:green", label="PL entropy")
    if all("same_token_recommit_share" in r for r in rows):
        cx.plot(u, [r["same_token_recommit_share"] for r in rows], color="tab:purple", linestyle=":",
                label="same-token re-commit share")
    cx.set_ylabel("PL entropy (nats) / share", color="tab:green")
    handles = [h for a in (bx, cx) for h in a.get_legend_handles_labels()[0]]
    bx.legend(handles, [h.get_label() for h in handles], fontsize=8)
    from remedi.evaluation.plots import no_paths

    fig.suptitle(no_paths(title))
    return save_figure(fig, out)


def main(argv=None) -> Path:
    return curves_cli(__doc__, "train_remask_rl.py", plot_curves, argv, title="Remask RL")


if __name__ == "__main__":
    main()
