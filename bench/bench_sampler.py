"""Sampler speed: LLaDA's exact mode against the cached remask sampler, on random-weight LLaDA-8B in bf16.

    python bench/bench_sampler.py --out bench/results/sampler.json           # one GPU, ~8 min on an H100
    python bench/bench_sampler.py --modes eager ...; ... --modes compile     # or in two shorter shots
    python bench/bench_sampler.py --config test-tiny --device cpu --prompt_len 16 --gen_length 64 \\
        --steps 64 --out /tmp/s.json                                         # smoke test of the code paths

Times ``remedi.decoding.sampler.generate`` for prompt 200, gen 256, block 32, steps 256 at batch 1 and 8:

* ``exact``: the project's exact LLaDA mode (llada_low_confidence, no cache), the in-run baseline;
* ``ups/head`` and ``ups/stream``: the remask sampler ranked by the head UPS and by the stream UPS,
  each with ``--cache none | prefix | dual``;

each eager and with ``--compile`` (RemeDiLM.compile_blocks; all eager runs come first, and runs that would
start after ``--max_minutes`` are skipped and listed, so one shot always returns numbers; the JSON is
rewritten after every run). Uncached runs cost the same every step (a
full forward over prompt + gen), so they are timed over ``--none_steps`` steps (default 64 = 2 blocks'
worth, spread over all 8 blocks) and scaled to 256 steps; cached runs are timed whole (a block's first
step is a full forward, the others are not, so they do not scale). Every timed run follows an untimed
warm-up of the same shapes.

Reported per run: tokens/s (batch * gen / wall), ms per step, speed-up over the in-run exact mode and
over the reference figures (LLaDA's own sampler on an H200: 52 tok/s at batch 1, 66 at batch 8), the
physical floor's fraction (the run's forwards at the matmul rate and the copy bandwidth measured in this
run: per forward max(FLOPs / rate, bytes read / bandwidth), bytes = bf16 weights + the KV cache's
keys/values) and peak memory. Random weights: speed does not depend on their values, but the argmax
tokens are meaningless (no threshold decoding here; see bench_threshold.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, matmul_tflops, print_table, random_model, write_record  # noqa: E402

from remedi.model.loading import SpecialIds  # noqa: E402
from remedi.decoding.sampler import SamplerConfig, generate  # noqa: E402

REFERENCE_TOK_S = {1: 52.0, 8: 66.0}  # LLaDA's generate.py, H200, random-weight 8B bf16 (LLADA.md)
GOALS = {"exact": {1: 1.5, 8: 1.5}, "cached": {1: 4.0, 8: 10.0}}  # x over REFERENCE_TOK_S (issue 7)


# ------------------------------------------------------------------------------------ card measurements
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Device memory bandwidth in GB/s: (read + write bytes) / time of a large tensor copy."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    a.fill_(1.0)
    times = []
    for i in range(8):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    del a, b
    return 2 * n * 2 / statistics.median(times) / 1e9


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Dense matmul TFLOP/s (bench.common's measurement on CUDA; a small one on the CPU)."""
    if device.startswith("cuda"):
        return matmul_tflops(dtype=dtype)
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * n ** 3 / (time.perf_counter() - t) / 1e12


# ---------------------------------------------------------------------------------------- the floor
def forward_cost(cfg, batch: int, tokens: int, keys: int, logits_tokens: int, stream_blocks: int,
                 dtype_bytes: int) -> tuple[float, float]:
    """(matmul FLOPs, bytes read) of one forward computing ``tokens`` positions that attend to ``keys``."""
    d, f, V = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size
    kv = cfg.n_kv_heads * cfg.head_dim
    blocks = cfg.n_layers + stream_blocks
    per_block = 2 * d * d + 2 * d * kv + 3 * d * f
    flops = 2 * batch * tokens * (per_block * blocks + stream_blocks * d * d)  # + the stream's bridges
    flops += 4 * batch * tokens * keys * d * blocks  # scores and values
    flops += 2 * batch * logits_tokens * d * V  # the LM head, on the block only
    weights = (per_block * blocks + stream_blocks * d * d + 2 * d * V) * dtype_bytes
    kv_bytes = 2 * blocks * batch * keys * kv * dtype_bytes
    return float(flops), float(weights + kv_bytes)


