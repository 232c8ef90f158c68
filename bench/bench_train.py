"""Training-step speed of Remask SFT on random-weight LLaDA-8B (bf16), against the card's matmul rate.

    python bench/bench_train.py --out bench/results/train.json                # one GPU, every case
    accelerate launch --config_file configs/accelerate_ddp.yaml --num_processes 2 \
        bench/bench_train.py --cases head --out bench/results/train_ddp2.json  # data-parallel scaling

Each case times whole optimiser steps of the real training code (noise injection, remedi.training.step.TrainStep,
losses, backward, AdamW) at seq 1024 and reports tokens/s, peak GPU memory and the fraction of the bf16
matmul rate measured in the same run. Counted FLOPs (bench/common.forward_flops = matmuls of one forward):

* head (frozen backbone, no autograd): one forward;
* lora (joint, backbone bf16 + adapters): forward + input-gradient pass = 2 x forward (adapter products
  and the recomputation of --gradient_checkpointing are not counted: they are overhead);
* stream (frozen backbone, trained UPS stream): forward with the stream + input gradients through it +
  weight gradients of the stream blocks.

Cases: head (batch 1), head_max (batches 2, 4, ... until one does not fit; reports the fastest batch and the
largest that fits), lora (batch 1), lora_ckpt
(batch 1, gradient checkpointing), stream (batch 1). Under `accelerate launch` every process runs the
same case on its own GPU and the table reports the summed tokens/s. ``--compile`` compiles every block
(``--warmup`` steps then include the compilation; use --warmup 3 or more).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, forward_flops, matmul_tflops, print_table, random_model, write_record  # noqa: E402

from remedi.model.checkpoint import add_stream  # noqa: E402
from remedi.model.loading import LORA_AUTO_TARGET  # noqa: E402
from remedi.model.llada import UPSHead, init_weights  # noqa: E402
from remedi.training.noise import inject_noise  # noqa: E402
from remedi.training.args import default_taps  # noqa: E402
from remedi.training.build import adamw  # noqa: E402
from remedi.training.step import TrainStep  # noqa: E402

CASES = ("head", "head_max", "lora", "lora_ckpt", "stream")


def build(case: str, config: str, device: torch.device, compile_blocks: bool = False, lora_dropout: float = 0.05,
          compile_mode: str | None = None, optimizer: str = "train"):
    """Model + TrainStep + optimiser for one case, random weights built directly in bf16 on the GPU."""
    lm = random_model(config, ups=None, device=str(device))
    cfg = lm.config
    for p in lm.parameters():
        p.requires_grad_(False)
    if case.startswith("head"):
        head = UPSHead(cfg.d_model, 0)
        init_weights(head, generator=torch.Generator().manual_seed(0))
        lm.attach_head(head.to(device))
        trainable, backbone_trains = list(head.parameters()), False
    elif case.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        head = UPSHead(cfg.d_model, 0)
        init_weights(head, generator=torch.Generator().manual_seed(0))
        lm.attach_head(head.to(device))
        lm.model = get_peft_model(lm.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout,
                                                       target_modules=LORA_AUTO_TARGET))
        for p in head.parameters():
            p.requires_grad_(True)
        trainable, backbone_trains = [p for p in lm.parameters() if p.requires_grad], True
        lm.set_gradient_checkpointing(case == "lora_ckpt")
    elif case == "stream":
        add_stream(lm, default_taps(cfg.n_layers))
        stream = lm.ups_modules()
        trainable = []
        for m in stream:
            m.to(torch.float32)
            for p in m.parameters():
                p.requires_grad_(True)
                trainable.append(p)
        backbone_trains = False
    else:
        raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
    for p in trainable:
        p.requires_grad_(True)
    lm.train()
    if compile_blocks:
        lm.compile_blocks(**({"mode": compile_mode} if compile_mode else {}))
    step = TrainStep(lm, backbone_trains=backbone_trains, label_smoothing=False)
    # "train": the training scripts' AdamW (fused on a GPU); "foreach": torch's default kernels, for comparison
    opt = adamw([{"params": trainable}], lr=1e-5) if optimizer == "train" else torch.optim.AdamW(trainable, lr=1e-5)
    return lm, step, opt, sum(p.numel() for p in trainable)


def counted_flops(case: str, cfg, batch: int, seq: int) -> float:
    fwd = forward_flops(cfg, batch, seq)
    if case.startswith("head"):
        return fwd
    if case.startswith("lora"):
        return 2 * fwd
    n_stream = len(default_taps(cfg.n_layers))
    fwd_s = forward_flops(cfg, batch, seq, stream_blocks=n_stream)
    stream_only = fwd_s - fwd
    return 2 * fwd_s + stream_only


def time_case(acc, case: str, config: str, batch: int, seq: int, iters: int, warmup: int,
              compile_blocks: bool = False, lora_dropout: float = 0.05, profile: int = 0,
              compile_mode: str | None = None, optimizer: str = "train") -> dict:
    device = acc.device
    lm, step_mod, opt, n_train = build(case, config, device, compile_blocks, lora_dropout, compile_mode, optimizer)
    cfg = lm.config
    model, opt = acc.prepare(step_mod, opt)
    g = torch.Generator().manual_seed(acc.process_index)
    x0 = torch.randint(8, cfg.vocab_size, (batch, seq), generator=g)
    answer = torch.zeros(batch, seq, dtype=torch.bool)
    answer[:, seq // 4:] = True  # a quarter of the row is prompt
    specials = [cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id]

    def one_step(i: int):
        nz = inject_noise(x0, answer, mask_id=cfg.mask_token_id, r_incorrect=0.1,
                          generator=torch.Generator().manual_seed(i), vocab_size=cfg.vocab_size,
                          special_ids=specials, incorrect_source="batch")
        t = [v.to(device, non_blocking=True) for v in (nz.x_t, x0, answer, nz.masked, nz.incorrect, nz.clean,
                                                       nz.p_mask)]
        with acc.accumulate(model):
            res = model(*t, phase="joint")
            loss = res["ups_loss"] + (res["tps_loss"] if res["tps_loss"].requires_grad else 0.0)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        one_step(i)
    torch.cuda.synchronize(device)
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    for i in range(iters):
        one_step(warmup + i)
    torch.cuda.synchronize(device)
    acc.wait_for_everyone()
    sec = (time.perf_counter() - t0) / iters
    if profile and acc.is_main_process:  # where the step's GPU time goes: the costliest operators
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                one_step(warmup + iters + i)
            torch.cuda.synchronize(device)
        print(f"--- {case} batch {batch}: operators by GPU time over 2 steps", flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=profile), flush=True)
        print(f"--- {case} batch {batch}: operators by host time over 2 steps", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile), flush=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    tag = ("+compile" + (f":{compile_mode}" if compile_mode else "")) if compile_blocks else ""
    row = {"case": case + tag, "batch": batch, "seq": seq,
           "processes": acc.num_processes, "ms_per_step": round(sec * 1e3, 1),
           "tok_s": round(batch * seq * acc.num_processes / sec), "peak_gib": round(peak, 1),
           "trainable_m": round(n_train / 1e6, 2),
           "tflops": round(counted_flops(case, cfg, batch, seq) / sec / 1e12, 1)}
    if case.startswith("lora"):
        row["lora_dropout"] = lora_dropout
    row["optimizer"] = optimizer
    del model, opt, lm, step_mod
    acc.free_memory()
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llada-8b")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--max_batch", type=int, default=64, help="head_max: largest batch tried")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile every block (as train --compile)")
    ap.add_argument("--compile_mode", default=None, help="with --compile: torch.compile mode (e.g. reduce-overhead: "
                    "CUDA graphs)")
    ap.add_argument("--optimizer", default="train", choices=("train", "foreach"),
                    help="train: the training scripts' AdamW (fused on a GPU); foreach: torch's default AdamW kernels")
    ap.add_argument("--lora_dropout", type=float, default=0.05, help="lora cases: adapter dropout (RemeDi's 0.05)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile 2 more steps and print the N costliest operators by GPU and by host time")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16")
    torch.backends.cuda.matmul.allow_tf32 = True
    rate = matmul_tflops()  # this card, this run
    if acc.is_main_process:
        print(f"measured bf16 matmul rate: {rate:.0f} TFLOP/s; {acc.num_processes} process(es)", flush=True)
    rows = []
    for case in args.cases.split(","):
        batches = [1]
        if case == "head_max":
            batches = [b for b in (2, 4, 8, 16, 32, 64, 128) if b <= args.max_batch]
        fits = []
        for b in batches:
            try:
                row = time_case(acc, case, args.config, b, args.seq, args.iters, args.warmup, args.compile,
                                args.lora_dropout, args.profile, args.compile_mode, args.optimizer)
            except torch.cuda.OutOfMemoryError:
                acc.free_memory()
                gc.collect()
                torch.cuda.empty_cache()
                if acc.is_main_process:
                    print(f"{case}: batch {b} does not fit", flush=True)
                break
            row["frac_matmul"] = round(row["tflops"] / rate, 3)  # per GPU: tflops counts one process's work
            fits.append(row)
            if case != "head_max":
                rows.append(row)
            if acc.is_main_process:
                print(row, flush=True)
        if case == "head_max" and fits:  # the fastest batch and the largest that fits (often not the same)
            fastest = max(fits, key=lambda r: r["tok_s"])
            rows.append({**fastest, "case": "head_fastest"})
            if fits[-1] is not fastest:
                rows.append({**fits[-1], "case": "head_largest"})
    if acc.is_main_process:
        print_table(rows, ["case", "batch", "seq", "processes", "ms_per_step", "tok_s", "tflops", "frac_matmul",
                           "peak_gib", "trainable_m"])
        write_record(args.out, {"bench": "train", **environment(), "matmul_tflops": round(rate, 1),
                                "flops_note": "head: 1 x forward; lora: 2 x forward (input gradients); stream: "
                                              "2 x forward(with stream) + stream forward (its weight gradients)",
                                "rows": rows})


if __name__ == "__main__":
    main()
