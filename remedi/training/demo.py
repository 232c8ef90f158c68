"""What the training scripts do when run with no flags: a short demo of the embedded model's shipped recipe.

Without flags the library defaults would start a long run that teaches little (a Linear head at batch 1
for one pass over 20,000 problems, saved only at the end). Instead the scripts apply these flags, which
are the shipped recipe of ``scripts/build_embedded.sh`` (stage ``ups``, resp. ``lora``; the metadata of
``checkpoints/remedi-tiny-gsm/ups_head.pt``): MLP head of width 128 on the embedded backbone, r 0.1 with
replacements drawn from the batch, lambda 1, plain prompts, rows padded per batch to at most 192 tokens;
LoRA r 16 / alpha 32 / no dropout for the joint run. Only the budget is smaller (150 steps of 32 problems
instead of 600 of 256; the LoRA demo 60 of 32) with a larger learning rate, so it finishes in about a
minute on two CPU cores and still ends with a head that separates right from wrong tokens (AUROC about
0.97 on unmasked and 0.95 on masked positions after the 150 steps, against 0.995 / 0.969 shipped). The problems
are generated with seed 0, which keeps them apart from the model's held-out validation and test files.
Any flag on the command line turns the demo off: the documented commands keep their meaning.
"""
from __future__ import annotations

import logging

SHARED = ["--dataset", "arith", "--arith_n", "5000", "--seed", "0", "--prompt_format", "plain", "--seq_len", "192",
          "--pad_to", "batch", "--ups_width", "128", "--lambda_ups", "1.0", "--r_incorrect", "0.1",
          "--incorrect_source", "batch", "--batch_size", "32", "--log_every", "10"]
DEMO_FLAGS = {
    "train_remask_sft": SHARED + ["--ups_arch", "head", "--max_steps", "150", "--warmup_steps", "10", "--lr", "3e-3",
                                  "--save_every", "50"],
    "train_remask_lora": SHARED + ["--max_steps", "60", "--warmup_steps", "5", "--lora_r", "16", "--lora_alpha",
                                   "32", "--lora_dropout", "0.0", "--lora_target", "auto", "--lr_lora", "1e-3",
                                   "--lr_ups", "3e-3", "--train_mode", "joint", "--save_every", "20"],
}


log = logging.getLogger(__name__)


def demo_flags(script: str) -> list[str]:
    if script not in DEMO_FLAGS:
        raise ValueError(f"no demo recipe for {script!r}; scripts with one: {', '.join(DEMO_FLAGS)}")
    return list(DEMO_FLAGS[script])


def announce(script: str) -> str:
    """The log line a demo run starts with: what it is, and the command it equals."""
    return (f"no flags given: running the demo recipe (the embedded model's shipped {script} recipe, shortened to "
            f"about a minute on a CPU; pass any flag to train your own run). Same as:\n  python remedi/{script}.py "
            + " ".join(demo_flags(script)))


def summary(result: dict) -> str:
    """The log line a demo run ends with: where its files are and how to use them."""
    paths = result.get("paths", {})
    out = result.get("output_dir", "?")
    lines = [f"demo finished after {result.get('step')} steps; metrics: {out}/metrics.jsonl, checkpoints: "
             f"{out}/checkpoints"]
    for k, v in paths.items():
        lines.append(f"  {k}: {v}")
    if "ups" in paths:
        cmd = f"python remedi/eval_gsm_math.py --ups_head {paths['ups']}"
        if "lora" in paths:
            cmd += f" --lora_path {paths['lora']}"
        lines.append(f"evaluate it: {cmd} --max_samples 50 --sources llada_low_confidence,tps_prob,ups")
    lines.append(f"plot the curves: python -m remedi.training.plots {out}/metrics.jsonl --out {out}/curves.png")
    return "\n".join(lines)


RL_DEMO = ("no flags given: running the Remask RL demo (the embedded model and its shipped UPS head, a few GRPO "
           "updates on generated arithmetic problems, about a minute on a CPU; too short to improve the head: it shows "
           "the loop and its files). Pass any flag to train your own run; the LLaDA-8B recipe is "
           "configs/llada8b_rl.yaml")


def rl_summary(result: dict) -> str:
    """The log lines the RL demo ends with: what it wrote and how to evaluate the result."""
    out = result.get("output_dir", "?")
    paths = {k: v for k, v in result.get("paths", {}).items() if v}
    lines = [f"RL demo finished after {result.get('update')} updates; it wrote:",
             f"  metrics.jsonl: {out}/metrics.jsonl (one line per update: reward, accuracy, remasks, ...)",
             f"  args.json: {out}/args.json (replay with --config {out}/args.json --output_dir NEW)"]
    lines += [f"  {k}: {v}" for k, v in paths.items()]
    if "ups" in paths:
        lines.append(f"evaluate it against the heuristics: python remedi/eval_gsm_math.py --ups_head {paths['ups']} "
                     "--max_samples 50 --sources entropy,tps_prob,ups")
    return "\n".join(lines)


def run_script(script: str, argv, description: str) -> dict:
    """A training script's main: parse ``argv`` (the demo recipe when it is empty), train, report."""
    import sys

    from remedi.arguments import parse_args, setup_logging
    from remedi.training.args import SCRIPT_ARGS, other_script_hint
    from remedi.training.loop import run

    argv = list(sys.argv[1:] if argv is None else argv)
    is_demo = not argv
    if is_demo:
        argv = demo_flags(script)
        setup_logging()
        log.info(announce(script))
    margs, dargs, targs, extra = parse_args(list(SCRIPT_ARGS[script]), argv, description=description,
                                            unknown_hint=other_script_hint(script))
    result = run(margs, dargs, targs, extra, script=script)
    if is_demo:
        log.info(summary(result))
    return result