def floor_seconds(cfg, scfg: SamplerConfig, batch: int, prompt_len: int, stream_blocks: int, rate_tflops: float,
                  bw_gbs: float, dtype_bytes: int) -> float:
    """The sum over the run's forwards of max(FLOPs / rate, bytes / bandwidth)."""
    T, Lb, s = prompt_len + scfg.gen_length, scfg.block_length, scfg.steps_per_block
    total = 0.0
    for blk in range(scfg.num_blocks):
        lo = prompt_len + blk * Lb
        for n in range(s):
            full = scfg.cache == "none" or n == 0
            tokens = T if full else (T - lo if scfg.cache == "prefix" else Lb)
            fl, by = forward_cost(cfg, batch, tokens, T, Lb, stream_blocks, dtype_bytes)
            total += max(fl / (rate_tflops * 1e12), by / (bw_gbs * 1e9))
    return total


# ---------------------------------------------------------------------------------------------- runs
def random_prompts(cfg, batch: int, length: int, seed: int) -> list[list[int]]:
    """Random ids that avoid the special tokens (the mask must not appear in a prompt)."""
    g = torch.Generator().manual_seed(seed)
    special = {cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id}
    rows = torch.randint(0, cfg.vocab_size, (batch, length), generator=g).tolist()
    return [[t if t not in special else (t + 7) % cfg.vocab_size for t in r] for r in rows]


def time_generate(model, prompts, scfg: SamplerConfig, ids: SpecialIds, device: str) -> tuple[float, int]:
    """Wall seconds of one generate call (device synchronised) and the NFE of its first row."""
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(len(prompts))]
    sync(device)
    t = time.perf_counter()
    out = generate(model, prompts, scfg, ids, gens)
    sync(device)
    return time.perf_counter() - t, out[0].nfe


