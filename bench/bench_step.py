"""Cached decoding step time, unfused vs fused projections (issue 23), random-weight LLaDA-8B bf16, one run.

    PYTHONUNBUFFERED=1 python bench/bench_step.py --out runs/step             # one H200, < 9 min
    python bench/bench_step.py --profile --batches 1 --out runs/step_prof    # + kernels / launches per step
    python bench/bench_step.py --smoke --out /tmp/step                       # CPU smoke test, tiny config

Prompt 200, gen 256, block 32, steps 256 (8 blocks of 32 steps), the remask sampler ranked by a head UPS
with the dual cache, at batch 1 and 8, for every ``--modes`` (``eager``, ``graphs``, ``compile+graphs``,
``compile``; compilation works in place, so the uncompiled modes run first) and both variants: ``unfused``
(the model as loaded) and ``fused`` (:meth:`RemeDiLM.fuse_projections`: one q|k|v and one gate|up product per
block), the same model toggled between them. Each run is a warm-up generation (2 steps a block: compiles and
captures every step shape) and one timed generation: its wall time gives tok/s and ms/step; a device event
after every step gives the partial (cached) step's median ``step_ms`` and the full step's ``full_ms``.
``x_unfused``: the unfused run of the same mode and batch over this one; ``x_eager``: the unfused eager run
of the same batch over this one. The floor of a cached step is max(bytes read / measured copy bandwidth,
matmul FLOPs / measured matmul rate) (``read_ms`` is the first term: the weights plus the KV cache);
``frac_floor`` = floor / step_ms. ``match`` is the fraction of generated tokens a fused run shares with its
unfused run (bf16: rounding may flip a few). With ``--profile``, GPU kernels, launch calls and host syncs
per cached step (bench_sampler's steady-state probe). A run whose estimated end passes ``--max_minutes`` is
skipped, a failed run prints its error and the rest go on, the JSON is rewritten after every run, and a
watchdog prints the table and exits at ``--hard_minutes``.
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
from dataclasses import replace
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import copy_bandwidth, forward_cost, matmul_rate, random_prompts, steady_probe  # noqa: E402
from common import (Watchdog, add_decoding_size_args, environment, print_table, random_model,  # noqa: E402
                    write_run_json)

from remedi.decoding import sampler as S  # noqa: E402
from remedi.decoding.graphs import release_decoders  # noqa: E402
from remedi.decoding.sampler import SamplerConfig, decode_blocks  # noqa: E402
from remedi.model.loading import SpecialIds  # noqa: E402

MODES = ("eager", "graphs", "compile+graphs", "compile")  # run order: in-place compilation comes last
VARIANTS = ("unfused", "fused")
TABLE = ["mode", "batch", "variant", "tok_s", "ms_per_step", "step_ms", "full_ms", "x_unfused", "x_eager",
         "floor_ms", "read_ms", "frac_floor", "match", "kernels_step", "launches_step", "busy", "error"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepClock:
    """``on_step`` hook: a device event (CUDA) or a host time (CPU, synchronous) after every step."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list[tuple[int, object]] = []  # (n within the block, event or time)

    def __call__(self, blk, n, out) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((n, ev))
        else:
            self.marks.append((n, time.perf_counter()))

    def intervals(self) -> tuple[list[float], list[float]]:
        """(full-step ms, partial-step ms): each step's time since the previous step ended (the first step,
        with nothing before it, is left out)."""
        full, part = [], []
        for (_, a), (n, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            (full if n == 0 else part).append(ms)
        return full, part


def set_variant(model, variant: str) -> None:
    if variant == "fused":
        model.fuse_projections()
    else:
        model.unfuse_projections()
    want = len(model.backbone.all_blocks()) if variant == "fused" else 0
    if model.fused_blocks != want:
        raise RuntimeError(f"{variant}: {model.fused_blocks} fused blocks, expected {want}")


def decode(model, prompts, scfg: SamplerConfig, ids: SpecialIds, device: str, clock=None):
    """One generation through the sampler's block loop (compiled as ``generate`` does); generated tokens."""
    ctx = contextlib.nullcontext()
    if scfg.compile:
        S.compile_model(model)
        ctx = S._compile_context()
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(len(prompts))]
    with ctx:
        res = decode_blocks(model, prompts, scfg, ids, gens, on_step=clock)
    return res.decoder.finish()[0]


