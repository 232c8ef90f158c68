"""Checkpoints of a Remask-RL run: atomic resumable snapshots, exact resume, the final UPS / LoRA exports.

A checkpoint ``<output_dir>/checkpoints/update-NNNNNN/`` holds the trainable tensors (float32
safetensors), the optimiser and scheduler state (one file per process under FSDP), each process's RNG
state, an inference-ready ``ups.safetensors`` (and ``lora/`` for --train ups_lora) and ``trainer_state.json``
(update, world size). It is written into a temporary folder and renamed; then ``latest.json`` is
replaced, so a crash during a save leaves the previous checkpoint as the latest. The data position and
every rollout's random stream follow from the update index, so nothing else is needed to resume exactly.

Under FSDP the UPS and LoRA files are written from accelerate's gathered state dict (a meta-device copy
of the model holding the UPS tensors), never from the sharded module.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from remedi.files import atomic_path, publish_checkpoint, write_json_atomic
from remedi.model.checkpoint import UPS_FILE_NAME, save_lora, save_ups
from remedi.model.llada import RemeDiLM, UPSHead
from remedi.training.state import restore_optimizer_and_rng, rng_state

log = logging.getLogger(__name__)


def latest_checkpoint(out: Path) -> Optional[Path]:
    p = out / "checkpoints" / "latest.json"
    if not p.is_file():
        return None
    ck = out / "checkpoints" / json.loads(p.read_text())["name"]
    missing = [f for f in ("trainable.safetensors", "trainer_state.json") if not (ck / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{p} points to {ck}, which lacks {missing}")
    return ck


class CheckpointMixin:
    """Checkpoint and export methods of :class:`remedi.rl.trainer.RLTrainer` (which holds the state)."""

    def _meta(self, update: int) -> dict:
        return {"args": self.record, "rl": {"update": update, "dataset": self.data_source}}

    def _ups_copy(self, full: dict) -> RemeDiLM:
        """A meta-device RemeDiLM holding only the UPS tensors of a gathered state dict (FSDP exports)."""
        cfg = self.lm_config
        with torch.device("meta"):
            copy = RemeDiLM(cfg)
        if self.lm.ups_head is not None:
            head = UPSHead(cfg.d_model, self.lm.ups_head.width)
            head.load_state_dict({k.removeprefix("ups_head."): v.float().cpu() for k, v in full.items()
                                  if k.startswith("ups_head.")})
            copy.attach_head(head)
        else:
            prefix = "model.base_model.model." if self.lora_params else "model."
            names = set(copy.model.stream_parameter_names())
            sub = {k[len(prefix):]: v.float().cpu() for k, v in full.items()
                   if k.startswith(prefix) and k[len(prefix):] in names}
            copy.model.load_state_dict(sub, strict=False, assign=True)
        copy.name_or_path = self.margs.model_name
        return copy

    def _write_ups(self, path: Path, update: int, full: Optional[dict]) -> None:
        """The UPS as an inference checkpoint (save_ups); from ``full`` (a gathered state dict) under FSDP."""
        if full is None:
            with self.lm.without_peft() as lm:
                save_ups(path, lm, extra_meta=self._meta(update))
        else:
            save_ups(path, self._ups_copy(full), extra_meta=self._meta(update))

    def _write_lora(self, out_dir: Path, full: Optional[dict], update: Optional[int] = None) -> None:
        base = self.margs.model_name  # recorded in adapter_config.json, with the run in README.md
        meta = self._meta(update) if update is not None else {"args": self.record}
        if full is None:
            save_lora(self.lm.model, out_dir, base, meta)
        else:  # peft keeps the lora_ tensors of a state dict relative to the PeftModel
            sd = {k.removeprefix("model."): v.cpu() for k, v in full.items() if "lora_" in k}
            save_lora(self.lm.model, out_dir, base, meta, state_dict=sd)

    def save_checkpoint(self, update: int) -> None:
        from safetensors.torch import save_file

        acc = self.acc
        full = acc.get_state_dict(self.model)  # collective under FSDP
        root = self.out / "checkpoints"
        name = f"update-{update:06d}"
        tmp = root / f".{name}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.fsdp or self.main:  # FSDP: each process holds its shard of the optimiser state
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()},
                       tmp / (f"optim_rank{self.rank}.pt" if self.fsdp else "optim.pt"))
        if self.main:
            state = {n: full[n].detach().float().contiguous().cpu() for n in self.trainable_names}
            save_file(state, str(tmp / "trainable.safetensors"))
            self._write_ups(tmp / UPS_FILE_NAME, update, full if self.fsdp else None)
            if self.lora_params:
                self._write_lora(tmp / "lora", full if self.fsdp else None, update)
            write_json_atomic(tmp / "trainer_state.json", {"update": update, "world_size": self.world,
                                                           "optim_sharded": self.fsdp})
        acc.wait_for_everyone()
        if self.main:
            publish_checkpoint(tmp, root, name, {"update": update}, "update-", self.rargs.save_total_limit)
        acc.wait_for_everyone()

    def _load_trainable(self, ck: Path) -> None:
        from safetensors.torch import load_file

        st = json.loads((ck / "trainer_state.json").read_text())
        if st["world_size"] != self.world:
            raise ValueError(f"{ck} was written by {st['world_size']} processes, this run has {self.world}: resume "
                             "with the same number (the split of rollouts over processes depends on it)")
        saved = load_file(str(ck / "trainable.safetensors"))
        mismatch = sorted(set(self.trainable_names) ^ set(saved))
        if mismatch:
            raise ValueError(f"{ck}: trainable tensors do not match this run: {mismatch[:6]}")
        params = dict(self.lm.named_parameters())
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v.to(params[n].dtype))

    def _load_state(self, ck: Path) -> int:
        st = restore_optimizer_and_rng(ck, self.rank, self.opt, self.sched)
        if self.main:
            log.info("resumed from %s (update %d)", ck, st["update"])
        return int(st["update"])

    def export(self, update: int) -> dict:
        r = self.rargs
        self.acc.wait_for_everyone()
        full = self.acc.get_state_dict(self.model) if self.fsdp else None  # collective under FSDP
        paths: dict = {}
        if not self.main:
            return paths
        ups_path = Path(r.save_ups_head or self.out / UPS_FILE_NAME)
        self._write_ups(ups_path, update, full)
        paths["ups"] = str(ups_path)
        if self.lora_params:
            lora_dir = Path(r.save_lora_dir or self.out / "lora")
            with atomic_path(lora_dir, is_dir=True) as tmp:
                self._write_lora(tmp, full, update)
            paths["lora"] = str(lora_dir)
        for k, v in paths.items():
            log.info("saved %s: %s", k, v)
        return paths

    def _last_ckpt_note(self) -> str:
        ck = latest_checkpoint(self.out) if (self.out / "checkpoints").exists() else None
        return f"last checkpoint: {ck}" if ck else "no checkpoint was written (--save_every)"

