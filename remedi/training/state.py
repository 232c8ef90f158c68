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
               "save_path", "save_lora_dir", "save_ups_head", "save_model_dir", "divergence_bound"}


def dataclass_defaults(*types) -> dict:
    """{field: default} of argument dataclasses: what an argument a saved run did not know counts as."""
    return {f.name: f.default for cls in types for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


ARG_DEFAULTS = dataclass_defaults(*dict.fromkeys(cls for types in SCRIPT_ARGS.values() for cls in types))


def args_record(*objs) -> dict:
    """The run's arguments as one flat dict (args.json, and the ``args`` of every exported file)."""
    out = {}
    for o in objs:
        out.update(dataclasses.asdict(o))
    return out


# ------------------------------------------------------------------------------------------------ resume
def checkpoint_problem(ck: Path) -> Optional[str]:
    """Why checkpoint folder ``ck`` cannot be resumed from (a missing, truncated or unreadable file, named), or
    None when it is complete. Cheap: the byte sizes recorded in its trainer_state.json are compared; a
    checkpoint written before sizes were recorded has its files read once instead."""
    missing = [f for f in CKPT_FILES if not (ck / f).is_file()]
    if missing:
        return f"{ck / missing[0]} is missing"
    try:
        st = json.loads((ck / "trainer_state.json").read_text())
        if not isinstance(st, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return f"{ck / 'trainer_state.json'} is damaged ({e})"
    sizes = st.get("file_sizes")
    if isinstance(sizes, dict):
        for f, n in sizes.items():
            have = (ck / f).stat().st_size if (ck / f).is_file() else None
            if have != n:
                return (f"{ck / f} is {'missing' if have is None else f'truncated or damaged ({have} of {n} bytes)'}")
        return None
    from safetensors import safe_open

    for f in sorted(x.name for x in ck.iterdir() if x.is_file() and x.name.startswith(("trainable", "optim", "rng_"))):
        try:
            if f.endswith(".safetensors"):
                with safe_open(str(ck / f), "pt") as h:
                    for k in h.keys():
                        h.get_tensor(k)
            elif f.endswith(".pt"):
                torch.load(ck / f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read means the file is damaged
            return f"{ck / f} is damaged ({type(e).__name__}: {str(e)[:120]})"
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None when the run never finished one.

    That is the one ``latest.json`` names; when that one is damaged (a truncated file: a full disk, a copy cut
    short), the newest complete one before it, with a warning naming the damaged file; when ``latest.json``
    itself is torn, the newest complete checkpoint folder. An error names the damaged file when no complete
    checkpoint is left."""
    root = Path(output_dir) / "checkpoints"
    p = root / "latest.json"
    if not p.is_file():
        return None
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), reverse=True)
    try:
        named = json.loads(p.read_text())["name"]
        if not isinstance(named, str) or "/" in named:
            raise ValueError(f"bad name {named!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        log.warning("%s is damaged (%s): taking the newest complete checkpoint folder instead", p, e)
        named = None
    if named is not None:
        if not (root / named).is_dir():
            raise FileNotFoundError(f"{p} points to {root / named}, which does not exist; remove {p} to resume from "
                                    "the newest complete checkpoint folder")
        folders = [root / named] + [d for d in folders if d.name < named]
    damaged = []
    for ck in folders:
        why = checkpoint_problem(ck)
        if why is None:
            if damaged:
                log.warning("%s: falling back to the previous complete checkpoint %s", "; ".join(damaged), ck)
            return ck
        damaged.append(why)
    if damaged:
        raise ValueError(f"{'; '.join(damaged)}: no complete checkpoint is left in {root}; drop --resume and train "
                         "into a new --output_dir")
    return None


def resume_point(out: Path, record: dict, resume: bool, defaults: Optional[dict] = None,
                 free: frozenset | set = RESUME_FREE) -> Optional[Path]:
    """The checkpoint a run continues from; None to start at step 0 (every training script's rule).

    Without --resume, a folder holding a run is refused (its files would be mixed with the new run's). With
    --resume, the arguments must match the saved ones except ``free`` (an argument the saved run did not
    know yet counts as its default: ``defaults``, SFT/LoRA's by default); a folder whose run never finished a
    checkpoint (killed before or during its first save) starts again from step 0 with a warning.
    """
    defaults = ARG_DEFAULTS if defaults is None else defaults
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
    try:
        saved = json.loads(args_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume: {args_file} is damaged ({e}); it records the run's arguments and cannot be "
                         "rebuilt: start a new --output_dir") from None
    diff = {k: (saved.get(k, defaults.get(k)), v) for k, v in record.items()
            if k not in free and saved.get(k, defaults.get(k)) != v}
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


def write_checkpoint(acc, out: Path, name: str, prefix: str, record: dict, trainable: dict[str, torch.Tensor],
                     opt, sched, sharded: bool, keep: int, extras=None) -> None:
    """Write ``<out>/checkpoints/<name>`` atomically (SFT, LoRA and RL alike), point latest.json at it and keep
    the ``keep`` newest ``prefix*`` folders. Every process writes its RNG state (and, ``sharded``, its optimiser
    shard); the main one the ``trainable`` tensors (float32, gathered), the optimiser and scheduler, what
    ``extras(folder)`` adds (inference-ready UPS / LoRA files) and, last, trainer_state.json: ``record``, the
    world size and every file's byte size, by which a resume recognises a truncated file."""
    from safetensors.torch import save_file

    root = out / "checkpoints"
    tmp = root / f".{name}.tmp"
    main, r = acc.is_main_process, acc.process_index
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{r}.pt")
    if sharded or main:
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                   tmp / (f"optim_rank{r}.pt" if sharded else "optim.pt"))
    if main:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if extras is not None:
            extras(tmp)
    acc.wait_for_everyone()
    if main:
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        write_json_atomic(tmp / "trainer_state.json", {**record, "world_size": acc.num_processes,
                                                       "optim_sharded": sharded, "file_sizes": sizes})
        publish_checkpoint(tmp, root, name, record, prefix, keep)
    acc.wait_for_everyone()


def save_checkpoint(parts: Parts, out: Path, step: int, pos: dict, meta: dict, keep: int) -> None:
    """Write checkpoints/step-N: the trainable tensors, optimiser, RNG, the UPS file and LoRA folder."""
    def extras(tmp: Path) -> None:
        if parts.lm.ups_arch is not None and not parts.fsdp:  # ready for inference (FSDP: at the end only)
            with parts.lm.without_peft() as lm:
                save_ups(tmp / "ups.pt", lm, extra_meta=meta)
        if parts.lora:
            parts.lm.model.save_pretrained(str(tmp / "lora"))

    state = trainable_state(parts)  # collective under FSDP
    write_checkpoint(parts.acc, out, f"step-{step:07d}", "step-", {"step": step, **pos}, state, parts.opt,
                     parts.sched, parts.fsdp, keep, extras)


def load_trainable(step_module: nn.Module, trainable_names: list[str], ck: Path, world: int) -> None:
    """Checkpointed trainable tensors into the (not yet prepared) module (SFT's TrainStep, RL's model)."""
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
        paths["lora"] = export_lora(Path(lora_out or out / "lora"),
                                    lambda tmp: parts.lm.model.save_pretrained(str(tmp)))
    return log_exports(paths)


def export_lora(lora_dir: Path, write) -> str:
    """A LoRA folder that ``write(folder)`` fills, put in place in one rename (SFT and RL exports)."""
    with atomic_path(lora_dir, is_dir=True) as tmp:
        write(tmp)
    return str(lora_dir)


def log_exports(paths: dict) -> dict:
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
