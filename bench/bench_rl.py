"""Remask-RL speed: one update on random-weight LLaDA-8B (bf16), or rollouts alone on the eager vs graph decoder.

    python bench/bench_rl.py --out bench/results/rl_h200.json     # one H200, three cases, a few minutes
    python bench/bench_rl.py --smoke                              # CPU, tiny config (tests run this)
    python bench/bench_rl.py --speed --out bench/results/rl_rollouts_h200.json   # embedded model, batch 8/64/256
    python bench/bench_rl.py --speed --smoke --out /tmp/rl_speed.json            # CPU, tiny (tests run this)

``--speed``: rollouts alone (:func:`remedi.rl.rollout.rollout`, the sampler's engine with the rollout rule)
on the embedded model (:data:`remedi.model.loading.EMBEDDED_MODEL` with its UPS head, in float32 as the RL trainer
runs it), random-token prompts of ``--prompt_len``,
for every batch of ``--batches`` and every decoder of ``--decoders`` side by side in one run: ``eager``
(the reference step) and ``graphs`` (static buffers; CUDA graphs on a GPU, the same step uncaptured on a
CPU). Each (batch, decoder) runs ``--warmup`` untimed rollouts (graph capture) then ``--iters`` timed ones.
Reported: rollouts/s, rollout tok/s (generated tokens / s), forwards, the speed-up over the in-run eager
row of the same batch, and whether the decoder's rollouts equal the eager ones token for token (same
seeds; exact in float32, up to rounding in bf16). Settings default to the embedded model's eval budget:
gen 96, block 32, 48 steps, the bidirectional layout, tokens and positions sampled at T 1.0.

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
import dataclasses
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


def speed_rows(a, device: torch.device) -> list[dict]:
    """The ``--speed`` table: rollouts/s of each decoder at each batch (see the module docstring)."""
    if a.smoke:
        lm = random_model("test-tiny", ups="head", device=str(device), dtype=torch.float32).eval()
        c = lm.config
        ids = SpecialIds(mask=c.mask_token_id, eos=c.eos_token_id, pad=c.pad_token_id)
    else:
        from remedi.model.loading import EMBEDDED_MODEL, load_for_inference

        loaded = load_for_inference(str(EMBEDDED_MODEL), ups_head=str(EMBEDDED_MODEL / "ups_head.pt"),
                                    device=str(device), dtype="float32")
        lm, ids = loaded.model, loaded.ids
    cache = "prefix" if a.layout == "block_causal" else "none"
    base = RolloutConfig(a.gen, a.block, a.steps, a.temperature, a.temperature, cache, a.layout).validate()
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in a.batches:
        prompts = [torch.randint(10, min(lm.config.vocab_size, 30000), (a.prompt_len,), generator=g).tolist()
                   for _ in range(batch)]
        finals = {}
        for dec in a.decoders:
            rcfg = dataclasses.replace(base, graphs=dec == "graphs")

            def run(seed):
                gens = [torch.Generator(device=device).manual_seed(seed * 100003 + i) for i in range(batch)]
                return rollout(lm, prompts, rcfg, ids, gens)

            for w in range(a.warmup):
                run(1000 + w)
            sync(device)
            t0 = time.perf_counter()
            for i in range(a.iters):
                out = run(i)
            sync(device)
            sec = (time.perf_counter() - t0) / a.iters
            finals[dec] = out.final
            row = {"batch": batch, "decoder": dec, "rollout_s": round(sec, 4),
                   "rollouts_per_s": round(batch / sec, 2), "rollout_tok_s": round(batch * a.gen / sec, 1),
                   "forwards": out.forwards}
            if "eager" in finals and dec != "eager":
                eager = next(r for r in rows if r["batch"] == batch and r["decoder"] == "eager")
                row["speedup_vs_eager"] = round(eager["rollout_s"] / sec, 2)
                row["rows_equal_eager"] = f"{int((finals[dec] == finals['eager']).all(1).sum())}/{batch}"
            elif dec == "eager":
                row["speedup_vs_eager"] = 1.0
            rows.append(row)
            print(row, flush=True)
    return rows


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
    ap.add_argument("--speed", action="store_true", help="rollouts alone: eager vs graph decoder at --batches "
                    "on the embedded model (see the module docstring)")
    ap.add_argument("--batches", default="8,64,256", help="--speed: comma list of rollout batch sizes")
    ap.add_argument("--decoders", default="eager,graphs", help="--speed: comma list of eager, graphs")
    ap.add_argument("--temperature", type=float, default=None,
                    help="--speed: T_tok = T_pos of the rollouts (default 1.0)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    a.argv = argv
    if a.speed:
        return speed_main(a)
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


def speed_main(a) -> dict:
    """``--speed``: check the flags, pick the device, run :func:`speed_rows`, write the record."""
    try:
        a.batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        raise SystemExit(f"error: --batches {a.batches!r} must be a comma list of integers, e.g. 8,64,256")
    a.decoders = a.decoders.split(",")
    bad = [d for d in a.decoders if d not in ("eager", "graphs")]
    if bad or any(b < 1 for b in a.batches):
        raise SystemExit(f"error: --decoders takes eager and/or graphs (got {a.decoders}); --batches positive "
                         f"integers (got {a.batches})")
    a.temperature = 1.0 if a.temperature is None else a.temperature
    defaults = {"gen": 96, "block": 32, "steps": 48, "layout": "bidirectional", "prompt_len": 64, "iters": 2}
    for k, v in defaults.items():  # the embedded model's eval budget unless given
        if f"--{k}" not in (sys.argv if a.argv is None else a.argv):
            setattr(a, k, v)
    if a.smoke:
        a.gen, a.block, a.steps, a.prompt_len, a.iters, a.warmup = 16, 8, 8, 6, 1, 1
        if "--batches" not in (sys.argv if a.argv is None else a.argv):
            a.batches = [2, 4]
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 rollouts, as the RL trainer on the embedded model
    RolloutConfig(a.gen, a.block, a.steps, a.temperature, a.temperature, "none", a.layout).validate()
    rows = speed_rows(a, device)
    record = {"bench": "rl_rollouts", **environment(), "smoke": a.smoke, "device": str(device),
              "settings": {k: getattr(a, k) for k in ("batches", "decoders", "prompt_len", "gen", "block", "steps",
                                                      "layout", "temperature", "warmup", "iters")},
              "rows": rows}
    write_record(a.out, record)
    print_table(rows, ["batch", "decoder", "rollout_s", "rollouts_per_s", "rollout_tok_s", "forwards",
                       "speedup_vs_eager", "rows_equal_eager"])
    return record


if __name__ == "__main__":
    main()
