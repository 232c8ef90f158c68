"""What a Remask-RL run writes beside the shared checkpoint (:func:`remedi.training.state.write_checkpoint`):
the inference-ready UPS file and LoRA folder, in every checkpoint and as the final exports.

A checkpoint ``<output_dir>/checkpoints/update-NNNNNN/`` is the one every training script writes (trainable
tensors, optimiser and scheduler, each process's RNG state, trainer_state.json with the update index), plus
``ups.pt`` (and ``lora/`` for --train ups_lora). The data position and every rollout's random stream follow
from the update index, so nothing else is needed to resume exactly.

Under FSDP the UPS and LoRA files are written from accelerate's gathered state dict (a meta-device copy
of the model holding the UPS tensors), never from the sharded module.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from remedi.model.checkpoint import save_ups
from remedi.model.config import LLaDAConfig
from remedi.model.llada import RemeDiLM, UPSHead
from remedi.training.state import export_lora, log_exports, write_checkpoint

log = logging.getLogger(__name__)


def ups_copy(lm: RemeDiLM, cfg: LLaDAConfig, full: dict, lora: bool, name: str) -> RemeDiLM:
    """A meta-device RemeDiLM holding only the UPS tensors of a gathered state dict (FSDP exports)."""
    with torch.device("meta"):
        copy = RemeDiLM(cfg)
    if lm.ups_head is not None:
        head = UPSHead(cfg.d_model, lm.ups_head.width)
        head.load_state_dict({k.removeprefix("ups_head."): v.float().cpu() for k, v in full.items()
                              if k.startswith("ups_head.")})
        copy.attach_head(head)
    else:
        prefix = "model.base_model.model." if lora else "model."
        names = set(copy.model.stream_parameter_names())
        sub = {k[len(prefix):]: v.float().cpu() for k, v in full.items()
               if k.startswith(prefix) and k[len(prefix):] in names}
        copy.model.load_state_dict(sub, strict=False, assign=True)
    copy.name_or_path = name
    return copy


def write_ups(path: Path, lm: RemeDiLM, cfg: LLaDAConfig, meta: dict, full: Optional[dict], lora: bool,
              name: str) -> None:
    """The UPS as an inference checkpoint (save_ups); from ``full`` (a gathered state dict) under FSDP."""
    if full is None:
        with lm.without_peft() as plain:
            save_ups(path, plain, extra_meta=meta)
    else:
        save_ups(path, ups_copy(lm, cfg, full, lora, name), extra_meta=meta)


def write_lora(lm: RemeDiLM, out_dir: Path, full: Optional[dict]) -> None:
    if full is None:
        lm.model.save_pretrained(str(out_dir))
    else:  # peft keeps the lora_ tensors of a state dict relative to the PeftModel
        sd = {k.removeprefix("model."): v.cpu() for k, v in full.items() if "lora_" in k}
        lm.model.save_pretrained(str(out_dir), state_dict=sd)


def save_checkpoint(tr, update: int) -> None:
    """checkpoints/update-N of an :class:`remedi.rl.trainer.RLTrainer` ``tr`` (collective)."""
    full = tr.acc.get_state_dict(tr.model)  # collective under FSDP
    state = ({n: full[n].detach().float().contiguous().cpu() for n in tr.trainable_names}
             if tr.acc.is_main_process else {})

    def extras(tmp: Path) -> None:
        tr._write_ups(tmp / "ups.pt", update, full if tr.fsdp else None)
        if tr.lora_params:
            tr._write_lora(tmp / "lora", full if tr.fsdp else None)

    write_checkpoint(tr.acc, tr.out, f"update-{update:06d}", "update-", {"update": update}, state, tr.opt, tr.sched,
                     tr.fsdp, tr.rargs.save_total_limit, extras)


def export(tr, update: int) -> dict:
    """The final UPS file and LoRA folder of ``tr`` (each written atomically)."""
    r = tr.rargs
    tr.acc.wait_for_everyone()
    full = tr.acc.get_state_dict(tr.model) if tr.fsdp else None  # collective under FSDP
    paths: dict = {}
    if not tr.acc.is_main_process:
        return paths
    ups_path = Path(r.save_ups_head or tr.out / "ups.pt")
    tr._write_ups(ups_path, update, full)
    paths["ups"] = str(ups_path)
    if tr.lora_params:
        paths["lora"] = export_lora(Path(r.save_lora_dir or tr.out / "lora"), lambda tmp: tr._write_lora(tmp, full))
    return log_exports(paths)