def run_one(model, mode: str, variant: str, batch: int, args, ids: SpecialIds) -> dict:
    dev = args.device
    set_variant(model, variant)
    prompts = random_prompts(model.config, batch, args.prompt_len, seed=batch)
    scfg = SamplerConfig(strategy="ups", steps=args.steps, gen_length=args.gen_length,
                         block_length=args.block_length, cache=args.cache, compile="compile" in mode,
                         graphs="graphs" in mode)
    scfg.validate()
    decode(model, prompts, replace(scfg, steps=2 * scfg.num_blocks), ids, dev)  # compile / capture every shape
    clock = StepClock(dev)
    sync(dev)
    t = time.perf_counter()
    tokens = decode(model, prompts, scfg, ids, dev, clock)
    sync(dev)
    wall = time.perf_counter() - t
    full, part = clock.intervals()
    row = {"mode": mode, "batch": batch, "variant": variant, "wall_s": round(wall, 3),
           "tok_s": round(batch * args.gen_length / wall, 1), "ms_per_step": round(wall / args.steps * 1e3, 3),
           "step_ms": round(statistics.median(part), 3) if part else None,
           "full_ms": round(statistics.median(full), 3) if full else None, "tokens": tokens}
    if args.profile:
        n = max(1, min(4, (scfg.steps_per_block - 2) // 2))
        try:
            probe = steady_probe(model, prompts, scfg, ids, dev, n)
            if scfg.graphs and dev.startswith("cuda") and not probe.get("kernels_step"):
                alt = steady_probe(model, prompts, replace(scfg, graph_capture=False), ids, dev, n)
                probe.update(kernels_step=alt["kernels_step"], gpu_ms_step=alt["gpu_ms_step"], gpu_from="uncaptured")
            row.update({k: v for k, v in probe.items() if k != "step_ms"})
            if probe.get("gpu_ms_step") and row["step_ms"]:
                row["busy"] = round(min(probe["gpu_ms_step"] / row["step_ms"], 1.0), 2)
        except Exception as e:  # the timing stands even if the profiler fails
            traceback.print_exc()
            row["probe_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def summarise(record: dict) -> None:
    """Ratios against the in-run unfused runs, the floor per row, the table (printed last)."""
    rows = [r for r in record["rows"] if "tok_s" in r]
    base = {(r["mode"], r["batch"]): r for r in rows if r["variant"] == "unfused"}
    eager = {r["batch"]: r for r in rows if r["variant"] == "unfused" and r["mode"] == "eager"}
    floors = record.get("floors", {})
    for r in rows:
        b, e = base.get((r["mode"], r["batch"])), eager.get(r["batch"])
        r["x_unfused"] = round(b["wall_s"] / r["wall_s"], 3) if b else None
        r["x_eager"] = round(e["wall_s"] / r["wall_s"], 3) if e else None
        f = floors.get(str(r["batch"]))
        if f:
            r.update(floor_ms=f["floor_ms"], read_ms=f["read_ms"])
            r["frac_floor"] = round(f["floor_ms"] / r["step_ms"], 3) if r.get("step_ms") else None
        if r["variant"] == "fused" and b and b.get("tokens") and r.get("tokens"):
            pairs = [(u, v) for x, y in zip(r["tokens"], b["tokens"]) for u, v in zip(x, y)]
            r["match"] = round(sum(u == v for u, v in pairs) / max(1, len(pairs)), 4)
    for r in rows:
        r.pop("tokens", None)  # they only serve the match column
    order = {m: i for i, m in enumerate(MODES)}
    shown = sorted(record["rows"], key=lambda r: (r["batch"], order.get(r["mode"], 9), r["variant"] != "unfused"))
    print()
    print_table(shown, TABLE)
    if record["skipped"]:
        print("skipped (time box): " + "; ".join(record["skipped"]))


def _write(out_dir, record, final: bool) -> None:
    write_run_json(out_dir, "step.json", record, final)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decoding_size_args(ap)
    ap.add_argument("--cache", default="dual", choices=["prefix", "dual"])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default="eager,compile+graphs,compile", help=f"comma list of {'|'.join(MODES)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of unfused|fused")
    ap.add_argument("--profile", action="store_true", help="kernels, launches, host syncs per cached step "
                    "(torch.profiler)")
    ap.add_argument("--max_minutes", type=float, default=7.5, help="skip the runs whose estimated end is later")
    ap.add_argument("--hard_minutes", type=float, default=8.75, help="print the table and exit at this time "
                    "whatever is running")
    ap.add_argument("--out", default=None, help="output folder (step.json)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny config, float32, short lengths")
    args = ap.parse_args(argv)
    if args.smoke:
        args.config, args.device, args.dtype = "test-tiny", "cpu", "float32"
        args.prompt_len, args.gen_length, args.block_length, args.steps = 8, 32, 16, 16
        args.batches = "1,2" if args.batches == ap.get_default("batches") else args.batches
        if args.modes == ap.get_default("modes"):
            args.modes = "eager,graphs"  # compile on CPU means minutes of C++ compilation
    modes, variants = args.modes.split(","), args.variants.split(",")
    bad = [m for m in modes if m not in MODES] + [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"error: --modes / --variants: unknown {bad}; modes are {', '.join(MODES)}, variants "
                         f"{', '.join(VARIANTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: pass --smoke (or --device cpu --config test-tiny) for a smoke test")
    batches = [int(b) for b in args.batches.split(",")]
    plan = [(m, b, v) for m in MODES if m in modes for b in batches for v in VARIANTS if v in variants]
    t_start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    rows, skipped = [], []
    record = {"bench": "step", **environment(), "args": vars(args), "rows": rows, "skipped": skipped}

    def on_timeout():
        print(f"\nwatchdog: --hard_minutes {args.hard_minutes} reached; the table so far:", flush=True)
        record["watchdog"] = True
        skipped.extend(f"{m} batch {b} {v}" for m, b, v in plan[len(rows) + len(skipped):])
        summarise(record)
        _write(args.out, record, final=True)
        sys.stdout.flush()
        os._exit(3)

    dog = Watchdog(args.hard_minutes, on_timeout)
    for name in ("cache_size_limit", "recompile_limit"):  # two variants x batches x eager/static caches
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    rate, bw = matmul_rate(args.device, dtype), copy_bandwidth(args.device, 2.0 if args.device != "cpu" else 0.25)
    model = random_model(args.config, ups="head", device=args.device, dtype=dtype)
    cfg = model.config
    ids = SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id, pad=cfg.pad_token_id)
    T = args.prompt_len + args.gen_length
    floors = {}
    for b in batches:  # a cached dual step: the block's tokens attend to the whole sequence
        flops, nbytes = forward_cost(cfg, b, args.block_length, T, args.block_length, 0, torch.finfo(dtype).bits // 8)
        read_ms, flop_ms = nbytes / (bw * 1e9) * 1e3, flops / (rate * 1e12) * 1e3
        floors[str(b)] = {"read_ms": round(read_ms, 3), "flop_ms": round(flop_ms, 3),
                          "floor_ms": round(max(read_ms, flop_ms), 3), "bytes": nbytes, "flops": flops}
    record.update(matmul_tflops=round(rate, 1), copy_gbs=round(bw, 1), floors=floors)
    shown = ", ".join(f"batch {b} {f['floor_ms']} ms" for b, f in floors.items())
    print(f"measured: matmul {rate:.4g} TFLOP/s ({args.dtype}), copy bandwidth {bw:.0f} GB/s; floor of a cached "
          f"step: {shown}; {len(plan)} runs", flush=True)
    per_run, compile_est, compiled = [], 120.0, set()
    for mode, batch, variant in plan:
        name = f"{mode} batch {batch} {variant}"
        elapsed = time.perf_counter() - t_start
        first_compile = "compile" in mode and (mode, batch, variant) not in compiled and args.device != "cpu"
        est = (statistics.median(per_run) if per_run else 20.0) * (2 if batch > 1 else 1) + \
            (compile_est if first_compile else 0.0)
        if elapsed + est > args.max_minutes * 60:
            skipped.append(name)
            print(f"skipped (estimated {est:.0f} s past --max_minutes {args.max_minutes}): {name}", flush=True)
            continue
        print(f"[{elapsed:5.0f} s] {name}", flush=True)
        t_run = time.perf_counter()
        try:
            row = run_one(model, mode, variant, batch, args, ids)
            print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
            rows.append(row)
        except Exception as e:  # a failing run must not take the others down
            traceback.print_exc()
            print(f"FAILED: {name}: {type(e).__name__}: {e}", flush=True)
            rows.append({"mode": mode, "batch": batch, "variant": variant,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            release_decoders(model)
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        took = time.perf_counter() - t_run
        if first_compile:
            compiled.add((mode, batch, variant))
            compile_est = max(20.0, took - (statistics.median(per_run) if per_run else 0.0))
        else:
            per_run.append(took)
        _write(args.out, record, final=False)
    dog.cancel()
    record["total_s"] = round(time.perf_counter() - t_start, 1)
    if not args.device.startswith("cuda") or args.config != "llada-8b":
        print("(not llada-8b on a GPU: these numbers say nothing about the H200)")
    print(f"total bench time {record['total_s']:.0f} s" + (f"; {len(skipped)} runs skipped" if skipped else ""))
    summarise(record)  # the table, last
    _write(args.out, record, final=True)
    return record


if __name__ == "__main__":
    main()
