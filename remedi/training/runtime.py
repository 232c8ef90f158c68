"""The training runtime shared by Remask SFT, LoRA and Remask RL: what every trainer does around its own loop.

A trainer (:class:`Trainer`) builds itself in ``setup()`` and runs in ``train()``; :func:`run_to_end` calls the
two and cleans up after. Around that, this module holds the parts that are the same for every script: the
accelerator (:func:`make_accelerator`), the run folder (:func:`output_dir`, :func:`claim_run_folder`: its lock,
the resume point and the cleanup of a killed run's temporaries) and the divergence errors. Checkpoint
writing and reading, the resume rules and the RNG state are :mod:`remedi.training.state`; the optimiser and
the model build :mod:`remedi.training.build`.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, runtime_checkable

import torch

from remedi.files import RunLock, atomic_path, read_jsonl, remove_stale_tmp
from remedi.training.state import RESUME_FREE, resume_point

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """Training left the range where it means anything; the step's update was not saved anywhere."""


class NonFiniteLoss(Diverged):
    """A loss, gradient norm or weight that is inf or nan."""


@runtime_checkable
class Trainer(Protocol):
    """What :func:`run_to_end` needs of a trainer (Remask SFT / LoRA: training.loop.Trainer; Remask RL:
    rl.trainer.RLTrainer). ``setup`` checks, builds and sets ``acc`` (the Accelerator), ``out`` (the run folder)
    and ``lock`` (a :class:`RunLock` or None); ``train`` runs and returns the result dict."""

    acc: Any
    out: Path
    lock: Optional[RunLock]

    def setup(self) -> None: ...

    def train(self) -> dict: ...


def run_to_end(trainer: Trainer) -> dict:
    """``trainer.setup()`` then ``trainer.train()`` (every training script); adds ``output_dir`` to the result and
    releases the run folder's lock. With several processes it ends accelerate's training, which destroys the
    process group; with one it resets accelerate's process-wide state, so that tests and notebooks can train
    several times in one process."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        trainer.setup()
        result = trainer.train()
        result["output_dir"] = str(trainer.out)
        if trainer.acc.num_processes > 1:
            trainer.acc.end_training()
        return result
    finally:
        lock = getattr(trainer, "lock", None)
        if lock is not None:
            lock.release()
        if getattr(trainer, "acc", None) is not None and trainer.acc.num_processes == 1:
            AcceleratorState._reset_state()
            GradientState._reset_state()


def make_accelerator(device: Optional[str], mixed_precision: str, grad_accum: int = 1, find_unused: bool = False):
    """(Accelerator, device). CPU when asked or when there is no GPU; bf16 mixed precision on GPUs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if device and device.startswith("cuda:"):
        raise ValueError(f"--device {device}: pick GPUs with CUDA_VISIBLE_DEVICES (accelerate places each "
                         "process on its own GPU); use --device cuda or cpu")
    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    mp = mixed_precision
    if mp == "auto":
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION") or ("no" if cpu else "bf16")
    kw = [DistributedDataParallelKwargs(find_unused_parameters=find_unused)]
    acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=grad_accum, cpu=cpu, kwargs_handlers=kw)
    # multi-CPU runs report "cpu:<rank>", which safetensors and some kernels reject
    dev = torch.device("cpu") if acc.device.type == "cpu" else acc.device
    return acc, dev


def output_dir(given: Optional[str], script: str, acc) -> Path:
    """--output_dir, or runs/<script>-<time>, the same on every process."""
    from accelerate.utils import broadcast_object_list

    out = [given or str(Path("runs") / f"{script}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")]
    if acc.num_processes > 1:
        broadcast_object_list(out)
    return Path(out[0])


def lock_run_folder(out: Path, acc) -> Optional[RunLock]:
    """The main process locks the run folder (a second run into it stops with one line naming this one's pid)."""
    return RunLock(out, "--output_dir") if acc.is_main_process else None


def claim_resume_point(out: Path, acc, record: dict, resume: bool, defaults: dict,
                       free: Iterable[str] = RESUME_FREE, exports: Iterable[Optional[str]] = ()) -> Optional[Path]:
    """The checkpoint to continue from (:func:`remedi.training.state.resume_point`, the same rules for every
    script). On --resume the main process first removes what a killed run left half-written (checkpoint and
    export temporaries in the run folder and beside each export path); the folder's lock must be held."""
    if resume and acc.is_main_process:
        remove_stale_tmp(out)
        remove_stale_tmp(out / "checkpoints")
        for path in exports:
            if path:
                remove_stale_tmp(Path(path).parent, Path(path).name)
    return resume_point(out, record, resume, defaults, set(free))


def truncate_metrics(path: Path, step: int, key: str = "step") -> None:
    """On resume, drop the metrics lines a killed run wrote after its last checkpoint (all of them when it
    restarts from 0); a torn last line (a kill mid-write) is dropped with a warning, any other bad line is an
    error naming the file and line. ``key``: the record's position field (``step``; RL: ``update``)."""
    if not path.is_file():
        return
    keep = []
    for i, rec in enumerate(read_jsonl(path)):
        if not isinstance(rec.get(key), int):
            raise ValueError(f"{path}: record {i + 1} has no integer {key!r} ({str(rec)[:80]}); fix or remove it")
        if rec[key] <= step:
            keep.append(rec)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
