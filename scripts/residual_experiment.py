"""The residual-UPS experiment (issue 20) on the embedded model, in resumable pieces that fit 10-minute calls.

Settings match results/embedded/round2 (gen 96, block 32, exact sampler, no cache, no EOS gating, greedy,
float32, the first N test items), so entropy reproduces 0.426 at 48 steps on 2000 items.

  # 1. the derivative-free stage, one variant per call (rerun the same line until it says done)
  python scripts/residual_experiment.py --out runs/residual --phase search --variant linear --max_seconds 540
  # (variants: linear, no_anchor, feat_entropy, feat_head, feat_type_ctx, feat_hidden, learned_count; learned_count,
  #  linear + a searched hide threshold (remedi.model.residual), has run on CPU with tiny budgets only)
  # 2. Remask RL of g from the CMA winner (search/linear/ups_mean.pt), one variant per call (rerun the same
  #    line until it says done; each call stops with a checkpoint before --max_seconds)
  python scripts/residual_experiment.py --out runs/residual --phase rl --rl_variant greedy_loo_shaped_block --max_seconds 540
  # (rl variants, one switch each against greedy_loo_shaped_block: sampled_tokens, binary_reward, sequence_credit,
  #  greedy_baseline, old_budget; budget --rl_updates 50 --rl_prompts 64 --rl_group 16 --rl_lr 0.01 by default)
  # 3. evaluation of every policy found under --out, plus heuristics, twins, the slip oracle and the token action
  python scripts/residual_experiment.py --out runs/residual --phase eval --n_items 2000 --max_seconds 540
  # CPU smoke of everything: --phase all --n_items 8 --problems 8 --generations 1 --popsize 2 --rl_updates 2
  #   --rl_prompts 2 --rl_group 2 --device cpu

The rl phase (remedi/train_remask_rl.py, called in-process) has run on CPU with tiny budgets only; its GPU
budget and learning rate are guesses until the next GPU session measures them. Recommended recipe
(RL_RECIPE): greedy tokens, Plackett-Luce positions at T 0.05, leave-one-out baseline, correct + 0.5 x share
of true equations with per-block credit, g rescored from features recorded at rollout time, float32 as the
eval, --rollout_graphs on a GPU; a checkpoint every update. Its folder is the trainer's run folder; a
folder that holds a run is resumed (the trainer refuses a resume whose flags differ, except --rl_updates
and the time limit).

Writes under --out: search/<variant>/ (remedi.policy.search), rl/<variant>/ (the trainer's args.json,
metrics.jsonl, curves.png, probe.json, checkpoints/, and ups.safetensors when finished), results.jsonl (one
record per item, policy and step count), mechanism.json (the same-token re-commit share and the positions a
block hid beyond K_n -- the learned count's extra hidden positions, 0 without one -- from trajectories of the first
--mechanism_items items), summary.json; prints the table last. Eval rows of RL:
rl_<variant> (the finished ups.safetensors) or rl_<variant>_update<N> (the latest checkpoint of a run not
finished yet; results are cached by row name, so a partial policy never stands in for the final one).
Progress: one log line per CMA-ES generation and per eval batch, with the elapsed time; the RL trainer's bar
shows reward and remasks/block per update. Speed: 2000-row batches and --graphs (the static decoder, CUDA
graphs on a GPU; on by default, the slip oracle and the token action always decode eagerly); --graphs False is the eager decoder,
the same tokens (tests/test_residual_ups.py).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remedi.arguments import arg, parse_args, run_main, setup_logging  # noqa: E402
from remedi.files import append_jsonl, read_jsonl, write_json_atomic  # noqa: E402
from remedi.model.residual import DEFAULT_FEATURES  # noqa: E402

log = logging.getLogger("residual_experiment")
REPO = Path(__file__).resolve().parents[1]
TRAJ_HEAD = REPO / "results" / "embedded" / "round2" / "heads" / "traj_entropy.pt"
FULL = ",".join(DEFAULT_FEATURES)
VARIANTS = {  # one switch each, against "linear"
    "linear": {"features": FULL},
    "no_anchor": {"features": FULL, "anchor": "none", "init": "base=1"},
    "feat_entropy": {"features": "entropy"},
    "feat_head": {"features": "entropy,base"},
    "feat_type_ctx": {"features": "entropy,base,digit,operator,equals,result_digit,ctx_entropy,pos,progress"},
    "feat_hidden": {"features": FULL + ",hidden", "hidden_rank": 4},
    # linear + a learned count of extra hidden positions: a searched threshold tau hides kept positions scoring below
    # it (not at a block's last step), so fewer than K_n may stay visible (remedi.model.residual, hide_threshold)
    "learned_count": {"features": FULL, "learn_hide": True},
}
WINNER = "linear"
# Remask RL from the CMA winner (--phase rl). The recommended recipe trains the evaluated decision (Remask_SFT_RUN.md
# "Training on the evaluated decision"): greedy tokens, Plackett-Luce positions at T 0.05, a leave-one-out baseline,
# the shaped reward with per-block credit, g rescored from the features recorded at rollout time.
RL_RECIPE = {"rollout_tokens": "greedy", "ups_temperature": "0.05", "advantage": "loo",
             "reward": "math_verify+equation_truth", "reward_weight": "0.5", "credit": "block"}
RL_BUDGET = {"prompts": 64, "group": 16, "updates": 50}  # ~1000 rollouts an update (+64 greedy decodes)
RL_ARITH_N = 8000  # generated training problems: the default budget's 3200 prompts are all distinct
RL_RECOMMENDED = "greedy_loo_shaped_block"
RL_VARIANTS = {  # one switch each, against RL_RECOMMENDED: trainer flags (None drops one) and budget
    RL_RECOMMENDED: {},
    "sampled_tokens": {"flags": {"rollout_tokens": "sample", "temperature": "1.0"}},  # tokens at T 1.0 (round 2)
    # the trainer reads --reward_weight only for the shaped reward and refuses it elsewhere: dropped here
    "binary_reward": {"flags": {"reward": "math_verify", "reward_weight": None}},  # 0/1, still per-block parts
    "sequence_credit": {"flags": {"credit": "sequence"}},
    "greedy_baseline": {"flags": {"advantage": "greedy"}},
    "old_budget": {"budget": {"prompts": 8, "group": 8, "updates": 25}},  # round 2's 64 rollouts an update
}


@dataclass
class ExperimentArgs:
    out: str = arg("runs/residual", "output folder (every phase resumes in it)")
    phase: str = arg("eval", "search (one --variant), rl (one --rl_variant, from search/linear), eval, or all "
                     "(every search variant, rl of the recommended variant, then eval: the CPU smoke)")
    variant: str = arg("linear", "search variant: " + ", ".join(VARIANTS))
    rl_variant: str = arg(RL_RECOMMENDED, "rl variant: " + ", ".join(RL_VARIANTS))
    rl_updates: Optional[int] = arg(None, f"rl: optimiser updates (default: the variant's, {RL_BUDGET['updates']}; "
                                    "raising it later continues a finished run)")
    rl_prompts: Optional[int] = arg(None, f"rl: prompts an update (default: the variant's, {RL_BUDGET['prompts']})")
    rl_group: Optional[int] = arg(None, f"rl: rollouts a prompt (default: the variant's, {RL_BUDGET['group']})")
    rl_probe: bool = arg(True, "rl: before a run's first update, decode 8 prompts at position temperatures 0.05, 0.1 "
                         "and 0.3 against the greedy decode (probe.json: how far the rollouts stray from the eval)")
    rl_lr: float = arg(1e-2, "rl: AdamW learning rate of g (a guess: its 12 weights are O(0.3) after the search, "
                       "whose step was 0.3, so 50 updates can move each by up to ~0.5)")
    ups_head: str = arg(str(TRAJ_HEAD), "base UPS whose logit is the 'base' feature (the trajectory-label head)")
    n_items: int = arg(2000, "first test items to evaluate")
    steps_list: str = arg("48,24", "step counts to evaluate")
    batch_size: int = arg(2000, "problems per forward batch (eval and search; rl: rollouts decoded at a time; 2000 "
                          "rows of the 3M model fit an H200 many times over)")
    graphs: bool = arg(True, "static-buffer decoder (CUDA graphs on a GPU) for every policy but the slip oracle and "
                       "the token action, whose host reads need the eager decoder")
    problems: int = arg(512, "search: fresh training problems per generation")
    popsize: int = arg(12, "search: CMA-ES candidates per generation")
    generations: int = arg(20, "search: generations")
    search_steps: int = arg(48, "search: denoising steps")
    mechanism_items: int = arg(100, "items whose trajectories give the same-token re-commit share and the "
                               "positions hidden beyond K_n")
    max_seconds: float = arg(0.0, "stop cleanly after the piece that passes this wall time (0: no limit)")
    device: Optional[str] = arg(None, "cuda or cpu (default: cuda if available)")

    def __post_init__(self):
        if self.phase not in ("search", "rl", "eval", "all"):
            raise ValueError(f"--phase {self.phase!r}: choose search, rl, eval or all")
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.rl_variant not in RL_VARIANTS:
            raise ValueError(f"--rl_variant {self.rl_variant!r}: choose one of {', '.join(RL_VARIANTS)}")
        for name in ("rl_updates", "rl_prompts", "rl_group"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.rl_lr > 0:
            raise ValueError(f"--rl_lr must be > 0, got {self.rl_lr}")
        if self.n_items < 1 or self.batch_size < 1:
            raise ValueError("--n_items and --batch_size must be >= 1")
        try:
            self.steps = [int(s) for s in self.steps_list.split(",")]
        except ValueError:
            raise ValueError(f"--steps_list must be comma-separated integers, got {self.steps_list!r}") from None


def run_search(a: ExperimentArgs, variant: str, deadline: Optional[float]) -> None:
    from remedi.policy.search import main as search

    v = VARIANTS[variant]
    argv = ["--out", str(Path(a.out) / "search" / variant), "--ups_head", a.ups_head, "--dtype", "fp32",
            "--features", v["features"], "--anchor", v.get("anchor", "entropy"),
            "--hidden_rank", str(v.get("hidden_rank", 0)), "--init", v.get("init", ""),
            "--problems", str(a.problems), "--popsize", str(a.popsize), "--generations", str(a.generations),
            "--steps", str(a.search_steps), "--batch_size", str(a.batch_size), "--graphs", str(a.graphs),
            "--learn_hide", str(v.get("learn_hide", False))]
    if deadline is not None:
        argv += ["--max_seconds", str(max(1.0, deadline - time.monotonic()))]
    if a.device:
        argv += ["--device", a.device]
    search(argv)


def winner_file(a: ExperimentArgs) -> Path:
    """The CMA winner every rl variant starts from (the search's mean of its last generation)."""
    return Path(a.out) / "search" / WINNER / "ups_mean.pt"


def rl_budget(a: ExperimentArgs, variant: str) -> dict:
    """{prompts, group, updates} of an rl variant: its own budget, each knob given on the command line instead."""
    b = {**RL_BUDGET, **RL_VARIANTS[variant].get("budget", {})}
    given = {"prompts": a.rl_prompts, "group": a.rl_group, "updates": a.rl_updates}
    return {k: given[k] if given[k] is not None else v for k, v in b.items()}


def rl_argv(a: ExperimentArgs, variant: str, resume: bool, seconds: Optional[float] = None) -> list[str]:
    """The train_remask_rl command line of an rl variant: float32 and no autocast, as the search and the eval
    decode; a checkpoint every update (g and its optimiser are a few numbers); --resume to continue."""
    import torch

    flags = {**RL_RECIPE, **RL_VARIANTS[variant].get("flags", {})}
    b = rl_budget(a, variant)
    folder = Path(a.out) / "rl" / variant
    argv = ["--ups_head", str(winner_file(a)), "--output_dir", str(folder),
            "--dtype", "fp32", "--mixed_precision", "no", "--cache_features",
            "--group_size", str(b["group"]), "--prompts_per_update", str(b["prompts"]),
            "--max_updates", str(b["updates"]), "--lr", str(a.rl_lr), "--rollout_batch", str(a.batch_size),
            "--arith_n", str(RL_ARITH_N), "--save_every", "1"]
    for k, v in flags.items():
        if v is not None:
            argv += [f"--{k}", v]
    on_cuda = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if a.graphs and on_cuda:
        argv.append("--rollout_graphs")
    if a.device:
        argv += ["--device", a.device]
    if seconds is not None:
        argv += ["--max_seconds", str(seconds)]
    if resume:
        argv.append("--resume")
    elif a.rl_probe:
        argv += ["--probe_temperatures", "0.05,0.1,0.3"]
    return argv


def run_rl(a: ExperimentArgs, variant: str, deadline: Optional[float]) -> Optional[dict]:
    """Remask RL of g from the CMA winner into <out>/rl/<variant>/ (the trainer's ups.safetensors at the end),
    resumed from its latest checkpoint when the folder holds a run; None when it had already finished."""
    from remedi.model.checkpoint import UPS_FILE_NAME, read_ups_meta

    winner = winner_file(a)
    if not winner.is_file():
        raise ValueError(f"--phase rl starts from the CMA winner {winner}, which does not exist: make it with "
                         f"python scripts/residual_experiment.py --out {a.out} --phase search --variant {WINNER}")
    folder = Path(a.out) / "rl" / variant
    final, updates = folder / UPS_FILE_NAME, rl_budget(a, variant)["updates"]
    if final.is_file():
        done = int(read_ups_meta(final).get("rl", {}).get("update", 0))
        if done >= updates:
            log.info("rl %s: done (%d updates, %s)", variant, done, final)
            return None
        log.warning("rl %s: continuing a finished run from %d to %d updates; eval rows already in results.jsonl "
                    "under rl_%s came from the %d-update policy (remove them to evaluate the new one)", variant,
                    done, updates, variant, done)
    from remedi.train_remask_rl import main as train

    seconds = max(1e-3, deadline - time.monotonic()) if deadline is not None else None
    result = train(rl_argv(a, variant, resume=(folder / "args.json").is_file(), seconds=seconds))
    if result.get("stopped"):
        log.info("rl %s: stopped at update %d of %d (time budget): rerun the same command to continue", variant,
                 result["update"], updates)
    return result


def rl_policy_file(folder: Path) -> Optional[tuple[str, Path]]:
    """(row suffix, UPS file) of an rl run folder: its final export, or (a run still going) the UPS of its latest
    checkpoint, named by its update so its results never mix with the finished policy's; None without either."""
    from remedi.model.checkpoint import UPS_FILE_NAME
    from remedi.training.state import latest_checkpoint

    if (folder / UPS_FILE_NAME).is_file():
        return "", folder / UPS_FILE_NAME
    ck = latest_checkpoint(folder) if (folder / "checkpoints").is_dir() else None
    if ck is None or not (ck / UPS_FILE_NAME).is_file():
        return None
    return f"_update{int(ck.name.removeprefix('update-'))}", ck / UPS_FILE_NAME


def read_residual(path: Path, model, ups_head: str) -> tuple[dict, dict]:
    """(spec, g's tensors) of a residual UPS file (read_ups, checksummed). Its base head must be the session's:
    the eval scores g over the session's base logit, so a policy made on another head would be evaluated on
    the wrong 'base' feature."""
    import torch

    from remedi.model.checkpoint import read_ups

    state, meta = read_ups(path)
    if meta.get("kind") != "residual":
        raise ValueError(f"{path} holds no residual UPS (metadata kind {meta.get('kind')!r})")
    head = {k.removeprefix("ups_head."): v for k, v in state.items() if k.startswith("ups_head.")}
    mine = model.ups_head.state_dict() if model.ups_head is not None else {}
    if head and (set(head) != set(mine) or not all(torch.equal(v.float(), mine[k].float().cpu())
                                                   for k, v in head.items())):
        raise ValueError(f"{path} was made on another base UPS head than --ups_head {ups_head}: evaluate it with "
                         "the head it was searched or trained on")
    return meta["residual"], {k.removeprefix("ups_policy."): v for k, v in state.items()
                              if k.startswith("ups_policy.")}


def policies(a: ExperimentArgs, session, tokenizer) -> dict:
    """name -> (sampler source, policy or None) for every row of the table that can run now."""
    from remedi.model.checkpoint import build_residual
    from remedi.model.residual import new_residual
    from remedi.policy.slip import SlipOracle, SlipRepredict

    model = session.model
    rows = {"entropy": ("entropy", None), "tps_prob": ("tps_prob", None), "margin": ("margin", None),
            "entropy_unmask_only": ("ups", new_residual(model, tokenizer, features=("entropy",), unmask_only=True))}
    mix = new_residual(model, tokenizer, features=("base",))
    mix.set_linear_weights([0.2, 0.0])  # the untrained -entropy + 0.2 x head logit of LEARNED_POLICY.md
    rows["mix_0.2_untrained"] = ("ups", mix)
    for variant in VARIANTS:
        path = Path(a.out) / "search" / variant / "ups_mean.pt"
        if path.is_file():
            spec, pol = read_residual(path, model, a.ups_head)
            rows[f"cma_{variant}"] = ("ups", build_residual(spec, pol, model.config.d_model, path))
            if variant == WINNER:
                twin = build_residual({**spec, "unmask_only": True}, pol, model.config.d_model, path)
                rows[f"cma_{variant}_unmask_only"] = ("ups", twin)
    for variant in RL_VARIANTS:
        found = rl_policy_file(Path(a.out) / "rl" / variant)
        if found is not None:
            suffix, path = found
            spec, pol = read_residual(path, model, a.ups_head)
            rows[f"rl_{variant}{suffix}"] = ("ups", build_residual(spec, pol, model.config.d_model, path))
            if suffix:
                log.info("rl_%s: no final policy yet, evaluating its latest checkpoint as rl_%s%s", variant,
                         variant, suffix)
    rows["slip_oracle"] = ("ups", SlipOracle(tokenizer, model.config.vocab_size))
    # the token action at result digits: a second look with the slip's digits and copies hidden (extra NFE), written
    # as predicted, or only when it makes the equation true (an arithmetic check in the loop: a ceiling, not a policy)
    for accept in ("any", "true"):
        rows["slip_repredict" + ("_true" if accept == "true" else "")] = \
            ("ups", SlipRepredict(tokenizer, model.config.vocab_size, session.ids.mask, accept=accept))
    return rows


def recommit_share(traj: list[dict]) -> tuple[int, int]:
    """(re-commits, re-commits with the same token) of positions remasked and later unmasked again."""
    held, prev, n, same = {}, None, 0, 0
    for st in traj:
        for p in st["remasked"]:
            held[p] = prev[p] if prev is not None else None
        for p in st["unmasked"]:
            if p in held:
                n += 1
                same += int(held.pop(p) == st["tokens"][p])
        prev = st["tokens"]
    return n, same


def extra_hidden(traj: list[dict], schedule: list[int]) -> tuple[int, int]:
    """(positions hidden beyond the schedule, blocks) of one trajectory: at the n-th step of a block K_n = schedule[n]
    positions stay visible under the fixed schedule, so K_n minus the visible positions after the step were hidden by a
    learned count (0 for every policy without one)."""
    hidden, blocks, n, cur = 0, 0, 0, None
    for st in traj:
        if st["block"] != cur:
            cur, n, blocks = st["block"], 0, blocks + 1
        lo, hi = st["span"]
        hidden += schedule[n] - sum(t is not None for t in st["tokens"][lo:hi])
        n += 1
    return hidden, blocks


def run_eval(a: ExperimentArgs, deadline: Optional[float]) -> Optional[dict]:
    from remedi.decoding.args import SamplingArgs
    from remedi.decoding.step import unmask_schedule
    from remedi.evaluation import data as D
    from remedi.evaluation.results import make_record
    from remedi.model.residual import attach_policy
    from remedi.session import open_session

    out = Path(a.out)
    sampling = SamplingArgs(steps=a.steps[0], gen_length=96, block_length=32, temperature=0.0, cache="none",
                            eos_gating=False)
    session = open_session(_embedded(), sampling,
                           ups_head=a.ups_head)
    spec = D.resolve_dataset(None, None, "test", None)
    items, _ = D.select_items(D.load_items(spec), 0, a.n_items, False, 0)
    style = D.prompt_style(spec, session.chat)
    enc = {it.id: D.encode(session.tokenizer, D.build_prompt(it.question, spec.fmt, style), style) for it in items}
    session.load(a.device, "fp32")
    rows = policies(a, session, session.tokenizer)
    res_path = out / "results.jsonl"
    done = {(r["source"], r["steps"], r["id"]) for r in read_jsonl(res_path, repair=True)}
    from tqdm.auto import tqdm

    todo = [(name, st) for st in a.steps for name in rows]
    bar = tqdm(total=len(todo) * len(items), desc="eval", dynamic_ncols=True)
    t0 = time.monotonic()
    for name, st in todo:
        source, policy = rows[name]
        left = [it for it in items if (name, st, it.id) not in done]
        bar.update(len(items) - len(left))
        attach_policy(session.model, policy)
        graphs = a.graphs and not getattr(policy, "host_sync", False)
        for i in range(0, len(left), a.batch_size):
            if deadline is not None and time.monotonic() > deadline:
                log.info("time budget reached: rerun the same command to continue")
                return None
            batch = left[i:i + a.batch_size]
            gens = session.generate([enc[it.id][0] for it in batch], source, [it.id for it in batch], st,
                                    graphs=graphs)
            recs = [make_record(it, name, st, enc[it.id][1], session.tokenizer.decode(g.tokens, skip_special_tokens=True),
                                spec.fmt, nfe=g.nfe, remasks=g.remasks, remasks_per_block=g.remasks_per_block)
                    for it, g in zip(batch, gens)]
            append_jsonl(res_path, recs)
            bar.update(len(batch))
            log.info("eval %s, %d steps: %d/%d items, accuracy of this batch %.3f; %.0f s elapsed", name, st,
                     len(items) - len(left) + i + len(batch), len(items), sum(r["correct"] for r in recs) / len(recs),
                     time.monotonic() - t0)
    bar.close()
    mech_path = out / "mechanism.json"
    mech = read_jsonl(out / "mechanism.jsonl")
    have = {m["policy"] for m in mech}
    Lb = sampling.block_length  # K_n of the eval's blocks at the mechanism's step count
    schedule = unmask_schedule(Lb, a.steps[0] // (sampling.gen_length // Lb))
    for name in ("entropy", f"cma_{WINNER}", "mix_0.2_untrained", f"rl_{RL_RECOMMENDED}", "cma_learned_count"):
        if name not in rows or name in have:
            continue
        source, policy = rows[name]
        attach_policy(session.model, policy)
        sub = items[:a.mechanism_items]
        gens = session.generate([enc[it.id][0] for it in sub], source, [it.id for it in sub], a.steps[0],
                                record_trajectory=True)
        n = same = hid = blocks = 0
        for g in gens:
            dn, ds = recommit_share(g.trajectory)
            dh, db = extra_hidden(g.trajectory, schedule)
            n, same, hid, blocks = n + dn, same + ds, hid + dh, blocks + db
        append_jsonl(out / "mechanism.jsonl", [{"policy": name, "steps": a.steps[0], "items": len(sub),
                                                "recommits": n, "same_token_share": same / n if n else None,
                                                "extra_hidden_per_block": hid / max(blocks, 1)}])
    attach_policy(session.model, None)
    mech = read_jsonl(out / "mechanism.jsonl")
    write_json_atomic(mech_path, mech)
    return summarize(read_jsonl(res_path), list(rows), a.steps, mech, out)


def _embedded() -> str:
    from remedi.model.loading import EMBEDDED_MODEL

    return str(EMBEDDED_MODEL)


def summarize(records: list[dict], names: list[str], steps: list[int], mech: list[dict], out: Path) -> dict:
    from remedi.evaluation.stats import mcnemar_exact, paired_bootstrap, wilson_interval

    by = {}
    for r in records:
        by.setdefault((r["source"], r["steps"]), {})[r["id"]] = r
    rows = []
    for st in steps:
        ref = by.get(("entropy", st), {})
        for name in names:
            got = by.get((name, st))
            if not got:
                continue
            ids = sorted(set(got) & set(ref))
            k, n = sum(got[i]["correct"] for i in got), len(got)
            blocks = [b for r in got.values() for b in r["remasks_per_block"]]
            row = {"policy": name, "steps": st, "n": n, "accuracy": k / n, "ci95": list(wilson_interval(k, n)),
                   "remasks_per_block": sum(blocks) / max(len(blocks), 1),
                   "nfe": sum(r["nfe"] for r in got.values()) / n}
            if name != "entropy" and ids:
                a_ok, b_ok = [got[i]["correct"] for i in ids], [ref[i]["correct"] for i in ids]
                row["vs_entropy"] = {"diff": (sum(a_ok) - sum(b_ok)) / len(ids),
                                     "mcnemar_p": mcnemar_exact(a_ok, b_ok)["p_value"],
                                     "bootstrap": paired_bootstrap(a_ok, b_ok, n_boot=2000, seed=0)}
            rows.append(row)
    summary = {"rows": rows, "mechanism": mech}
    write_json_atomic(out / "summary.json", summary)
    print(f"\n{'policy':<28}{'steps':>6}{'n':>6}{'acc':>8}{'remask/blk':>11}{'NFE':>6}{'diff':>8}{'McNemar p':>11}")
    for r in rows:
        vs = r.get("vs_entropy")
        tail = f"{vs['diff']:>+8.3f}{vs['mcnemar_p']:>11.3g}" if vs else f"{'':>8}{'':>11}"
        print(f"{r['policy']:<28}{r['steps']:>6}{r['n']:>6}{r['accuracy']:>8.3f}{r['remasks_per_block']:>11.1f}{r['nfe']:>6.1f}{tail}")
    for m in mech:
        share = "n/a" if m["same_token_share"] is None else f"{m['same_token_share']:.3f}"
        extra = m.get("extra_hidden_per_block")  # absent in records written before the learned count
        tail = "" if extra is None else f", {extra:.2f} positions/block hidden beyond K_n"
        print(f"mechanism {m['policy']}: {m['recommits']} re-commits, same token {share}{tail}")
    return summary


def main(argv=None) -> Optional[dict]:
    (a,) = parse_args([ExperimentArgs], argv, description=__doc__)
    setup_logging()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.max_seconds if a.max_seconds > 0 else None
    if a.phase in ("search", "all"):
        for variant in (VARIANTS if a.phase == "all" else [a.variant]):
            run_search(a, variant, deadline)
    if a.phase == "rl":
        return run_rl(a, a.rl_variant, deadline)
    if a.phase == "all":
        run_rl(a, RL_RECOMMENDED, deadline)
    if a.phase in ("eval", "all"):
        return run_eval(a, deadline)
    return None


if __name__ == "__main__":
    run_main(main)
