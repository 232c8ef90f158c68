"""A run's state on disk: resume rules, resumable checkpoints, RNG state, and the final exports.

Checkpoints are written into a temporary folder and renamed, then ``checkpoints/latest.json`` is replaced, so
a crash during a save leaves the previous checkpoint as the latest. A checkpoint holds the trainable tensors,
optimiser and scheduler, every process's RNG state and the data position, so a resumed run ends with the
same weights as one that never stopped. Exports (the UPS file, the LoRA folder, a hub-layout model folder)
are written once at the end, never from a diverged run; a frozen backbone is never re-saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from remedi.files import atomic_path, publish_checkpoint, write_json_atomic
from remedi.model.checkpoint import save_pretrained, save_ups, versions
from remedi.model.config import LLaDAConfig
from remedi.model.llada import RemeDiLM, UPSHead
from remedi.training.args import SCRIPT_ARGS

log = logging.getLogger(__name__)

CKPT_FILES = ("trainable.safetensors", "trainer_state.json")
# arguments that may change between a run and its --resume: they do not change the trajectory
RESUME_FREE = {"resume", "stop_after_steps", "log_every", "save_every", "save_total_limit", "output_dir",
               "save_path", "save_lora_dir", "save_ups_head", "save_model_dir", "divergence_bound", "report_to"}
ARG_DEFAULTS = {f.name: f.default for types in SCRIPT_ARGS.values() for cls in types
                for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def args_record(*objs) -> dict:
    """The run's arguments as one flat dict (args.json, and the ``args`` of every exported file)."""
    out = {}
    for o in objs:
        out.update(dataclasses.asdict(o))
    return out


