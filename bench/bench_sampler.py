"""Sampler speed on random-weight LLaDA-8B in bf16: LLaDA's reference sampler, the exact mode, the cached remask
sampler, eager / compiled / static-buffer CUDA graphs, side by side in one run.

    PYTHONUNBUFFERED=1 python bench/bench_sampler.py --out runs/sampler               # one H200, < 8.5 min
    python bench/bench_sampler.py --modes eager --caches none,prefix,dual --out ...   # the eager grid only
    python bench/bench_sampler.py --smoke --out /tmp/s                                 # CPU smoke test, tiny config

Prompt 200, gen 256, block 32, steps 256 (8 blocks of 32 steps) at batch 1 and 8. Runs:

* ``reference``: LLaDA's ``generate.py`` algorithm (arXiv:2502.09992) transcribed onto the native model: the whole
  sequence's logits every step, float64 softmax over it, a top-k per row with its host syncs; eager only.
  Every ratio "x_ref" is against this in-run measurement ("x_ref_fig": against the 52 / 66 tok/s measured
  outside the project with the hub model).
* ``exact``: the project's exact LLaDA mode (llada_low_confidence, no cache).
* ``ups/head``, ``ups/stream``: the remask sampler ranked by the head / stream UPS with ``--caches``;
  ``ups/head thr0.9``: the same with threshold decoding (with random weights almost nothing reaches the
  threshold, so it runs ~1 token per step: this measures the cost of its per-step host check).

each in the ``--modes``: ``eager``, ``graphs`` (static buffers + CUDA graphs, ``SamplerConfig.graphs``),
``compile+graphs`` and ``compile`` (``RemeDiLM.compile_blocks``). Runs go in that order (compilation works in
place, so every uncompiled run comes first; the headline mode before plain compile); a run whose estimated
cost would end past ``--max_minutes`` is skipped and listed, a run that fails prints its error and the others
go on, the JSON is rewritten after every run, and a watchdog prints the table and exits at ``--hard_minutes``
whatever is running.

Uncached runs cost the same every step, so they are timed over ``--none_steps`` steps and scaled; cached
runs are timed whole (a block's first step is a full forward, the others are not). Every timed run follows
an untimed warm-up of the same shapes (and captures), and is followed by a steady-state probe of a few of a
block's later steps (the cached partial steps; full steps without a cache): their wall time without the
profiler (``step_ms``), then, under torch.profiler, GPU kernels, launch calls (a graph replay is one) and
host-sync calls per step, and the GPU's busy fraction (kernel time / ``step_ms``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Watchdog, add_decoding_size_args, environment, matmul_tflops, print_table, profile_counts,  # noqa: E402
                    random_model, write_run_json)

from remedi.model.loading import SpecialIds  # noqa: E402
from remedi.decoding import sampler as S  # noqa: E402
from remedi.decoding.graphs import release_decoders, static_decoder  # noqa: E402
from remedi.decoding.sampler import SamplerConfig, generate  # noqa: E402

REFERENCE_TOK_S = {1: 52.0, 8: 66.0}  # LLaDA's generate.py, H200, random-weight 8B bf16 (arXiv:2502.09992)
GOALS = {"exact": {1: 1.5, 8: 1.5}, "cached": {1: 4.0, 8: 10.0}}  # x over REFERENCE_TOK_S
MODES = ("eager", "graphs", "compile+graphs", "compile")  # run order: in-place compilation comes last


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


# --------------------------------------------------------------------------------- LLaDA's reference
@torch.inference_mode()
def llada_reference_generate(model, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int,
                             mask_id: int) -> torch.Tensor:
    """LLaDA's ``generate.py`` (LLaDA, arXiv:2502.09992, "The reference sampler"): low_confidence, temperature 0, no CFG,
    equal-length prompts. Logits over the whole sequence each step, softmax in float64 over all of them,
    confidence -inf after the block and at decoded positions, then a top-k per row (a host sync per row)
    and a boolean-mask write (another)."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    nb = gen_length // block_length
    s = steps // nb
    for blk in range(nb):
        hi = P + (blk + 1) * block_length
        m = (x[:, hi - block_length:hi] == mask_id).sum(1, keepdim=True)  # (B, 1)
        counts = m // s + (torch.arange(s, device=x.device)[None, :] < m % s).long()  # (B, s)
        for i in range(s):
            mask_index = x == mask_id
            logits = model(x).logits  # (B, T, V), no out_slice: the reference computes them all
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)  # (B, T)
            x0_p[:, hi:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -torch.inf))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, sel = torch.topk(confidence[j], k=int(counts[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
    return x


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    label: str
    ups: Optional[str]  # the model's UPS (None: the reference, run on the first UPS's model)
    strategy: str
    cache: str
    mode: str
    batch: int
    threshold: Optional[float] = None

    def name(self) -> str:
        return f"{self.label} {self.cache} {self.mode} batch {self.batch}"


def make_plan(args) -> list[Run]:
    wanted = args.modes.split(",")
    bad = [m for m in wanted if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    ups_list, batches, caches = args.ups.split(","), [int(b) for b in args.batches.split(",")], args.caches.split(",")
    plan = []
    for mode in [m for m in MODES if m in wanted]:
        for ups in ups_list:
            for batch in batches:
                first = ups == ups_list[0]
                if first and mode == "eager" and args.reference:
                    plan.append(Run("reference", ups, "llada_low_confidence", "none", "eager", batch))
                if first and args.exact:
                    plan.append(Run("exact", ups, "llada_low_confidence", "none", mode, batch))
                plan += [Run(f"ups/{ups}", ups, "ups", c, mode, batch) for c in caches]
                if args.threshold and first and batch == batches[0]:
                    plan.append(Run(f"ups/{ups} thr{args.threshold:g}", ups, "ups", args.threshold_cache, mode, batch,
                                    args.threshold))
    return plan


def random_prompts(cfg, batch: int, length: int, seed: int) -> list[list[int]]:
    """Random ids that avoid the special tokens (the mask must not appear in a prompt)."""
    g = torch.Generator().manual_seed(seed)
    special = {cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id}
    rows = torch.randint(0, cfg.vocab_size, (batch, length), generator=g).tolist()
    return [[t if t not in special else (t + 7) % cfg.vocab_size for t in r] for r in rows]


def _gens(batch: int, device: str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(i) for i in range(batch)]


def time_generate(model, prompts, scfg: SamplerConfig, ids: SpecialIds, device: str) -> tuple[float, int]:
    """Wall seconds of one generate call (device synchronised) and the NFE of its first row."""
    gens = _gens(len(prompts), device)
    sync(device)
    t = time.perf_counter()
    out = generate(model, prompts, scfg, ids, gens)
    sync(device)
    return time.perf_counter() - t, out[0].nfe


def token_agreement(model, prompts, a: SamplerConfig, b: SamplerConfig, ids: SpecialIds, device: str) -> float:
    """Fraction of identical generated tokens between two configs (the EOS-cut tails count as EOS)."""
    outs = [generate(model, prompts, c, ids, _gens(len(prompts), device)) for c in (a, b)]
    G = a.gen_length
    same = sum(sum(u == v for u, v in zip(x.tokens + [ids.eos] * (G - len(x.tokens)),
                                          y.tokens + [ids.eos] * (G - len(y.tokens)))) for x, y in zip(*outs))
    return round(same / (G * len(prompts)), 4)


def steady_probe(model, prompts, scfg: SamplerConfig, ids: SpecialIds, device: str, n_steps: int) -> dict:
    """Wall time and profiler counts per step of block 0's later steps, through the decoder the run used
    (already compiled and captured): step 0 (the full forward) and one step untimed, ``n_steps`` timed
    without the profiler, ``n_steps`` under it. Without a cache these are full steps."""
    cuda = device.startswith("cuda")
    ctx = S._compile_context() if scfg.compile else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        x, attn, P = S.layout_batch(prompts, scfg.gen_length, ids, device)
        dec = static_decoder(model, scfg, ids, x, attn, P) if scfg.graphs else S.EagerDecoder(model, scfg, ids, x,
                                                                                               attn, P)
        B, Lb = len(prompts), scfg.block_length
        gens, running = _gens(B, device), [True] * B
        gens = [None] * B if scfg.temperature == 0 and scfg.strategy not in S.RANDOM_STRATEGIES else gens
        dec.begin_block(0, P, P + Lb, list(range(B)))
        counter = iter(range(scfg.steps_per_block if scfg.threshold is None else Lb))

        def steps(k):
            for _ in range(k):
                n = next(counter)
                dec.step(n, n == 0, gens, running)

        steps(2)
        sync(device)
        t = time.perf_counter()
        steps(n_steps)
        sync(device)
        step_ms = (time.perf_counter() - t) / n_steps * 1e3
        prof = profile_counts(lambda: steps(n_steps), cuda)
    out = {"step_ms": round(step_ms, 2)}
    out.update({k + "_step": (None if v is None else round(v / n_steps, 3 if k == "gpu_ms" else 1))
                for k, v in prof.items()})
    return out


def run_one(model, run: Run, args, ids, rate, bw, dtype_bytes) -> dict:
    cfg = model.config
    dev = args.device
    prompts = random_prompts(cfg, run.batch, args.prompt_len, seed=run.batch)
    scale, probe = 1.0, {}
    if run.label == "reference":
        steps = args.none_steps if args.none_steps < args.steps else args.steps
        scale = args.steps / steps
        prompt = torch.tensor(prompts, device=dev)
        nb = args.gen_length // args.block_length
        llada_reference_generate(model, prompt, nb, args.gen_length, args.block_length, ids.mask)  # warm-up
        sync(dev)
        t = time.perf_counter()
        llada_reference_generate(model, prompt, steps, args.gen_length, args.block_length, ids.mask)
        sync(dev)
        wall, nfe, timed = time.perf_counter() - t, steps, None
        if args.probe_steps:
            try:
                prof = profile_counts(lambda: llada_reference_generate(model, prompt, nb, args.gen_length,
                                                                       args.block_length, ids.mask),
                                      dev.startswith("cuda"))
                probe = {k + "_step": (None if v is None else round(v / nb, 3 if k == "gpu_ms" else 1))
                         for k, v in prof.items()}
            except Exception as e:
                traceback.print_exc()
                probe = {"probe_error": f"{type(e).__name__}: {str(e)[:200]}"}
        floor_cfg = SamplerConfig(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length)
    else:
        base = SamplerConfig(strategy=run.strategy, steps=args.steps, gen_length=args.gen_length,
                             block_length=args.block_length, cache=run.cache, threshold=run.threshold,
                             compile="compile" in run.mode, graphs="graphs" in run.mode)
        timed = base
        if run.cache == "none" and run.threshold is None and args.none_steps < args.steps:
            timed = replace(base, steps=args.none_steps)
            scale = args.steps / args.none_steps
        timed.validate()
        if run.threshold is None:  # warm-up with the same shapes: a cached run needs its partial steps too
            warm = replace(timed, steps=timed.num_blocks * (1 if run.cache == "none" else 2))
        else:  # threshold: the whole run when graphs are captured in it, else one step per block
            warm = timed if timed.graphs else replace(timed, threshold=1e-9)
        time_generate(model, prompts, warm, ids, dev)
        if timed.graphs and run.threshold is None and args.check:
            # on the GPU itself: the replayed graphs against the same static step uncaptured (the same kernels:
            # expect 1.0) and against the eager decoder (bf16: equal up to rounding), over the warm-up's steps
            try:
                probe["match_uncaptured"] = token_agreement(model, prompts, warm, replace(warm, graph_capture=False),
                                                            ids, dev)
                probe["match_eager"] = token_agreement(model, prompts, warm, replace(warm, graphs=False), ids, dev)
            except Exception as e:
                traceback.print_exc()
                probe["check_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        walls = [time_generate(model, prompts, timed, ids, dev) for _ in range(args.repeats)]
        wall, nfe = statistics.median(w for w, _ in walls), walls[0][1]
        if args.probe_steps:
            n = min(args.probe_steps, max(1, (timed.steps_per_block - 2) // 2)) if run.threshold is None else \
                args.probe_steps
            try:  # the timing stands even if the profiler fails
                probe.update(steady_probe(model, prompts, timed, ids, dev, n))
                if timed.graphs and dev.startswith("cuda") and not probe.get("kernels_step"):
                    # the profiler did not see the kernels inside graph replays: take the GPU time of the same
                    # static step launched kernel by kernel (the same kernels)
                    alt = steady_probe(model, prompts, replace(timed, graph_capture=False), ids, dev, n)
                    probe.update(gpu_ms_step=alt["gpu_ms_step"], kernels_step=alt["kernels_step"],
                                 gpu_from="uncaptured")
            except Exception as e:
                traceback.print_exc()
                probe["probe_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        floor_cfg = base
    steps_total = nfe * scale if run.threshold is not None else args.steps
    wall_total = wall * scale
    tok_s = run.batch * args.gen_length / wall_total
    ms_step = wall_total / steps_total * 1e3
    floor = None if run.threshold is not None else \
        floor_seconds(cfg, floor_cfg, run.batch, args.prompt_len, len(cfg.ups_taps), rate, bw, dtype_bytes)
    step_ms = probe.get("step_ms") or ms_step
    gpu = probe.get("gpu_ms_step")
    row = {"run": run.label, "ups": run.ups if run.label.startswith("ups/") else "-", "strategy": run.strategy,
           "cache": run.cache, "mode": run.mode, "batch": run.batch, "threshold": run.threshold,
           "steps_timed": None if timed is None else timed.steps, "scaled_x": round(scale, 2), "nfe_timed": nfe,
           "wall_s": round(wall_total, 3), "tok_s": round(tok_s, 1), "ms_per_step": round(ms_step, 2),
           "floor_s": None if floor is None else round(floor, 3),
           "frac_floor": None if floor is None else round(floor / wall_total, 3),
           "x_ref_fig": round(tok_s / REFERENCE_TOK_S[run.batch], 2) if run.batch in REFERENCE_TOK_S else None,
           "busy": None if gpu is None else round(min(gpu / step_ms, 1.0), 2),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev.startswith("cuda") else None,
           **probe}
    print(row, flush=True)
    return row


# ---------------------------------------------------------------------------------------------- main
TABLE = ["run", "cache", "mode", "batch", "tok_s", "ms_per_step", "x_ref", "x_ref_fig", "x_exact", "busy",
         "kernels_step", "launches_step", "syncs_step", "step_ms", "gpu_ms_step", "match_uncaptured", "match_eager",
         "peak_gib", "error"]


def summarise(record: dict) -> None:
    """Ratios against the in-run reference and exact mode, the final table, stream/head costs, goals."""
    rows = [r for r in record["rows"] if "tok_s" in r]
    ref = {r["batch"]: r["tok_s"] for r in rows if r["run"] == "reference"}
    exact = {r["batch"]: r["tok_s"] for r in rows if r["run"] == "exact" and r["mode"] == "eager"}
    for r in rows:
        r["x_ref"] = round(r["tok_s"] / ref[r["batch"]], 2) if r["batch"] in ref else None
        r["x_exact"] = round(r["tok_s"] / exact[r["batch"]], 2) if r["batch"] in exact else None
    order = {m: i for i, m in enumerate(MODES)}
    shown = sorted(record["rows"], key=lambda r: (r["batch"], r["run"] != "reference", r["run"], r["cache"],
                                                  order.get(r["mode"], 9)))
    print()
    print_table(shown, TABLE)
    head = {(r["cache"], r["mode"], r["batch"], r["threshold"]): r for r in rows if r["run"] == "ups/head"}
    costs = []
    for r in rows:
        h = head.get((r["cache"], r["mode"], r["batch"], r["threshold"]))
        if r["run"] == "ups/stream" and h:
            c = round(r["ms_per_step"] / h["ms_per_step"] - 1, 3)
            costs.append({"cache": r["cache"], "mode": r["mode"], "batch": r["batch"], "stream_over_head": c})
            print(f"stream UPS over head UPS, {r['cache']} {r['mode']} batch {r['batch']}: {100 * c:+.1f}% per step")
    goals = {}
    for b in sorted({r["batch"] for r in rows} & set(REFERENCE_TOK_S)):
        best_exact = max((r["tok_s"] for r in rows if r["run"] == "exact" and r["batch"] == b), default=None)
        best_cached = max((r["tok_s"] for r in rows if r["run"].startswith("ups/") and r["cache"] != "none"
                           and r["batch"] == b), default=None)
        for kind, best in (("exact", best_exact), ("cached", best_cached)):
            if best is not None:
                x = best / REFERENCE_TOK_S[b]
                goals[f"{kind}_batch{b}"] = {"best_tok_s": best, "x_reference": round(x, 2),
                                             "x_reference_in_run": round(best / ref[b], 2) if b in ref else None,
                                             "goal_x": GOALS[kind][b], "met": x >= GOALS[kind][b]}
    for k, v in goals.items():
        in_run = "no" if v["x_reference_in_run"] is None else f"{v['x_reference_in_run']}x the"
        print(f"goal {k}: {v['best_tok_s']} tok/s = {v['x_reference']}x the reference figure, {in_run} in-run "
              f"reference (goal {v['goal_x']}x): {'met' if v['met'] else 'NOT met'}")
    if record["skipped"]:
        print("skipped (time box): " + "; ".join(record["skipped"]))
    record.update(goals=goals, stream_costs=costs)


def _write(out_dir, record, final: bool) -> None:
    write_run_json(out_dir, "sampler.json", record, final)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decoding_size_args(ap)
    ap.add_argument("--none_steps", type=int, default=64, help="steps timed for the uncached runs (then scaled)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ups", default="head,stream", help="comma list of head|stream (UPS of the remask runs)")
    ap.add_argument("--caches", default="dual", help="comma list of none|prefix|dual for the remask runs")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {'|'.join(MODES)}")
    ap.add_argument("--no_reference", dest="reference", action="store_false",
                    help="skip LLaDA's reference sampler (timed in-run, eager, batch as --batches)")
    ap.add_argument("--no_exact", dest="exact", action="store_false", help="skip the exact mode runs")
    ap.add_argument("--threshold", type=float, default=0.9, help="threshold-decoding run (first UPS, first batch); "
                    "0 = none")
    ap.add_argument("--threshold_cache", default="dual")
    ap.add_argument("--probe_steps", type=int, default=4, help="steady-state steps timed and profiled per run "
                    "(0 = no probe)")
    ap.add_argument("--no_check", dest="check", action="store_false",
                    help="skip the token checks of the graphs runs (replayed vs uncaptured vs eager, warm-up steps)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max_minutes", type=float, default=7.0, help="skip the runs whose estimated end is later")
    ap.add_argument("--hard_minutes", type=float, default=8.25, help="print the table and exit at this time "
                    "whatever is running")
    ap.add_argument("--out", default=None, help="output folder (sampler.json)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny config, float32, short lengths")
    args = ap.parse_args(argv)
    if args.smoke:
        args.config, args.device, args.dtype = "test-tiny", "cpu", "float32"
        args.prompt_len, args.gen_length, args.block_length, args.steps, args.none_steps = 8, 32, 16, 16, 8
        args.batches = "1,2" if args.batches == ap.get_default("batches") else args.batches
        if args.modes == ap.get_default("modes"):
            args.modes = "eager,graphs"  # compile on CPU means minutes of C++ compilation
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --smoke (or --device cpu --config test-tiny) for a smoke test")
    t_start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    plan = make_plan(args)
    rows, skipped = [], []
    record = {"bench": "sampler", **environment(), "args": vars(args), "rows": rows, "skipped": skipped}

    def on_timeout():
        print(f"\nwatchdog: --hard_minutes {args.hard_minutes} reached during the run after "
              f"{rows[-1]['run'] if rows else 'none'}; the table so far:", flush=True)
        record["watchdog"] = True
        skipped.extend(r.name() for r in plan[len(rows) + len(skipped):])
        summarise(record)
        _write(args.out, record, final=True)
        sys.stdout.flush()
        os._exit(3)

    dog = Watchdog(args.hard_minutes, on_timeout)
    for name in ("cache_size_limit", "recompile_limit"):  # two models, batch 1 and 8, eager and static caches
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
    rate, bw = matmul_rate(args.device, dtype), copy_bandwidth(args.device)
    record.update(matmul_tflops=round(rate, 1), copy_gbs=round(bw, 1), reference_tok_s=REFERENCE_TOK_S)
    print(f"measured: matmul {rate:.4g} TFLOP/s ({args.dtype}), copy bandwidth {bw:.0f} GB/s; {len(plan)} runs "
          f"planned", flush=True)
    models, compiled, per_run, compile_est = {}, set(), [], 150.0
    for run in plan:
        elapsed = time.perf_counter() - t_start
        first_compile = "compile" in run.mode and (run.ups, run.batch) not in compiled
        est = (statistics.median(per_run) if per_run else 20.0) * (2 if run.batch > 1 else 1) + \
            (compile_est if first_compile and args.device.startswith("cuda") else 0.0)
        if elapsed + est > args.max_minutes * 60:
            skipped.append(run.name())
            print(f"skipped (estimated {est:.0f} s past --max_minutes {args.max_minutes}): {run.name()}", flush=True)
            continue
        print(f"[{elapsed:5.0f} s] {run.name()}", flush=True)
        t_run = time.perf_counter()
        try:
            if run.ups not in models:
                models[run.ups] = random_model(args.config, ups=run.ups, device=args.device, dtype=dtype)
            model = models[run.ups]
            cfg = model.config
            ids = SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id, pad=cfg.pad_token_id)
            rows.append(run_one(model, run, args, ids, rate, bw, dtype_bytes))
        except Exception as e:  # a failing mode must not take the others down
            traceback.print_exc()
            print(f"FAILED: {run.name()}: {type(e).__name__}: {e}", flush=True)
            rows.append({"run": run.label, "ups": run.ups, "cache": run.cache, "mode": run.mode, "batch": run.batch,
                         "threshold": run.threshold, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            if "compile" in run.mode:
                compiled.add((run.ups, run.batch))
            for m in models.values():
                release_decoders(m)
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        took = time.perf_counter() - t_run
        if first_compile:  # the next model's / batch's first compiled run is estimated from this one
            compile_est = max(30.0, took - (statistics.median(per_run) if per_run else 0.0))
        else:
            per_run.append(took)
        _write(args.out, record, final=False)
    dog.cancel()
    summarise(record)
    if not args.device.startswith("cuda") or args.config != "llada-8b":
        print("(not llada-8b on a GPU: the comparison with the reference figures means nothing here)")
    record["total_s"] = round(time.perf_counter() - t_start, 1)
    print(f"total bench time {record['total_s']:.0f} s" + (f"; {len(skipped)} runs skipped" if skipped else ""))
    _write(args.out, record, final=True)
    return record


if __name__ == "__main__":
    main()
