"""The one Remask SFT training loop (both scripts call :func:`run`), on accelerate.

What trains is set by two choices (REMEDI.md "Remask SFT"):

* ``--ups_arch``: ``head`` (Linear / MLP on the detached final hidden state), ``stream`` (the paper's
  extra blocks tapped into the backbone) or ``none`` (plain masked-diffusion training, e.g. pretraining
  the embedded tiny model from scratch with ``--init_config``).
* ``--train_backbone``: ``none`` (frozen; with a head the backbone runs without autograd in bf16 and the
  TPS loss is only logged; with a stream, gradients flow through the frozen backbone into the stream),
  ``lora`` (train_remask_lora.py: peft adapters on the backbone's block linears) or ``full``.

Loss: L_TPS + lambda_ups * L_UPS (``joint``), or, with ``--train_mode alternating``, ``--alt_ratio``
optimiser steps on L_TPS (backbone/LoRA parameters only) per step on lambda_ups * L_UPS (UPS only).
One optimiser with one parameter group per part (LoRA/backbone, UPS), each with its learning rate.

Faults: checkpoints are written into a temporary folder and renamed, then ``latest.json`` is replaced
(a crash during a save leaves the previous checkpoint as the latest); ``--resume`` restores weights,
optimiser, scheduler, RNG and the data position, so a resumed run ends with the same weights as one that
never stopped. Noise is drawn from a generator seeded by (seed, rank, micro-batch index), independent of
any process state. A non-finite loss or gradient norm stops the run before the optimiser step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from remedi.model.checkpoint import (add_stream, atomic_path, check_ups_compatible, load_pretrained, load_ups, read_ups,
                         save_pretrained, save_ups, versions, write_json_atomic)
from remedi.arguments import ModelArgs
from remedi.model.config import get_config
from remedi.model.loading import (MASK_TOKEN, SpecialIds, default_chat, load_tokenizer, preflight,
                      resolve_special_ids)
from remedi.training.losses import UPSMetrics, tps_loss, true_token_logprob, ups_labels, ups_loss
from remedi.model.llada import RemeDiLM, UPSHead, init_weights
from remedi.training.noise import inject_noise
from remedi.training.data import (collate, load_records, micro_batches, resolve_fields, check_fields,
                       tokenize_records)

from remedi.training.args import (DataArgs, LoraArgs, Plan, SftArgs, TrainArgs, default_taps,  # noqa: F401
                         lora_target_modules, plan_from)

log = logging.getLogger(__name__)


# ============================================================================================ arguments
class TrainStep(nn.Module):
    """Everything one micro-batch computes, in one module so DDP/FSDP see a single forward.

    ``phase``: ``joint`` (both losses), ``tps`` or ``ups`` (alternating). The backbone runs without autograd
    when nothing upstream of the outputs needs a gradient (head UPS with a frozen backbone, or a UPS step
    of alternating mode with a head).
    """

    def __init__(self, lm: RemeDiLM, backbone_trains: bool, label_smoothing: bool):
        super().__init__()
        self.lm = lm
        self.backbone_trains = backbone_trains
        self.label_smoothing = label_smoothing

    def forward(self, x_t, x0, answer_mask, masked, incorrect, clean, p_mask, phase: str = "joint"):
        lm = self.lm
        arch = lm.ups_arch
        grad_backbone = (arch == "stream" or (self.backbone_trains and phase != "ups")) and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad_backbone):
            out = lm.model(x_t)
        logp, argmax_ok = true_token_logprob(out.logits, x0, masked)  # (B, L), only on S_mask
        l_tps = tps_loss(logp, masked, p_mask, answer_mask)
        res = {"tps_loss": l_tps, "argmax_ok": argmax_ok}
        if arch is not None:
            ups_logits = lm.ups_head(out.hidden.detach()) if arch == "head" else out.ups_logits  # (B, L)
            labels = ups_labels(clean, incorrect, masked, logp.exp(), smoothing=self.label_smoothing)
            res.update(ups_loss=ups_loss(ups_logits, labels, answer_mask), ups_logits=ups_logits.detach(),
                       labels=labels)
        # Alternating mode: only the phase's loss keeps its graph, so DDP (find_unused_parameters) sees the
        # other part's parameters as unused instead of waiting for gradients that never come.
        if phase == "tps" and "ups_loss" in res:
            res["ups_loss"] = res["ups_loss"].detach()
        if phase == "ups":
            res["tps_loss"] = res["tps_loss"].detach()
        return res


def _derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _lr_lambda(args: TrainArgs, total: int):
    def f(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        if args.lr_scheduler == "constant":
            return 1.0
        frac = min(1.0, (step - args.warmup_steps) / max(1, total - args.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if args.lr_scheduler == "cosine" else 1 - frac
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * shape
    return f


# ============================================================================================ checkpoints
CKPT_FILES = ("trainable.safetensors", "trainer_state.json")


def _rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    p = Path(output_dir) / "checkpoints" / "latest.json"
    if not p.is_file():
        return None
    ck = Path(output_dir) / "checkpoints" / json.loads(p.read_text())["name"]
    missing = [f for f in CKPT_FILES if not (ck / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{p} points to {ck}, which lacks {missing}")
    return ck


# ============================================================================================ the run
class NonFiniteLoss(RuntimeError):
    pass


def _args_record(*objs) -> dict:
    out = {}
    for o in objs:
        out.update(dataclasses.asdict(o))
    return out


_RESUME_FREE = {"resume", "stop_after_steps", "log_every", "save_every", "save_total_limit", "output_dir",
                "save_path", "save_lora_dir", "save_ups_head", "save_model_dir"}


class Trainer:
    """State of one run; :func:`run` drives it. Kept as a class only to share the many handles."""

    def __init__(self, margs: ModelArgs, dargs: DataArgs, targs: TrainArgs, plan: Plan):
        self.margs, self.dargs, self.targs, self.plan = margs, dargs, targs, plan
        self.args_record = _args_record(margs, dargs, targs, plan.lora or SftArgs(
            lr=plan.lr_backbone, train_backbone=plan.train_backbone, save_path=plan.ups_out))
        self.args_record["script"] = plan.script

    # ------------------------------------------------------------------------------------ validation
    def validate_combination(self) -> None:
        t, p = self.targs, self.plan
        has_ups = t.ups_arch != "none" or t.load_ups_head is not None
        if not has_ups and t.lambda_ups != 0:
            raise ValueError("--ups_arch none has no UPS to train: pass --lambda_ups 0 (plain masked-diffusion "
                             "training) or choose --ups_arch head/stream")
        if p.train_backbone == "none" and (not has_ups or t.lambda_ups == 0) and t.ups_arch != "stream":
            raise ValueError("nothing would train: the backbone is frozen (--train_backbone none) and the UPS loss "
                             "is off; set --lambda_ups > 0 or --train_backbone full")
        if p.mode == "alternating" and not has_ups:
            raise ValueError("--train_mode alternating needs a UPS (--ups_arch head or stream)")
        if t.save_model_dir and not (p.train_backbone == "full" or (p.train_backbone == "none"
                                                                     and t.ups_arch == "stream")):
            raise ValueError("--save_model_dir writes a trained backbone (+stream): it needs --train_backbone full, "
                             "or a stream UPS on a frozen backbone (LoRA adapters go to --save_lora_dir, a head UPS "
                             "to --save_path/--save_ups_head)")

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

        t, m = self.targs, self.margs
        self.validate_combination()
        cpu = (m.device or "").startswith("cpu") or not torch.cuda.is_available()
        if m.device and m.device.startswith("cuda:"):
            raise ValueError(f"--device {m.device}: pick GPUs with CUDA_VISIBLE_DEVICES (accelerate places each "
                             "process on its own GPU); use --device cuda or cpu")
        mp = t.mixed_precision
        if mp == "auto":
            mp = os.environ.get("ACCELERATE_MIXED_PRECISION") or ("no" if cpu else "bf16")
        kw = [DistributedDataParallelKwargs(find_unused_parameters=self.plan.mode == "alternating")]
        self.acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=t.grad_accum, cpu=cpu,
                               kwargs_handlers=kw)
        acc = self.acc
        self.main = acc.is_main_process
        # multi-CPU runs report "cpu:<rank>", which safetensors and some kernels reject
        self.device = torch.device("cpu") if acc.device.type == "cpu" else acc.device
        from remedi.arguments import setup_logging

        setup_logging(self.main)
        # output folder (same name on every process)
        out = [t.output_dir or str(Path("runs") / f"{self.plan.script}-"
                                    f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")]
        if acc.num_processes > 1:
            broadcast_object_list(out)
        self.out = Path(out[0])
        self.resume_from = None
        if t.resume:
            self.resume_from = latest_checkpoint(self.out)
            if self.resume_from is None:
                raise FileNotFoundError(f"--resume: {self.out} has no checkpoints/latest.json (was --save_every set?)")
            saved = json.loads((self.out / "args.json").read_text())
            diff = {k: (saved.get(k), v) for k, v in self.args_record.items()
                    if k not in _RESUME_FREE and saved.get(k) != v}
            if diff:
                raise ValueError("--resume with different arguments than the run in "
                                 f"{self.out}: " + "; ".join(f"--{k}: was {a!r}, now {b!r}"
                                                             for k, (a, b) in diff.items()))
        elif (self.out / "args.json").is_file():
            raise ValueError(f"--output_dir {self.out} already holds a run (args.json): pass --resume to continue it "
                             "(needs its --save_every checkpoints) or choose another --output_dir")
        if self.fsdp and self.plan.train_backbone == "lora":
            raise ValueError("LoRA under FSDP is not supported: the adapters are small, run data-parallel with "
                             "configs/accelerate_ddp.yaml (FSDP is for --train_backbone full)")
        self._preflight()
        self._load_data()
        self._build_model()
        self._build_optimizer()

    def _preflight(self) -> None:
        """Everything that can fail without weights: config, UPS/LoRA compatibility, tokenizer, ids."""
        t, m = self.targs, self.margs
        if t.init_config:
            tok = load_tokenizer(t.tokenizer)
            mask = tok.convert_tokens_to_ids(MASK_TOKEN)
            if mask is None or mask == tok.unk_token_id:
                mask = tok.mask_token_id
            if mask is None:
                raise ValueError(f"--tokenizer {t.tokenizer} has no mask token {MASK_TOKEN}")
            n = len(tok)
            cfg = get_config(t.init_config, vocab_size=n, embedding_size=n, mask_token_id=int(mask),
                             eos_token_id=int(tok.eos_token_id), pad_token_id=int(tok.pad_token_id
                                                                                 if tok.pad_token_id is not None
                                                                                 else tok.eos_token_id))
            self.model_dir, self.tok_dir = None, Path(t.tokenizer)
            meta = None
            if t.load_ups_head:
                _, meta = read_ups(t.load_ups_head)
                check_ups_compatible(meta, cfg, t.load_ups_head)
            if self.plan.lora and self.plan.lora.load_lora_dir:
                raise ValueError("--load_lora_dir with --init_config: adapters belong to a pretrained --model_name")
        else:
            lora_dir = self.plan.lora.load_lora_dir if self.plan.lora else None
            self.model_dir, cfg, meta = preflight(m.model_name, t.load_ups_head, lora_dir)
            self.tok_dir = self.model_dir
            tok = load_tokenizer(self.model_dir)
        if self.dargs.seq_len > cfg.max_sequence_length:
            raise ValueError(f"--seq_len {self.dargs.seq_len} exceeds the model's max_sequence_length "
                             f"{cfg.max_sequence_length}")
        self.ups_meta = meta
        self.arch = t.ups_arch
        if meta is not None:
            if meta["ups_arch"] != t.ups_arch:
                log.warning("--load_ups_head %s holds a %s UPS: training that (not --ups_arch %s)",
                            t.load_ups_head, meta["ups_arch"], t.ups_arch)
            self.arch = meta["ups_arch"]
        if self.arch != "stream" and cfg.ups_taps:
            if self.arch == "head":
                raise ValueError(f"{m.model_name} already has a stream UPS (taps {cfg.ups_taps}); train it with "
                                 "--ups_arch stream")
            self.arch = "stream"
        self.cfg, self.tokenizer = cfg, tok
        self.ids: SpecialIds = resolve_special_ids(tok, cfg, m.mask_id)
        specials = set(getattr(tok, "all_special_ids", []) or [])
        ids = self.ids
        specials |= {i for i in (ids.mask, ids.eos, ids.pad, ids.eot, ids.bos) if i is not None}
        self.special_ids = sorted(specials)

    def _load_data(self) -> None:
        d, t = self.dargs, self.targs
        rows, source = load_records(d.dataset, d.split, d.subset, arith_n=d.arith_n, seed=self.margs.seed)
        prompt, answer, join = resolve_fields(d.dataset, d.prompt_field, d.answer_field)
        check_fields(rows, prompt, answer, source)
        if d.max_examples:
            rows = rows[: d.max_examples]
        chat = {"chat": True, "plain": False}.get(d.prompt_format)
        if chat is None:
            chat = default_chat(self.margs.model_name if not t.init_config else t.init_config)
        self.chat = chat
        self.data = tokenize_records(rows, self.tokenizer, prompt_field=prompt, answer_fields=answer, answer_join=join,
                                     seq_len=d.seq_len, chat=chat, eos_id=self.ids.eos, eot_id=self.ids.eot,
                                     source=source)
        if self.main:
            log.info("%s (%s prompts); lengths %s", self.data.summary(), "chat" if chat else "plain", self.data.stats)
        acc = self.acc
        per_epoch = len(micro_batches(len(self.data.examples), t.batch_size, acc.num_processes, 0, 0, 0))
        self.steps_per_epoch = per_epoch // t.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.data.examples)} examples cannot fill one optimiser step of "
                             f"{t.batch_size} x {acc.num_processes} processes x {t.grad_accum} accumulation")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch

    def _build_model(self) -> None:
        t, m, p = self.targs, self.margs, self.plan
        dev = self.device
        from remedi.model.loading import pick_dtype

        frozen_dtype = pick_dtype(m.dtype, dev)
        # FSDP flattens each wrapped unit into one tensor of one dtype: keep everything float32 there
        # (its mixed-precision policy computes in bf16)
        base_dtype = torch.float32 if p.train_backbone == "full" or self.fsdp else frozen_dtype
        # global RNG: the same on every process while building (peft's adapter init draws from it)
        random.seed(m.seed)
        torch.manual_seed(_derive_seed(m.seed, "build"))
        if t.init_config:
            with torch.device(dev):
                lm = RemeDiLM(self.cfg)
            init_weights(lm, std=0.02, generator=torch.Generator().manual_seed(_derive_seed(m.seed, "init")))
            lm.to(base_dtype)
            lm.name_or_path = f"init:{t.init_config}"
        else:
            lm = load_pretrained(self.model_dir, dtype=base_dtype, device=dev)
            lm.name_or_path = m.model_name
        # UPS
        if self.ups_meta is not None:
            load_ups(t.load_ups_head, lm)
        elif self.arch == "head":
            head = UPSHead(self.cfg.d_model, t.ups_width)
            init_weights(head, std=0.02, generator=torch.Generator().manual_seed(_derive_seed(m.seed, "ups")))
            lm.attach_head(head.to(dev))
        elif self.arch == "stream" and not lm.model.has_stream:
            taps = tuple(int(x) for x in t.ups_taps.split(",")) if t.ups_taps else default_taps(self.cfg.n_layers)
            add_stream(lm, taps)
        ups_modules = self._ups_modules(lm)
        for mod in ups_modules:
            mod.to(torch.float32)  # trainable parts keep float32 master weights
        # what trains
        for prm in lm.parameters():
            prm.requires_grad_(p.train_backbone == "full")
        for mod in ups_modules:
            for prm in mod.parameters():
                prm.requires_grad_(True)
        self.peft = None
        if p.train_backbone == "lora":
            lm.model = self._wrap_lora(lm.model)
            for mod in ups_modules:  # peft freezes everything but the adapters
                for prm in mod.parameters():
                    prm.requires_grad_(True)
        if t.gradient_checkpointing:
            lm.set_gradient_checkpointing(True)
        if t.compile:
            lm.compile_blocks()
        lm.train()
        self.lm = lm
        ups_ids = {id(q) for mod in ups_modules for q in mod.parameters()}
        self.ups_params = [q for q in lm.parameters() if id(q) in ups_ids]
        self.backbone_params = [q for q in lm.parameters() if q.requires_grad and id(q) not in ups_ids]
        self.step_module = TrainStep(lm, backbone_trains=bool(self.backbone_params), label_smoothing=t.label_smoothing)
        n_train = sum(q.numel() for q in self.ups_params + self.backbone_params)
        if self.main:
            log.info("model %s: %.2fM parameters, %d trainable (UPS %s, backbone %s), frozen dtype %s",
                     lm.name_or_path, lm.num_parameters() / 1e6, n_train, self.arch, p.train_backbone,
                     base_dtype)

    def _ups_modules(self, lm: RemeDiLM) -> list[nn.Module]:
        if lm.ups_head is not None:
            return [lm.ups_head]
        if lm.model.has_stream:
            mm = lm.model
            return [mm.blocks_upm, mm.backprop_norms, mm.backprop_linears, mm.ln_f_upm, mm.linear_confidence]
        return []

    def _wrap_lora(self, inner: nn.Module) -> nn.Module:
        from peft import LoraConfig, PeftModel, get_peft_model

        la = self.plan.lora
        if la.load_lora_dir:
            pm = PeftModel.from_pretrained(inner, la.load_lora_dir, is_trainable=True)
            c = pm.peft_config["default"]
            if (c.r, c.lora_alpha) != (la.lora_r, la.lora_alpha) and self.main:
                log.warning("--load_lora_dir %s has r=%s alpha=%s: training those (not --lora_r %s --lora_alpha %s)",
                            la.load_lora_dir, c.r, c.lora_alpha, la.lora_r, la.lora_alpha)
            return pm
        cfg = LoraConfig(r=la.lora_r, lora_alpha=la.lora_alpha, lora_dropout=la.lora_dropout,
                         target_modules=lora_target_modules(la.lora_target), bias="none")
        return get_peft_model(inner, cfg)

    def _build_optimizer(self) -> None:
        t, p = self.targs, self.plan
        groups = []
        if self.backbone_params:
            groups.append({"params": self.backbone_params, "lr": p.lr_backbone, "name": "backbone"})
        if self.ups_params:
            groups.append({"params": self.ups_params, "lr": p.lr_ups, "name": "ups"})
        opt = torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=t.weight_decay, betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t, self.total_steps))
        self.trainable_names = [n for n, q in self.step_module.named_parameters() if q.requires_grad]
        if self.resume_from is not None:  # weights go in before FSDP/DDP take the module over
            self._load_trainable(self.resume_from)
        self.model, self.opt = self.acc.prepare(self.step_module, opt)

    # ---------------------------------------------------------------------------------- checkpoints
    @property
    def fsdp(self) -> bool:
        return self.acc.distributed_type.name == "FSDP"

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (gathered) float32 copies of the trainable tensors on the main process, {} elsewhere."""
        full = self.acc.get_state_dict(self.model)  # collective under FSDP
        if not self.main:
            return {}
        return {n: full[n].detach().float().contiguous().cpu() for n in self.trainable_names}

    def _peft_free(self):
        """A context in which ``self.lm.model`` is the plain LLaDAModel (checkpoint writers expect it)."""

        @contextlib.contextmanager
        def ctx():
            wrapped = self.lm.model
            if self.plan.train_backbone == "lora":
                self.lm.model = wrapped.get_base_model()
            try:
                yield self.lm
            finally:
                self.lm.model = wrapped
        return ctx()

    def _meta(self, step: int) -> dict:
        return {"args": self.args_record, "train": {"step": step, "total_steps": self.total_steps,
                                                    "dataset": self.data.source, "chat": self.chat}}

    def save_checkpoint(self, step: int, pos: dict) -> None:
        from safetensors.torch import save_file

        acc = self.acc
        root = self.out / "checkpoints"
        name = f"step-{step:07d}"
        state = self._trainable_state()  # collective under FSDP
        tmp = root / f".{name}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        r = acc.process_index
        torch.save(_rng_state(), tmp / f"rng_rank{r}.pt")
        sharded = self.fsdp
        if sharded or self.main:
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()},
                       tmp / (f"optim_rank{r}.pt" if sharded else "optim.pt"))
        if self.main:
            save_file(state, str(tmp / "trainable.safetensors"))
            if self.lm.ups_arch is not None and not sharded:  # ready for inference (FSDP: at the end only)
                with self._peft_free() as lm:
                    save_ups(tmp / "ups.pt", lm, extra_meta=self._meta(step))
            if self.plan.train_backbone == "lora":
                self.lm.model.save_pretrained(str(tmp / "lora"))
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": step, **pos, "world_size": acc.num_processes, "optim_sharded": sharded}, indent=2) + "\n")
        acc.wait_for_everyone()
        if self.main:
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_json_atomic(root / "latest.json", {"name": name, "step": step})
            kept = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-"))
            for old in kept[: -self.targs.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s", final)
        acc.wait_for_everyone()

    def _load_trainable(self, ck: Path) -> None:
        from safetensors.torch import load_file

        st = json.loads((ck / "trainer_state.json").read_text())
        if st["world_size"] != self.acc.num_processes:
            raise ValueError(f"{ck} was written by {st['world_size']} processes, this run has "
                             f"{self.acc.num_processes}: resume with the same number of processes (the data order "
                             "depends on it)")
        saved = load_file(str(ck / "trainable.safetensors"))
        mismatch = sorted(set(self.trainable_names) ^ set(saved))
        if mismatch:
            raise ValueError(f"{ck}: trainable tensors do not match this run: {mismatch[:6]}")
        params = dict(self.step_module.named_parameters())
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v.to(params[n].dtype))

    def load_checkpoint(self, ck: Path) -> dict:
        """Optimiser, scheduler and RNG (the weights were loaded before ``prepare``); returns the position."""
        acc = self.acc
        st = json.loads((ck / "trainer_state.json").read_text())
        optf = ck / (f"optim_rank{acc.process_index}.pt" if st["optim_sharded"] else "optim.pt")
        blob = torch.load(optf, map_location="cpu", weights_only=True)
        self.opt.load_state_dict(blob["optimizer"])
        self.sched.load_state_dict(blob["scheduler"])
        _set_rng_state(torch.load(ck / f"rng_rank{acc.process_index}.pt", weights_only=True))
        if self.main:
            log.info("resumed from %s (step %d)", ck, st["step"])
        return st

    # ---------------------------------------------------------------------------------- final exports
    def export(self, step: int) -> dict:
        t, p = self.targs, self.plan
        acc = self.acc
        acc.wait_for_everyone()
        paths: dict[str, str] = {}
        gathered = self._gathered_copy() if self.fsdp else None  # collective
        if not self.main:
            return paths
        with (contextlib.nullcontext(gathered) if gathered is not None else self._peft_free()) as lm:
            if lm.ups_arch is not None:
                ups_path = Path(p.ups_out or self.out / "ups.pt")
                save_ups(ups_path, lm, extra_meta=self._meta(step))
                paths["ups"] = str(ups_path)
            if t.save_model_dir and (p.train_backbone == "full" or lm.ups_arch == "stream"):
                self._save_model_dir(lm, Path(t.save_model_dir))
                paths["model_dir"] = t.save_model_dir
        if p.train_backbone == "lora":
            lora_dir = Path(p.lora_out or self.out / "lora")
            with atomic_path(lora_dir, is_dir=True) as tmp:
                self.lm.model.save_pretrained(str(tmp))
            paths["lora"] = str(lora_dir)
        for k, v in paths.items():
            log.info("saved %s: %s", k, v)
        return paths

    def _gathered_copy(self) -> Optional[RemeDiLM]:
        """FSDP: the whole model gathered into a CPU copy on the main process (None elsewhere)."""
        full = self.acc.get_state_dict(self.model)
        if not self.main:
            return None
        with torch.device("meta"):
            copy = RemeDiLM(self.lm.config)
            if self.lm.ups_head is not None:
                copy.attach_head(UPSHead(self.cfg.d_model, self.lm.ups_head.width))
        copy.load_state_dict({k.removeprefix("lm."): v.cpu() for k, v in full.items()}, strict=True, assign=True)
        copy.name_or_path = self.lm.name_or_path
        return copy

    def _save_model_dir(self, lm: RemeDiLM, out: Path) -> None:
        head, lm.ups_head = lm.ups_head, None  # a head UPS is saved on its own, never inside the backbone
        try:
            with atomic_path(out, is_dir=True) as tmp:
                for f in self.tok_dir.iterdir():
                    if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",)
                                        or f.suffix == ".jinja"):
                        shutil.copy2(f, tmp / f.name)
                save_pretrained(lm, tmp)
                write_json_atomic(tmp / "training_args.json", self._meta(-1)["args"])
        finally:
            lm.ups_head = head

    # ---------------------------------------------------------------------------------- the loop
    def phase_of(self, step: int) -> str:
        if self.plan.mode != "alternating":
            return "joint"
        return "ups" if step % (self.plan.alt_ratio + 1) == self.plan.alt_ratio else "tps"

    def train(self) -> dict:
        t, acc = self.targs, self.acc
        from tqdm.auto import tqdm

        step, epoch, micro = 0, 0, 0
        # per-process global RNG for what draws from it while training (LoRA dropout); restored on resume
        torch.manual_seed(_derive_seed(self.margs.seed, "train", acc.process_index))
        if self.resume_from is not None:
            st = self.load_checkpoint(self.resume_from)
            step, epoch, micro = st["step"], st["epoch"], st["micro"]
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is None:
                write_json_atomic(self.out / "args.json", {**self.args_record, "versions": versions()})
            self._truncate_metrics(step)
        metrics = UPSMetrics()
        sums = {"tps_loss": 0.0, "ups_loss": 0.0, "loss": 0.0, "n": 0, "tokens": 0, "grad_norm": 0.0, "n_opt": 0}
        bar = tqdm(total=self.total_steps, initial=step, disable=not self.main, desc=self.plan.script,
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        n_ex = len(self.data.examples)
        world, rank = acc.num_processes, acc.process_index
        stopped = False
        final_metrics: dict = {}
        while step < self.total_steps and not stopped:
            batches = micro_batches(n_ex, t.batch_size, world, rank, self.margs.seed, epoch)
            usable = (len(batches) // t.grad_accum) * t.grad_accum
            while micro < usable and step < self.total_steps:
                phase = self.phase_of(step)
                idx = batches[micro]
                x0, answer = collate([self.data.examples[i] for i in idx], self.ids.eos,
                                     self.dargs.seq_len if self.dargs.pad_to == "seq_len" else None)
                g = torch.Generator().manual_seed(_derive_seed(self.margs.seed, "noise", epoch, micro, rank))
                nz = inject_noise(x0, answer, mask_id=self.ids.mask, r_incorrect=t.r_incorrect, generator=g,
                                  vocab_size=self.cfg.vocab_size, special_ids=self.special_ids,
                                  schedule=t.mask_schedule, incorrect_source=t.incorrect_source,
                                  block_length=t.train_block_length if t.block_diffusion else None)
                dev = self.device
                with acc.accumulate(self.model):
                    res = self.model(nz.x_t.to(dev), x0.to(dev), answer.to(dev), nz.masked.to(dev),
                                     nz.incorrect.to(dev), nz.clean.to(dev), nz.p_mask.to(dev), phase=phase)
                    loss = self._loss(res, phase)
                    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0], device=dev)
                    if world > 1:
                        bad = acc.reduce(bad, "sum")
                    if bad.item() > 0:
                        raise NonFiniteLoss(
                            f"non-finite loss at optimiser step {step + 1} (epoch {epoch}, micro-batch {micro}): "
                            f"tps={res['tps_loss'].item()}, ups={res.get('ups_loss', torch.tensor(0.)).item()}; "
                            "stopped before the update, nothing of this step was saved (last checkpoint: "
                            f"{latest_checkpoint(self.out) if (self.out / 'checkpoints').exists() else 'none'})")
                    acc.backward(loss)
                    sums["tps_loss"] += res["tps_loss"].item()
                    sums["ups_loss"] += res["ups_loss"].item() if "ups_loss" in res else 0.0
                    sums["loss"] += loss.item()
                    sums["n"] += 1
                    sums["tokens"] += x0.numel()
                    if "ups_logits" in res:
                        metrics.update(res["ups_logits"], res["labels"], nz.clean, nz.incorrect, nz.masked,
                                       res["argmax_ok"])
                    synced = acc.sync_gradients
                    if synced != ((micro + 1) % t.grad_accum == 0):
                        raise RuntimeError("accelerate's accumulation counter is out of step with the data position")
                    if synced:
                        self._drop_inactive_grads(phase)
                        gn = acc.clip_grad_norm_(self.model.parameters(),
                                                 t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
                        gn = float(gn) if gn is not None else float("nan")
                        if not math.isfinite(gn):
                            raise NonFiniteLoss(f"non-finite gradient norm at optimiser step {step + 1}: stopped "
                                                "before the update; nothing of this step was saved")
                        self.opt.step()
                        self.sched.step()
                        self.opt.zero_grad(set_to_none=True)
                        sums["grad_norm"] += gn
                        sums["n_opt"] += 1
                micro += 1
                if not synced:
                    continue
                step += 1
                bar.update(1)
                if step % t.log_every == 0 or step == self.total_steps:
                    final_metrics = self._log(step, epoch, sums, metrics, time.perf_counter() - t_last, bar)
                    t_last = time.perf_counter()
                if t.save_every and step % t.save_every == 0 and step < self.total_steps:
                    self.save_checkpoint(step, {"epoch": epoch if micro < usable else epoch + 1,
                                                "micro": micro if micro < usable else 0})
                if t.stop_after_steps is not None and step >= t.stop_after_steps and step < self.total_steps:
                    stopped = True
                    break
            if not stopped:
                epoch, micro = epoch + 1, 0
        bar.close()
        if stopped:
            if self.main:
                log.info("stopped after step %d (--stop_after_steps); continue with --resume", step)
            return {"step": step, "stopped": True, "metrics": final_metrics, "paths": {}}
        paths = self.export(step)
        return {"step": step, "stopped": False, "metrics": final_metrics, "paths": paths}

    def _loss(self, res: dict, phase: str) -> torch.Tensor:
        lam = self.targs.lambda_ups
        tps = res["tps_loss"]
        if phase == "ups":
            return lam * res["ups_loss"]
        if phase == "tps":
            return tps
        loss = tps if tps.requires_grad else tps.new_zeros(())
        if "ups_loss" in res and lam > 0:
            loss = loss + lam * res["ups_loss"]
        return loss

    def _drop_inactive_grads(self, phase: str) -> None:
        """Alternating mode: a TPS step updates only backbone/LoRA, a UPS step only the UPS."""
        if phase == "joint":
            return
        drop = self.ups_params if phase == "tps" else self.backbone_params
        for q in drop:
            q.grad = None

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop the lines a killed run wrote after its last checkpoint."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))

    def _log(self, step, epoch, sums, metrics, seconds, bar) -> dict:
        acc = self.acc
        vals = torch.tensor([sums["tps_loss"], sums["ups_loss"], sums["loss"], sums["n"], sums["tokens"]],
                            dtype=torch.float64, device=self.device)
        if acc.num_processes > 1:
            vals = acc.reduce(vals, "sum")
        n = max(1.0, float(vals[3]))
        rec = {"step": step, "epoch": epoch, "tps_loss": float(vals[0]) / n, "ups_loss": float(vals[1]) / n,
               "loss": float(vals[2]) / n, "grad_norm": sums["grad_norm"] / max(1, sums["n_opt"]),
               "tokens_per_s": float(vals[4]) / max(seconds, 1e-9)}
        for grp in self.opt.param_groups:
            rec[f"lr_{grp.get('name', 'group')}"] = grp["lr"]
        rec.update(metrics.compute())
        rec["time"] = time.time()
        for k in sums:
            sums[k] = 0 if isinstance(sums[k], int) else 0.0
        if self.main:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
            post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if rec.get("auroc_unmasked") is not None:
                post["auroc"] = f"{rec['auroc_unmasked']:.3f}"
            bar.set_postfix(post)
        return rec


def run(margs: ModelArgs, dargs: DataArgs, targs: TrainArgs, extra: SftArgs | LoraArgs, script: str) -> dict:
    """Train as the arguments say; returns {"step", "stopped", "metrics" (last log line), "paths"}."""
    from accelerate.state import AcceleratorState, GradientState

    trainer = Trainer(margs, dargs, targs, plan_from(extra, script))
    try:
        trainer.setup()
        result = trainer.train()
        result["output_dir"] = str(trainer.out)
        if trainer.acc.num_processes > 1:
            trainer.acc.end_training()  # destroys the process group
        return result
    finally:
        # tests (and notebooks) call run() several times in one process: start each from a clean state
        if getattr(trainer, "acc", None) is not None and trainer.acc.num_processes == 1:
            AcceleratorState._reset_state()
            GradientState._reset_state()