def run_one(model, label, strategy, cache, compiled, batch, args, ids, rate, bw, dtype_bytes) -> dict:
    cfg = model.config
    prompts = random_prompts(cfg, batch, args.prompt_len, seed=batch)
    base = SamplerConfig(strategy=strategy, steps=args.steps, gen_length=args.gen_length,
                         block_length=args.block_length, cache=cache, compile=compiled)
    timed = base
    scale = 1.0
    if cache == "none" and args.none_steps < args.steps:
        timed = SamplerConfig(**{**base.__dict__, "steps": args.none_steps})
        scale = args.steps / args.none_steps
    timed.validate()
    # warm-up with the same shapes (a cached run needs its partial forwards too: 2 steps per block)
    warm = SamplerConfig(**{**timed.__dict__, "steps": timed.num_blocks * (1 if cache == "none" else 2)})
    time_generate(model, prompts, warm, ids, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    walls = [time_generate(model, prompts, timed, ids, args.device) for _ in range(args.repeats)]
    wall = statistics.median(w for w, _ in walls) * scale
    nfe = walls[0][1]
    floor = floor_seconds(cfg, base, batch, args.prompt_len, len(cfg.ups_taps), rate, bw, dtype_bytes)
    tok_s = batch * args.gen_length / wall
    row = {"run": label, "strategy": strategy, "cache": cache, "mode": "compile" if compiled else "eager",
           "batch": batch, "steps_timed": timed.steps, "scaled_x": round(scale, 2), "nfe_timed": nfe,
           "wall_s": round(wall, 3), "tok_s": round(tok_s, 1), "ms_per_step": round(wall / args.steps * 1e3, 2),
           "floor_s": round(floor, 3), "frac_floor": round(floor / wall, 3),
           "x_reference": round(tok_s / REFERENCE_TOK_S[batch], 2) if batch in REFERENCE_TOK_S else None,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if args.device.startswith("cuda") else None}
    print(row, flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llada-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prompt_len", type=int, default=200)
    ap.add_argument("--gen_length", type=int, default=256)
    ap.add_argument("--block_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--none_steps", type=int, default=64, help="steps timed for the uncached runs (then scaled)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ups", default="head,stream", help="comma list of head|stream (UPS of the remask runs)")
    ap.add_argument("--caches", default="none,prefix,dual")
    ap.add_argument("--modes", default="eager,compile", help="comma list of eager|compile")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max_minutes", type=float, default=7.0,
                    help="skip the runs that would start after this (a compiled run may take 2-3 min more)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --config test-tiny) for a smoke test")
    dtype = getattr(torch, args.dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    t_start = time.perf_counter()
    rate, bw = matmul_rate(args.device, dtype), copy_bandwidth(args.device)
    print(f"measured: matmul {rate:.4g} TFLOP/s ({args.dtype}), copy bandwidth {bw:.0f} GB/s", flush=True)
    print(f"uncached runs are timed over {args.none_steps} of {args.steps} steps and scaled "
          f"x{args.steps / args.none_steps:g} (every uncached step is the same full forward)", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    ups_list = args.ups.split(",")
    rows, skipped = [], []
    record = {"bench": "sampler", **environment(), "matmul_tflops": round(rate, 1), "copy_gbs": round(bw, 1),
              "reference_tok_s": REFERENCE_TOK_S, "args": vars(args), "rows": rows, "skipped": skipped}
    for compiled in [m == "compile" for m in args.modes.split(",")]:  # every eager run before any compilation
        for ups in ups_list:
            # a fresh model per (mode, UPS): compile_blocks works in place
            model = random_model(args.config, ups=ups, device=args.device, dtype=dtype)
            cfg = model.config
            ids = SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id, pad=cfg.pad_token_id)
            for batch in batches:
                plan = [("exact", "llada_low_confidence", "none")] if ups == ups_list[0] else []
                plan += [(f"ups/{ups}", "ups", c) for c in args.caches.split(",")]
                for label, strategy, cache in plan:
                    if time.perf_counter() - t_start > args.max_minutes * 60:
                        skipped.append(f"{label} {cache} {'compile' if compiled else 'eager'} batch {batch}")
                        print(f"skipped (over --max_minutes {args.max_minutes}): {skipped[-1]}", flush=True)
                        continue
                    rows.append(run_one(model, label, strategy, cache, compiled, batch, args, ids, rate, bw,
                                        dtype_bytes))
                    _write_partial(args.out, record)
            del model
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            torch._dynamo.reset()
    exact = {(r["batch"], r["mode"]): r["tok_s"] for r in rows if r["run"] == "exact"}
    for r in rows:
        for key, mode in (("x_exact_eager", "eager"), ("x_exact_same_mode", r["mode"])):
            base = exact.get((r["batch"], mode))
            r[key] = round(r["tok_s"] / base, 2) if base else None
    print()
    print_table(rows, ["run", "cache", "mode", "batch", "tok_s", "ms_per_step", "x_reference", "x_exact_eager",
                       "x_exact_same_mode", "frac_floor", "peak_gib", "scaled_x"])
    goals = {}
    for b in batches:
        if b not in REFERENCE_TOK_S:
            continue
        best_exact = max((r["tok_s"] for r in rows if r["run"] == "exact" and r["batch"] == b), default=None)
        best_cached = max((r["tok_s"] for r in rows if r["run"].startswith("ups/") and r["cache"] != "none"
                           and r["batch"] == b), default=None)
        for kind, best in (("exact", best_exact), ("cached", best_cached)):
            if best is not None:
                x = best / REFERENCE_TOK_S[b]
                goals[f"{kind}_batch{b}"] = {"best_tok_s": best, "x_reference": round(x, 2),
                                             "goal_x": GOALS[kind][b], "met": x >= GOALS[kind][b]}
    for k, v in goals.items():
        print(f"goal {k}: {v['best_tok_s']} tok/s = {v['x_reference']}x the reference "
              f"(goal {v['goal_x']}x): {'met' if v['met'] else 'NOT met'}")
    if not args.device.startswith("cuda") or args.config != "llada-8b":
        print("(not llada-8b on a GPU: the comparison with the reference figures means nothing here)")
    total = time.perf_counter() - t_start
    print(f"total bench time {total:.0f} s" + (f"; {len(skipped)} runs skipped" if skipped else ""))
    record.update(goals=goals, total_s=round(total, 1))
    write_record(args.out, record)


def _write_partial(path, record) -> None:
    """The record so far (a run cut short by a time limit still leaves its numbers)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps({**record, "partial": True}, indent=2) + "\n")
        tmp.replace(path)


if __name__ == "__main__":
    main()
