"""Forward-pass speed of the native LLaDA-8B (random weights, bf16) against the card's matmul rate.

    python bench/bench_forward.py --out results/forward.json [--compile]

Times one forward over 456 tokens (the reference sampler's prompt 200 + gen 256) at batch 1 and 8,
for the plain backbone, with the head UPS and with the stream UPS (4 extra blocks), and reports the
fraction of the measured bf16 matmul rate that the counted matmul FLOPs reach.
"""
from __future__ import annotations

import argparse

import torch

from common import cuda_time, environment, forward_flops, matmul_tflops, print_table, random_model, write_record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="llada-8b")
    ap.add_argument("--seq", type=int, default=456)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ups", default="none,head,stream", help="comma list of none|head|stream")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    rate = matmul_tflops()
    print(f"measured bf16 matmul rate: {rate:.0f} TFLOP/s")
    rows = []
    for ups in args.ups.split(","):
        model = random_model(args.config, ups=None if ups == "none" else ups)
        cfg = model.config
        variants = [("eager", model)]
        if args.compile:
            cmodel = random_model(args.config, ups=None if ups == "none" else ups)
            for blk in list(cmodel.model.transformer.blocks) + list(getattr(cmodel.model, "blocks_upm", [])):
                blk.compile(dynamic=False)
            variants.append(("compile", cmodel))
        for mode, m in variants:
            for b in map(int, args.batches.split(",")):
                ids = torch.randint(0, cfg.vocab_size, (b, args.seq), device="cuda")
                with torch.inference_mode():
                    t = cuda_time(lambda: m(ids), warmup=3, iters=args.iters)
                fl = forward_flops(cfg, b, args.seq, stream_blocks=len(cfg.ups_taps))
                rows.append({"ups": ups, "mode": mode, "batch": b, "seq": args.seq, "ms": round(t["median_ms"], 2),
                             "tflops": round(fl / t["median_ms"] / 1e9, 1),
                             "frac_matmul": round(fl / (t["median_ms"] * 1e-3) / 1e12 / rate, 3),
                             "tok_s": round(b * args.seq / t["median_ms"] * 1e3)})
                print(rows[-1], flush=True)
            del m
        del model, variants
        torch.cuda.empty_cache()
    print_table(rows, ["ups", "mode", "batch", "seq", "ms", "tflops", "frac_matmul", "tok_s"])
    write_record(args.out, {"bench": "forward", **environment(), "matmul_tflops": round(rate, 1), "rows": rows})


if __name__ == "__main__":
    main()