# ------------------------------------------------------------------------------------------------ resume
def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The finished checkpoint ``latest.json`` names, or None when the run never finished one."""
    p = Path(output_dir) / "checkpoints" / "latest.json"
    if not p.is_file():
        return None
    ck = Path(output_dir) / "checkpoints" / json.loads(p.read_text())["name"]
    missing = [f for f in CKPT_FILES if not (ck / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{p} points to {ck}, which lacks {missing}")
    return ck


def resume_point(out: Path, record: dict, resume: bool) -> Optional[Path]:
    """The checkpoint a run continues from; None to start at step 0.

    Without --resume, a folder holding a run is refused (its files would be mixed with the new run's). With
    --resume, the arguments must match the saved ones except :data:`RESUME_FREE` (an argument the saved run
    did not know yet counts as its default); a folder whose run never finished a checkpoint (killed before
    or during its first save) starts again from step 0 with a warning.
    """
    args_file = out / "args.json"
    if not resume:
        if args_file.is_file():
            ck = latest_checkpoint(out)
            where = (f"continues from its checkpoint {ck.name}" if ck is not None
                     else "starts it again from step 0, as no checkpoint was finished")
            raise ValueError(f"--output_dir {out} already holds a run (args.json): pass --resume with the same "
                             f"flags (it {where}), or choose a new --output_dir")
        return None
    if not args_file.is_file():
        raise FileNotFoundError(f"--resume: {out} holds no run to continue (no args.json); drop --resume to "
                                "start a new run there, or point --output_dir at the run's folder")
    saved = json.loads(args_file.read_text())
    diff = {k: (saved.get(k, ARG_DEFAULTS.get(k)), v) for k, v in record.items()
            if k not in RESUME_FREE and saved.get(k, ARG_DEFAULTS.get(k)) != v}
    if diff:
        raise ValueError(f"--resume with different arguments than the run in {out}: "
                         + "; ".join(f"--{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    ck = latest_checkpoint(out)
    if ck is None:
        log.warning("--resume: %s holds no finished checkpoint (the run stopped before or during its first "
                    "save): starting it again from step 0 with the same arguments", out)
    return ck


def rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------- checkpoints
@dataclass
class Parts:
    """The handles the checkpoint code needs of a set-up run (after ``accelerate.prepare``)."""

    acc: Any
    lm: RemeDiLM  # the unwrapped model (its ``model`` is a PeftModel under LoRA)
    model: nn.Module  # the prepared TrainStep (DDP/FSDP wrapper)
    opt: Any
    sched: Any
    trainable_names: list[str]  # parameter names of the TrainStep
    lora: bool

    @property
    def fsdp(self) -> bool:
        return self.acc.distributed_type.name == "FSDP"

    @property
    def main(self) -> bool:
        return self.acc.is_main_process


def trainable_state(parts: Parts) -> dict[str, torch.Tensor]:
    """Full (gathered) float32 copies of the trainable tensors on the main process, {} elsewhere."""
    full = parts.acc.get_state_dict(parts.model)  # collective under FSDP
    if not parts.main:
        return {}
    return {n: full[n].detach().float().contiguous().cpu() for n in parts.trainable_names}


def save_checkpoint(parts: Parts, out: Path, step: int, pos: dict, meta: dict, keep: int) -> None:
    """Write checkpoints/step-N (atomically), point latest.json at it, keep the ``keep`` newest."""
    from safetensors.torch import save_file

    acc = parts.acc
    root = out / "checkpoints"
    name = f"step-{step:07d}"
    state = trainable_state(parts)  # collective under FSDP
    tmp = root / f".{name}.tmp"
    if parts.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    r = acc.process_index
    torch.save(rng_state(), tmp / f"rng_rank{r}.pt")
    sharded = parts.fsdp
    if sharded or parts.main:
        torch.save({"optimizer": parts.opt.state_dict(), "scheduler": parts.sched.state_dict()},
                   tmp / (f"optim_rank{r}.pt" if sharded else "optim.pt"))
    if parts.main:
        save_file(state, str(tmp / "trainable.safetensors"))
        if parts.lm.ups_arch is not None and not sharded:  # ready for inference (FSDP: at the end only)
            with parts.lm.without_peft() as lm:
                save_ups(tmp / "ups.pt", lm, extra_meta=meta)
        if parts.lora:
            parts.lm.model.save_pretrained(str(tmp / "lora"))
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, **pos, "world_size": acc.num_processes, "optim_sharded": sharded}, indent=2) + "\n")
    acc.wait_for_everyone()
    if parts.main:
        publish_checkpoint(tmp, root, name, {"step": step}, "step-", keep)
    acc.wait_for_everyone()


def load_trainable(step_module: nn.Module, trainable_names: list[str], ck: Path, world: int) -> None:
    """Checkpointed trainable tensors into the (not yet prepared) TrainStep."""
    from safetensors.torch import load_file

    st = json.loads((ck / "trainer_state.json").read_text())
    if st["world_size"] != world:
        raise ValueError(f"{ck} was written by {st['world_size']} processes, this run has {world}: resume with the "
                         "same number of processes (the data order depends on it)")
    saved = load_file(str(ck / "trainable.safetensors"))
    mismatch = sorted(set(trainable_names) ^ set(saved))
    if mismatch:
        raise ValueError(f"{ck}: trainable tensors do not match this run: {mismatch[:6]}")
    params = dict(step_module.named_parameters())
    with torch.no_grad():
        for n, v in saved.items():
            params[n].copy_(v.to(params[n].dtype))


def restore(parts: Parts, ck: Path) -> dict:
    """Optimiser, scheduler and RNG (the weights were loaded before ``prepare``); returns the trainer state."""
    st = restore_optimizer_and_rng(ck, parts.acc.process_index, parts.opt, parts.sched)
    if parts.main:
        log.info("resumed from %s (step %d)", ck, st["step"])
    return st


def restore_optimizer_and_rng(ck: Path, rank: int, opt, sched) -> dict:
    """Load a checkpoint folder's optimiser and scheduler state (one file, or one per rank when sharded)
    and this rank's RNG state; returns its trainer_state.json (SFT and RL checkpoints share the layout)."""
    st = json.loads((ck / "trainer_state.json").read_text())
    optf = ck / (f"optim_rank{rank}.pt" if st.get("optim_sharded") else "optim.pt")
    blob = torch.load(optf, map_location="cpu", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    set_rng_state(torch.load(ck / f"rng_rank{rank}.pt", weights_only=True))
    return st


def write_args(out: Path, record: dict) -> None:
    write_json_atomic(out / "args.json", {**record, "versions": versions()})


# ---------------------------------------------------------------------------------------------- exports
def export(parts: Parts, *, out: Path, ups_out: Optional[str], lora_out: Optional[str],
           model_dir: Optional[str], backbone_trained: bool, meta: dict, tok_dir: Path, cfg: LLaDAConfig) -> dict:
    """The run's results: the UPS file, the LoRA folder, and (full backbone or stream) a hub-layout folder."""
    acc = parts.acc
    acc.wait_for_everyone()
    paths: dict[str, str] = {}
    gathered = gathered_copy(parts, cfg) if parts.fsdp else None  # collective
    if not parts.main:
        return paths
    with (contextlib.nullcontext(gathered) if gathered is not None else parts.lm.without_peft()) as lm:
        if lm.ups_arch is not None:
            ups_path = Path(ups_out or out / "ups.pt")
            save_ups(ups_path, lm, extra_meta=meta)
            paths["ups"] = str(ups_path)
        if model_dir and (backbone_trained or lm.ups_arch == "stream"):
            save_model_dir(lm, Path(model_dir), tok_dir, meta["args"])
            paths["model_dir"] = model_dir
    if parts.lora:
        lora_dir = Path(lora_out or out / "lora")
        with atomic_path(lora_dir, is_dir=True) as tmp:
            parts.lm.model.save_pretrained(str(tmp))
        paths["lora"] = str(lora_dir)
    for k, v in paths.items():
        log.info("saved %s: %s", k, v)
    return paths


def gathered_copy(parts: Parts, cfg: LLaDAConfig) -> Optional[RemeDiLM]:
    """FSDP: the whole model gathered into a CPU copy on the main process (None elsewhere)."""
    full = parts.acc.get_state_dict(parts.model)
    if not parts.main:
        return None
    lm = parts.lm
    with torch.device("meta"):
        copy = RemeDiLM(lm.config)
        if lm.ups_head is not None:
            copy.attach_head(UPSHead(cfg.d_model, lm.ups_head.width))
    copy.load_state_dict({k.removeprefix("lm."): v.cpu() for k, v in full.items()}, strict=True, assign=True)
    copy.name_or_path = lm.name_or_path
    return copy


def save_model_dir(lm: RemeDiLM, out: Path, tok_dir: Path, args: dict) -> None:
    """Backbone (+stream) in hub layout with the tokenizer files; a head UPS is saved on its own, never here."""
    head, lm.ups_head = lm.ups_head, None
    try:
        with atomic_path(out, is_dir=True) as tmp:
            for f in tok_dir.iterdir():
                if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",)
                                    or f.suffix == ".jinja"):
                    shutil.copy2(f, tmp / f.name)
            save_pretrained(lm, tmp)
            write_json_atomic(tmp / "training_args.json", args)
    finally:
        lm.ups_head = head
