"""The derivative-free stage: CMA-ES over a linear residual UPS's weights, maximising greedy accuracy.

Each generation draws fresh training problems (:func:`remedi.policy.objective.train_problems`, never the
test split); every candidate, and the anchor itself (all weights zero), decodes the same problems with the
exact sampler (common random numbers), so the search compares candidates on equal terms and the curve shows
the gain over the heuristic on the same problems. After each generation the CMA-ES mean and the best
candidate so far (largest gain over the anchor in its generation) are written as UPS files, with the
search state, atomically; rerunning with the same ``--out`` resumes from the last finished generation.

    python -m remedi.policy.search --out runs/policy_search                      # the embedded model, CPU/GPU
    python -m remedi.policy.search --out runs/ps --ups_head results/embedded/round2/heads/traj_entropy.pt \\
        --problems 512 --popsize 12 --generations 20 --steps 48 --batch_size 1024 --device cuda
    python -m remedi.policy.search --out runs/ps_count --learn_hide   # + a learned count: one more dimension

``--learn_hide`` adds the hide threshold of :mod:`remedi.model.residual` (kept positions scoring below tau are hidden
anyway, except at a block's last step) as the last searched number, theta, mapped to tau by
:meth:`~remedi.model.residual.ResidualUPS.threshold_at`; theta starts at 0, below every anchor score, so the start
(and the "anchor" curve) is still the anchor's decisions, token for token. The files carry tau as
``ups_policy.hide_tau`` (and theta and tau in the metadata's ``search``).

Writes ``<out>/ups_mean.pt`` and ``<out>/ups_best.pt`` (loadable with ``--ups_head`` by every script),
``history.jsonl`` (one line per generation), ``curve.png`` and ``state.pt`` (resume).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from remedi.arguments import ModelArgs, arg, parse_args, run_main, setup_logging
from remedi.files import atomic_path, check_writable, read_jsonl, write_json_atomic

log = logging.getLogger("remedi.policy.search")


@dataclass
class SearchArgs:
    out: str = arg("runs/policy_search", "output folder (rerun with the same folder to resume)")
    ups_head: Optional[str] = arg(None, "base UPS (its logit is the 'base' feature); default: the embedded "
                                  "model's default UPS, ups_residual.pt, whose base is the trajectory-label head")
    lora_path: Optional[str] = arg(None, "peft LoRA folder merged into the backbone first: the search runs on that "
                                   "model (evaluate the result with the same --lora_path)")
    anchor: str = arg("entropy", "the heuristic the residual starts as: entropy, tps_prob, margin or none")
    features: str = arg("entropy,margin,logp_tok,logp_max,masked,pos,progress,digit,operator,result_digit,base",
                        "comma list of residual features (remedi.model.features)")
    hidden_rank: int = arg(0, "columns of the hidden-state projection (needs 'hidden' in --features)")
    problems: int = arg(256, "fresh training problems per generation (every candidate sees the same ones)")
    popsize: int = arg(8, "CMA-ES candidates per generation")
    generations: int = arg(10, "CMA-ES generations")
    sigma: float = arg(0.3, "CMA-ES initial step size (the weights start at zero: the anchor)")
    steps: int = arg(48, "denoising steps (exact sampler, greedy)")
    gen_length: int = arg(96, "tokens to generate")
    block_length: int = arg(32, "block length")
    batch_size: int = arg(512, "problems per forward batch")
    search_seed: int = arg(0, "seed of the problem stream and of CMA-ES")
    init: str = arg("", "starting weights other than zero, e.g. 'base=1' (the no-anchor ablation starts from the "
                    "base head's ranking)")
    learn_hide: bool = arg(False, "also search a hide threshold tau, one more dimension (hide_theta): kept "
                           "positions scoring below tau are hidden anyway except at a block's last step, a learned "
                           "count of extra hidden positions (remedi.model.residual). tau = U - (U - L + 1) "
                           "exp(-7 theta), [L, U] the anchor's score range: theta 0, the start, is below every anchor "
                           "score (off in effect); theta 0.3 (one --sigma) hides kept positions above 0.96 nats of "
                           "entropy, 0.6 above 0.12")
    graphs: bool = arg(False, "decode on the static-buffer decoder (CUDA graphs on a GPU; the residual's weights "
                       "are read in place, so one capture serves every candidate)")
    max_seconds: float = arg(0.0, "stop after the generation that passes this wall time (0: no limit); rerun "
                             "with the same --out to continue")

    def __post_init__(self):
        for name in ("problems", "popsize", "generations", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.popsize < 2:
            raise ValueError(f"--popsize must be >= 2 (CMA-ES ranks candidates), got {self.popsize}")
        if not self.sigma > 0:
            raise ValueError(f"--sigma must be > 0, got {self.sigma}")


def cma_search(objective: Callable[[list, int], Sequence[float]], dim: int, sigma: float, generations: int,
               popsize: int, seed: int, state: Optional[dict] = None,
               on_generation: Optional[Callable[[dict, dict], None]] = None, x0: Optional[Sequence[float]] = None,
               deadline: Optional[float] = None) -> dict:
    """Maximise ``objective(candidates, generation) -> scores`` (higher is better) from ``x0`` (default 0).

    ``state`` (what ``on_generation`` received last) resumes a search; ``on_generation(record, state)`` is
    called after every generation with that generation's record and the resumable state. ``deadline``
