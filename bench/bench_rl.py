"""One Remask-RL update on random-weight LLaDA-8B (bf16) on one GPU: rollout speed, update time, memory.

    python bench/bench_rl.py --out bench/results/rl_h200.json     # one H200, three cases, a few minutes
    python bench/bench_rl.py --smoke                              # CPU, tiny config (tests run this)

An update is what remedi.rl.trainer runs per optimiser step, with the library's own pieces: the rollout
(:func:`remedi.rl.rollout.rollout`: prompts x group rollouts, block-causal KV cache, joint token / PL
policy), group advantages of random 0/1 rewards, S = steps per block loss passes (block-causal layout
[prompt | final | x_t], forward + backward of the clipped surrogate, :func:`remedi.rl.loss.step_loss`),
gradient clipping and AdamW. Cases:

* ``lora_head``: LoRA r16 on every backbone block linear + a linear UPS head (float32), backbone bf16;
* ``stream``: the paper's UPS stream (4 blocks, float32 master weights, ~0.94B), backbone frozen bf16;
* ``head``: a linear head on the frozen backbone (the loss passes share [prompt | final], no backbone graph).

Default sizes: 2 prompts x 4 rollouts, prompt 64 tokens, gen 128, block 32, 64 steps (16 per block as
the authors), T_tok = T_pos = 1.2, the block-causal layout with its KV cache (``--layout bidirectional``:
the sampler's whole-sequence view, no cache). Reported: rollout tokens/s (generated tokens / rollout seconds) and
forwards, loss-pass seconds, optimiser-step seconds, the whole update, peak GPU memory, and the ratio
range at the gradient (the cached bf16 rollout vs the one-pass layout; 1 in exact arithmetic).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, print_table, random_model, write_record  # noqa: E402

from remedi.model.loading import LORA_AUTO_TARGET, SpecialIds  # noqa: E402
from remedi.rl.loss import StepStats, clean_prefix_cache, step_loss  # noqa: E402
from remedi.rl.policy import group_advantages  # noqa: E402
from remedi.rl.rollout import RolloutConfig, rollout  # noqa: E402
from remedi.training.build import adamw  # noqa: E402

CASES = ("lora_head", "stream", "head")


def build(case: str, config: str, device: str, dtype: torch.dtype):
    """Random-weight model for a case; returns (model, trainable parameters)."""
    lm = random_model(config, ups="stream" if case == "stream" else "head", device=device, dtype=dtype)
    for p in lm.parameters():
        p.requires_grad_(False)
    for m in lm.ups_modules():
        m.to(torch.float32)  # float32 master weights for what trains, as the trainer keeps them
    if case == "lora_head":
        from peft import LoraConfig, get_peft_model

        lm.model = get_peft_model(lm.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=LORA_AUTO_TARGET))
    elif case not in CASES:
        raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
    for m in lm.ups_modules():
        for p in m.parameters():
            p.requires_grad_(True)
    return lm.eval(), [p for p in lm.parameters() if p.requires_grad]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_update(lm, params, opt, prompts, rcfg, ids, group: int, seed: int, shared_prefix: bool, autocast):
    """One optimiser step of Remask RL (see the module docstring); returns timings and ratio statistics."""
    device = next(lm.parameters()).device
    n = len(prompts)
    gens = [torch.Generator(device=device).manual_seed(seed * 1000 + i) for i in range(n)]
    sync(device)
    t0 = time.perf_counter()
    with autocast():
        batch = rollout(lm, prompts, rcfg, ids, gens)
    sync(device)
    t1 = time.perf_counter()
    rewards = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5).float()
    adv = group_advantages(rewards, group).to(device)
    stats = StepStats()
    with autocast():
        cache = clean_prefix_cache(lm, batch) if shared_prefix else None
    for i in range(rcfg.steps_per_block):
        with autocast():
            loss, st = step_loss(lm, batch, i, adv, rcfg, ids.mask, normaliser=float(n), cache=cache)
        loss.backward()
        stats.add(st)
    sync(device)
    t2 = time.perf_counter()
    gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    rec = stats.record()
    return {"rollout_s": t1 - t0, "loss_s": t2 - t1, "step_s": t3 - t2, "update_s": t3 - t0,
            "forwards": batch.forwards, "grad_norm": float(gn),
            "remasks_per_block": float(batch.remasks.float().mean()),
            **{k: rec[k] for k in ("tok_ratio_min", "tok_ratio_max", "pl_ratio_min", "pl_ratio_max",
                                   "tok_abs_log_ratio", "pl_abs_log_ratio")}}


def run_case(case: str, a, device: torch.device) -> dict:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    lm, params = build(case, a.config, str(device), dtype)
    cfg = lm.config
    ids = SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id, pad=cfg.pad_token_id)
    g = torch.Generator().manual_seed(0)
    base = [torch.randint(10, min(cfg.vocab_size, 30000), (a.prompt_len,), generator=g).tolist()
            for _ in range(a.prompts)]
    prompts = [p for p in base for _ in range(a.group)]
    cache = "prefix" if a.layout == "block_causal" else "none"
    rcfg = RolloutConfig(a.gen, a.block, a.steps, 1.2, 1.2, cache, a.layout).validate()
    opt = adamw([{"params": params}], lr=3e-6)  # as remedi/rl/trainer.py
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        contextlib.nullcontext
    shared = case == "head" and a.layout == "block_causal"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for w in range(a.warmup):
        one_update(lm, params, opt, prompts, rcfg, ids, a.group, 100 + w, shared, autocast)
    recs = [one_update(lm, params, opt, prompts, rcfg, ids, a.group, i, shared, autocast) for i in range(a.iters)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    mean = {k: sum(r[k] for r in recs) / len(recs) for k in recs[0]}
    n_gen = len(prompts) * a.gen
    row = {"case": case, "rollouts": len(prompts), "gen": a.gen, "steps": a.steps,
           "rollout_s": round(mean["rollout_s"], 2), "rollout_tok_s": round(n_gen / mean["rollout_s"], 1),
           "forwards": int(mean["forwards"]), "loss_s": round(mean["loss_s"], 2), "step_s": round(mean["step_s"], 3),
           "update_s": round(mean["update_s"], 2), "peak_gib": None if peak is None else round(peak, 1),
           "trainable_m": round(sum(p.numel() for p in params) / 1e6, 1),
           "tok_ratio": f"{min(r['tok_ratio_min'] for r in recs):.3f}..{max(r['tok_ratio_max'] for r in recs):.3f}",
           "pl_ratio": f"{min(r['pl_ratio_min'] for r in recs):.3f}..{max(r['pl_ratio_max'] for r in recs):.3f}",
           "pl_abs_log_ratio": round(mean["pl_abs_log_ratio"], 4),
           "tok_abs_log_ratio": round(mean["tok_abs_log_ratio"], 4),
           "remasks_per_block": round(mean["remasks_per_block"], 1)}
    del lm, params, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llada-8b")
    ap.add_argument("--cases", default="lora_head,stream,head", help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layout", default="block_causal", choices=("block_causal", "bidirectional"),
                    help="rollout / loss layout (bidirectional: no KV cache, n_blocks x the loss compute)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates first (CUDA/cuBLAS warm-up)")
    ap.add_argument("--iters", type=int, default=2, help="timed updates (averaged)")
    ap.add_argument("--smoke", action="store_true", help="CPU, test-tiny config, tiny sizes (a test runs this)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.config, a.prompts, a.group, a.prompt_len, a.gen, a.block, a.steps, a.warmup, a.iters = \
            "test-tiny", 2, 2, 6, 16, 8, 8, 0, 1
        device = torch.device("cpu")
        torch.set_num_threads(1)  # thousands of tiny ops: thread hand-offs cost more than they give
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --smoke for the CPU check)")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for case in a.cases.split(","):
        t = time.perf_counter()
        try:
            row = run_case(case, a, device)
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            row = {"case": case, "error": "out of memory"}
        row["case_wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(row, flush=True)
    cols = ["case", "rollouts", "gen", "steps", "rollout_s", "rollout_tok_s", "forwards", "loss_s", "step_s",
            "update_s", "peak_gib", "trainable_m", "tok_ratio", "pl_ratio", "case_wall_s"]
    record = {"bench": "rl", **environment(), "config": a.config, "smoke": a.smoke,
              "settings": {k: getattr(a, k) for k in ("prompts", "group", "prompt_len", "gen", "block", "steps",
                                                      "layout", "warmup", "iters")},
              "rows": rows}
    write_record(a.out, record)
    print_table(rows, cols)
    return record


if __name__ == "__main__":
    main()
