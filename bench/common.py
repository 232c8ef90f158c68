"""Shared helpers for the GPU benchmarks: random-weight models, CUDA-event timing, the card's matmul rate.

Benchmarks are scripts, not tests: they print a table and write a JSON record (command, card, date,
versions, numbers) that BENCHMARKS.md quotes.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remedi.model.config import get_config  # noqa: E402
from remedi.model.llada import RemeDiLM, UPSHead  # noqa: E402


def random_model(name: str = "llada-8b", ups: str | None = None, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides) -> RemeDiLM:
    """Build directly on the device in the target dtype (no float32 copy): 16 GB for llada-8b."""
    cfg = get_config(name, **overrides)
    if ups == "stream":
        n = cfg.n_layers
        cfg = cfg.replace(ups_taps=tuple(sorted({0, n * 10 // 32, n * 20 // 32, n - 2})))
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = RemeDiLM(cfg)
            with torch.no_grad():
                for name_, p in model.named_parameters():
                    if "norm" in name_ or "ln_f" in name_:
                        p.fill_(1.0)
                    elif "backprop_linears" in name_:
                        p.normal_(0, 1e-3)
                    else:
                        p.normal_(0, 0.02)
            if ups == "head":
                model.attach_head(UPSHead(cfg.d_model, 0).to(device=device, dtype=torch.float32))
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def cuda_time(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> dict:
    """Median/min milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters}


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """The card's measured dense matmul rate on random data (TFLOP/s), rotating inputs past the L2."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    mats = [(torch.randn(n, n, device="cuda", dtype=dtype, generator=gen),
             torch.randn(n, n, device="cuda", dtype=dtype, generator=gen)) for _ in range(3)]
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    i = [0]

    def step():
        a, b = mats[i[0] % 3]
        i[0] += 1
        torch.matmul(a, b, out=out)

    t = cuda_time(step, warmup=5, iters=30)
    return 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12


def forward_flops(cfg, batch: int, seq: int, logits_tokens: int | None = None, stream_blocks: int = 0) -> float:
    """Matmul FLOPs of one forward: 2 * tokens * linear params + attention scores/values + LM head."""
    d, f, L = cfg.d_model, cfg.mlp_hidden_size, cfg.n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    per_block = 2 * d * d + 2 * d * kv + 3 * d * f
    blocks = L + stream_blocks
    tokens = batch * seq
    lin = 2 * tokens * per_block * blocks + 2 * tokens * stream_blocks * d * d  # bridges
    attn = 4 * batch * seq * seq * d * blocks
    head = 2 * batch * (logits_tokens if logits_tokens is not None else seq) * d * cfg.embedding_size
    return float(lin + attn + head)


def environment() -> dict:
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "card": props.name if props else "cpu", "n_gpus": torch.cuda.device_count(),
        "gpu_mem_gib": round(props.total_memory / 2**30, 1) if props else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def write_record(path: str | None, record: dict) -> None:
    text = json.dumps(record, indent=2)
    print(text if not path else f"wrote {path}")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def write_run_json(out_dir, filename: str, record: dict, final: bool) -> None:
    """Rewrite ``out_dir/filename`` atomically (temporary file, then rename), marked partial until ``final``,
    so a killed benchmark leaves the runs it finished."""
    if not out_dir:
        return
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record if final else {**record, "partial": True}, indent=2, default=str) + "\n")
    tmp.replace(path)


def add_decoding_size_args(ap) -> None:
    """The flags every decoding benchmark shares: model, device, dtype, and the issue's lengths."""
    ap.add_argument("--config", default="llada-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prompt_len", type=int, default=200)
    ap.add_argument("--gen_length", type=int, default=256)
    ap.add_argument("--block_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=256)


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(cols, widths)))


# ------------------------------------------------------------------------------------------ profiling
# CUDA runtime/driver calls that put work on the GPU (a CUDA-graph replay is one), and those that wait for it.
LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
               "cuGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync", "cudaLaunchCooperativeKernel")
SYNC_APIS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
             "cuCtxSynchronize", "cudaMemcpy")


def profile_counts(fn: Callable[[], object], cuda: bool) -> dict:
    """Run fn() once under torch.profiler: GPU kernels executed, launch calls, host-sync calls and the GPU's
    busy time (the union of kernel/memcpy intervals, ms). Without CUDA only the launch counts (zero) exist."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    gpu, kernels, launches, syncs = [], 0, 0, 0
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            gpu.append((e.start_ns(), e.start_ns() + e.duration_ns()))
            kernels += not name.startswith(("Memcpy", "Memset"))
        elif name in LAUNCH_APIS:
            launches += 1
        elif name in SYNC_APIS:
            syncs += 1
    busy, end = 0, None
    for a, b in sorted(gpu):
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return {"kernels": kernels, "launches": launches, "syncs": syncs, "gpu_ms": busy / 1e6 if cuda else None}


class Watchdog:
    """Calls ``on_timeout`` from a timer thread after ``minutes`` (then the process should exit), so that a
    stuck compilation cannot make a time-limited run end without its table."""

    def __init__(self, minutes: float, on_timeout: Callable[[], None]):
        import threading

        self.timer = threading.Timer(minutes * 60, on_timeout)
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        self.timer.cancel()