(time.monotonic value): stop after the first generation that ends past it. Returns the state.
    """
    import cma

    if state is None:
        start = list(x0) if x0 is not None else [0.0] * dim
        es = cma.CMAEvolutionStrategy(start, sigma, {"popsize": popsize, "seed": seed + 1, "verbose": -9})
        state = {"es": pickle.dumps(es), "generation": 0, "best": None}
    while state["generation"] < generations:
        es = pickle.loads(state["es"])
        gen = state["generation"]
        cands = [list(map(float, c)) for c in es.ask()]
        scores = [float(s) for s in objective(cands, gen)]
        es.tell(cands, [-s for s in scores])
        i = max(range(len(scores)), key=scores.__getitem__)
        best = state["best"]
        if best is None or scores[i] > best["score"]:
            best = {"weights": cands[i], "score": scores[i], "generation": gen}
        rec = {"generation": gen, "scores": scores, "best_in_generation": scores[i],
               "mean": list(map(float, es.mean)), "sigma": float(es.sigma)}
        state = {"es": pickle.dumps(es), "generation": gen + 1, "best": best}
        if on_generation is not None:
            on_generation(rec, state)
        if deadline is not None and time.monotonic() > deadline:
            break
    return state


def plot_curve(history: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(g, [h["anchor_accuracy"] for h in history], "k--", label="anchor (the heuristic, weights 0)")
    ax.plot(g, [sum(h["accuracies"]) / len(h["accuracies"]) for h in history], label="candidates, mean")
    ax.plot(g, [max(h["accuracies"]) for h in history], label="best candidate")
    ax.set_xlabel("CMA-ES generation (fresh training problems each)")
    ax.set_ylabel("greedy accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


LATER_FLAGS = {"learn_hide": False}  # flags added after searches were saved: an older state.pt ran with these values


def _same_run(settings: dict) -> dict:
    """The settings a resumed search must share (--generations may grow, --max_seconds change)."""
    search = {**LATER_FLAGS, **settings["search"]}
    return {**settings, "search": {k: v for k, v in search.items() if k not in ("generations", "max_seconds")}}


def main(argv=None) -> dict:
    m, a = parse_args([ModelArgs, SearchArgs], argv, description=__doc__)
    setup_logging()
    out = check_writable(a.out, "--out", is_dir=True)
    try:  # made now, so an unusable folder fails before the model loads
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {a.out} cannot be created ({e.strerror}); choose a folder you can write to") from None
    from remedi.decoding.args import SamplingArgs
    from remedi.model.checkpoint import save_ups
    from remedi.model.residual import attach_policy, new_residual
    from remedi.policy.objective import GreedyObjective, held_out_questions, train_problems
    from remedi.session import open_session

    features = [f.strip() for f in a.features.split(",") if f.strip()]
    sampling = SamplingArgs(steps=a.steps, gen_length=a.gen_length, block_length=a.block_length, temperature=0.0,
                            cache="none", eos_gating=False, graphs=a.graphs)
    session = open_session(m.model_name, sampling, ups_head=a.ups_head, lora_path=a.lora_path, seed=m.seed)
    if not session.has_ups:
        raise ValueError("the residual needs a base UPS to be saved with: pass --ups_head CHECKPOINT")
    settings = {"model": dataclasses.asdict(m), "search": dataclasses.asdict(a)}
    state_path, hist_path = out / "state.pt", out / "history.jsonl"
    state = None
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)  # our own file: CMA-ES state (pickle)
        if _same_run(saved["settings"]) != _same_run(settings):
            raise ValueError(f"--out {out} holds a search with other settings; choose a new --out or rerun with "
                             f"the settings in {out / 'settings.json'}")
        state = saved["state"]
        log.info("resuming at generation %d", state["generation"])
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no search; choose a new or empty folder")
    session.load(m.device, "fp32" if m.dtype == "auto" else m.dtype)  # float32 unless asked: as evaluated
    policy = new_residual(session.model, session.tokenizer, anchor=a.anchor, features=features,
                          hidden_rank=a.hidden_rank,  # validates the feature names
                          hide_threshold=0.0 if a.learn_hide else None)  # tau: set from theta with the start below
    attach_policy(session.model, policy)
    cols = policy.search_columns()  # feature columns, bias (and hide_theta)
    dim = len(cols)
    write_json_atomic(out / "settings.json", {**settings, "feature_columns": cols})
    objective = GreedyObjective(session, a.steps, a.batch_size)
    banned = held_out_questions()
    history = read_jsonl(hist_path, repair=True)[: state["generation"] if state else 0]
    from tqdm.auto import tqdm

    bar = tqdm(total=a.generations * (a.popsize + 1), initial=len(history) * (a.popsize + 1), desc="cma-es",
               dynamic_ncols=True)
    extra = {}

    def score(cands, gen):
        items = train_problems(a.problems, a.search_seed, gen, banned)
        prompts = objective.encode(items)
        anchor = objective.accuracy(x0, items, prompts)
        bar.update(1)
        accs = []
        for c in cands:
            accs.append(objective.accuracy(c, items, prompts))
            bar.update(1)
        extra.update(anchor_accuracy=anchor, accuracies=accs)  # "anchor": the starting weights x0
        return [x - anchor for x in accs]  # gain over the start (the anchor) on the same problems

    def save(rec, st):
        rec = {**rec, **extra}
        history.append(rec)
        for name, w in (("ups_mean.pt", rec["mean"]), ("ups_best.pt", st["best"]["weights"])):
            policy.set_search_point(w)  # with --learn_hide the file's ups_policy.hide_tau is this point's tau
            hide = {} if policy.hide_tau is None else {"hide_theta": w[-1], "hide_tau": float(policy.hide_tau)}
            save_ups(out / name, session.model, extra_meta={"search": {
                "which": name, "generation": rec["generation"], "settings": settings,
                "best_gain": st["best"]["score"], "best_generation": st["best"]["generation"], **hide}})
        with atomic_path(hist_path) as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
        with atomic_path(state_path) as tmp:
            torch.save({"settings": settings, "state": st}, tmp)
        plot_curve(history, out / "curve.png",
                   f"CMA-ES over {dim} residual weights{' (incl. hide_theta)' if a.learn_hide else ''} (anchor "
                   f"{a.anchor}): greedy accuracy,\n"
                   f"{a.problems} fresh problems a generation, {a.steps} steps")
        bar.set_postfix(anchor=f"{rec['anchor_accuracy']:.3f}", best=f"{max(rec['accuracies']):.3f}")
        accs = rec["accuracies"]
        log.info("generation %d/%d: anchor %.3f, candidates mean %.3f best %.3f, sigma %.3f; best gain so far %+.3f "
                 "(generation %d); %.0f s elapsed", rec["generation"] + 1, a.generations, rec["anchor_accuracy"],
                 sum(accs) / len(accs), max(accs), rec["sigma"], st["best"]["score"], st["best"]["generation"],
                 time.monotonic() - t_start)

    x0 = [0.0] * dim
    for part in filter(None, (p.strip() for p in a.init.split(","))):
        name, _, val = part.partition("=")
        if name not in cols or not val:
            raise ValueError(f"--init {part!r}: expected column=value with a column of {', '.join(cols)}")
        x0[cols.index(name)] = float(val)
    policy.set_search_point(x0)  # the start (with --learn_hide: theta 0, tau below every anchor score)
    t_start = time.monotonic()
    deadline = t_start + a.max_seconds if a.max_seconds > 0 else None
    state = cma_search(score, dim, a.sigma, a.generations, a.popsize, a.search_seed, state, save, x0, deadline)
    bar.close()
    best = state["best"]
    print(f"best gain over the start ({a.anchor} anchor) on its generation's problems: {best['score']:+.3f} (generation "
          f"{best['generation']}); wrote {out / 'ups_best.pt'} and {out / 'ups_mean.pt'}")
    return {"best": best, "history": history, "out": str(out)}


if __name__ == "__main__":
    run_main(main)
