"""The one Remask SFT training loop (both scripts call :func:`run`), on accelerate.

What trains is set by two choices (RemeDi, arXiv:2509.23653, Remask SFT):

* ``--ups_arch``: ``head`` (Linear / MLP on the detached final hidden state), ``stream`` (the paper's
  extra blocks tapped into the backbone) or ``none`` (plain masked-diffusion training, e.g. pretraining
  the embedded tiny model from scratch with ``--init_config``).
* ``--train_backbone``: ``none`` (frozen; with a head the backbone runs without autograd in bf16 and the
  TPS loss is only logged; with a stream, gradients flow through the frozen backbone into the stream),
  ``lora`` (train_remask_lora.py: peft adapters on the backbone's block linears) or ``full``.

Loss: L_TPS + lambda_ups * L_UPS (``joint``), or, with ``--train_mode alternating``, ``--alt_ratio``
optimiser steps on L_TPS (backbone/LoRA parameters only) per step on lambda_ups * L_UPS (UPS only).

Noise is drawn from a generator seeded by (seed, rank, epoch, micro-batch), independent of any process
state, so a resumed run (:mod:`remedi.training.state`) repeats the same draws. A diverged run stops
with the step, the value and the fix, before its weights reach any file: a non-finite loss or gradient
norm, a loss or gradient norm above ``--divergence_bound``, an optimiser overflow, or non-finite weights
after a step.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from remedi.arguments import ModelArgs, setup_logging
from remedi.files import append_jsonl
from remedi.training.args import DataArgs, LoraArgs, Plan, SftArgs, TrainArgs, plan_from
from remedi.training.build import (build_model, build_optimizer, check_outputs, derive_seed, load_data,
                                   preflight_model, validate_combination)
from remedi.training.data import collate, micro_batches
from remedi.training.losses import UPSMetrics
from remedi.training.noise import inject_noise
from remedi.training.self_noise import SelfNoise, draw_self_positions
from remedi.training.runtime import (Diverged, NonFiniteLoss, claim_resume_point, lock_run_folder, make_accelerator,
                                     output_dir, run_to_end, truncate_metrics)
from remedi.training.state import (ARG_DEFAULTS, Parts, args_record, export, latest_checkpoint, load_trainable,
                                   restore, save_checkpoint, write_args)
from remedi.training.step import TrainStep

log = logging.getLogger(__name__)


class Trainer:
    """One run: :meth:`setup` builds it (:mod:`remedi.training.build`), :meth:`train` runs the loop."""

    def __init__(self, margs: ModelArgs, dargs: DataArgs, targs: TrainArgs, plan: Plan):
        self.acc = self.lock = None
        self.margs, self.dargs, self.targs, self.plan = margs, dargs, targs, plan
        self.args_record = args_record(margs, dargs, targs, plan.lora or SftArgs(
            lr=plan.lr_backbone, train_backbone=plan.train_backbone, save_path=plan.ups_out))
        self.args_record["script"] = plan.script

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        m, t, p = self.margs, self.targs, self.plan
        validate_combination(t, p)
        self.acc, self.device = make_accelerator(m.device, t.mixed_precision, t.grad_accum,
                                                 find_unused=p.mode == "alternating")
        self.main = self.acc.is_main_process
        setup_logging(self.main)
        self.out = output_dir(t.output_dir, p.script, self.acc)
        check_outputs(t, p, self.out)
        self.lock = lock_run_folder(self.out, self.acc)
        self.resume_from = claim_resume_point(self.out, self.acc, self.args_record, t.resume, ARG_DEFAULTS,
                                              exports=(p.ups_out, p.lora_out, t.save_model_dir))
        fsdp = self.acc.distributed_type.name == "FSDP"
        if fsdp and p.train_backbone == "lora":
            raise ValueError("LoRA under FSDP is not supported: the adapters are small, run data-parallel with "
                             "configs/accelerate_ddp.yaml (FSDP is for --train_backbone full)")
        world = self.acc.num_processes
        self.spec = preflight_model(m, self.dargs, t, p)
        td = load_data(m, self.dargs, t, self.spec, world, self.main)
        self.data, self.chat, self.total_steps = td.data, td.chat, td.total_steps
        built = build_model(m, t, p, self.spec, self.device, fsdp, self.main)
        self.lm, self.ups_params, self.backbone_params = built.lm, built.ups_params, built.backbone_params
        self_noise = (SelfNoise(self.spec.ids.mask, t.self_noise_temperature, t.self_noise_select)
                      if t.noise_source == "self" else None)
        self.step_module = TrainStep(self.lm, bool(self.backbone_params), t.label_smoothing, t.lambda_ups,
                                     self_noise)
        opt, self.sched = build_optimizer(t, p, built, self.total_steps)
        names = [n for n, q in self.step_module.named_parameters() if q.requires_grad]
        if self.resume_from is not None:  # weights go in before FSDP/DDP take the module over
            load_trainable(self.step_module, names, self.resume_from, world)
        self.model, self.opt = self.acc.prepare(self.step_module, opt)
        self.parts = Parts(self.acc, self.lm, self.model, self.opt, self.sched, names, p.train_backbone == "lora")

    def meta(self, step: int) -> dict:
        return {"args": self.args_record, "train": {"step": step, "total_steps": self.total_steps,
                                                    "dataset": self.data.source, "chat": self.chat}}

    # -------------------------------------------------------------------------------------------- loop
    def phase_of(self, step: int) -> str:
        if self.plan.mode != "alternating":
            return "joint"
        return "ups" if step % (self.plan.alt_ratio + 1) == self.plan.alt_ratio else "tps"

    def train(self) -> dict:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines above the progress bar, not glued to its end
            return self._train()

    def _train(self) -> dict:
        t, acc, m = self.targs, self.acc, self.margs
        from tqdm.auto import tqdm

        step, epoch, micro = 0, 0, 0
        # per-process global RNG for what draws from it while training (LoRA dropout); restored on resume
        torch.manual_seed(derive_seed(m.seed, "train", acc.process_index))
        if self.resume_from is not None:
            st = restore(self.parts, self.resume_from)
            step, epoch, micro = st["step"], st["epoch"], st["micro"]
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is None:
                write_args(self.out, self.args_record)
            truncate_metrics(self.out / "metrics.jsonl", step)
        metrics = UPSMetrics()
        sums = {"tps_loss": 0.0, "ups_loss": 0.0, "loss": 0.0, "n": 0, "tokens": 0, "grad_norm": 0.0, "n_opt": 0}
        bar = tqdm(total=self.total_steps, initial=step, disable=not self.main, desc=self.plan.script,
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        n_ex = len(self.data.examples)
        world, rank = acc.num_processes, acc.process_index
        ids, dev = self.spec.ids, self.device
        stopped = False
        final_metrics: dict = {}
        while step < self.total_steps and not stopped:
            batches = micro_batches(n_ex, t.batch_size, world, rank, m.seed, epoch)
            usable = (len(batches) // t.grad_accum) * t.grad_accum
            while micro < usable and step < self.total_steps:
                phase = self.phase_of(step)
                x0, answer = collate([self.data.examples[i] for i in batches[micro]], ids.eos,
                                     self.dargs.seq_len if self.dargs.pad_to == "seq_len" else None)
                g = torch.Generator().manual_seed(derive_seed(m.seed, "noise", epoch, micro, rank))
                nz = inject_noise(x0, answer, mask_id=ids.mask, r_incorrect=t.r_incorrect, generator=g,
                                  vocab_size=self.spec.cfg.vocab_size, special_ids=self.spec.special_ids,
                                  schedule=t.mask_schedule, incorrect_source=t.incorrect_source,
                                  block_length=t.train_block_length if t.block_diffusion else None)
                extra = {}
                if t.noise_source == "self":
                    self_pos, u = draw_self_positions(nz.incorrect, t.self_noise_ratio, g)
                    extra = {"self_pos": self_pos.to(dev), "self_u": u.to(dev)}
                with acc.accumulate(self.model):
                    res = self.model(nz.x_t.to(dev), x0.to(dev), answer.to(dev), nz.masked.to(dev),
                                     nz.incorrect.to(dev), nz.clean.to(dev), nz.p_mask.to(dev), phase=phase, **extra)
                    loss = res["loss"]
                    self._check_loss(loss, res, step, epoch, micro)
                    acc.backward(loss)
                    sums["tps_loss"] += res["tps_loss"].item()
                    sums["ups_loss"] += res["ups_loss"].item() if "ups_loss" in res else 0.0
                    sums["loss"] += loss.item()
                    sums["n"] += 1
                    sums["tokens"] += x0.numel()
                    if "ups_logits" in res:
                        metrics.update(res["ups_logits"], res["labels"], res["clean"], res["incorrect"],
                                       res["masked"], res["argmax_ok"], self_pos=res.get("self_pos"))
                    synced = acc.sync_gradients
                    if synced != ((micro + 1) % t.grad_accum == 0):
                        raise RuntimeError("accelerate's accumulation counter is out of step with the data position")
                    if synced:
                        self._drop_inactive_grads(phase)
                        gn = acc.clip_grad_norm_(self.model.parameters(),
                                                 t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
                        gn = float(gn) if gn is not None else float("nan")
                        self._check_grad_norm(gn, step)
                        self._optimizer_step(step)
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
                    save_checkpoint(self.parts, self.out, step, {"epoch": epoch if micro < usable else epoch + 1,
                                                                 "micro": micro if micro < usable else 0},
                                    self.meta(step), t.save_total_limit)
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
        p = self.plan
        paths = export(self.parts, out=self.out, ups_out=p.ups_out, lora_out=p.lora_out, model_dir=t.save_model_dir,
                       backbone_trained=p.train_backbone == "full", meta=self.meta(step), tok_dir=self.spec.tok_dir,
                       cfg=self.spec.cfg)
        return {"step": step, "stopped": False, "metrics": final_metrics, "paths": paths}

    def _drop_inactive_grads(self, phase: str) -> None:
        """Alternating mode: a TPS step updates only backbone/LoRA, a UPS step only the UPS."""
        if phase == "joint":
            return
        for q in self.ups_params if phase == "tps" else self.backbone_params:
            q.grad = None

    # ------------------------------------------------------------------------------------- divergence
    def _fix(self) -> str:
        """What was kept, and what to do: the part of every divergence message after its first clause."""
        lrs = ", ".join(f"{g.get('name', 'group')} {g['lr']:.3g}" for g in self.opt.param_groups)
        last = latest_checkpoint(self.out) if (self.out / "checkpoints").exists() else None
        return (f"no weights of this step were saved (last checkpoint: {last or 'none'}); lower the learning "
                f"rate ({self.plan.lr_flags}; this step used {lrs}) and start again")

    def _check_loss(self, loss: torch.Tensor, res: dict, step: int, epoch: int, micro: int) -> None:
        """Stop before the update when the loss (on any process) is not finite or above the bound."""
        bound = self.targs.divergence_bound
        v = loss.detach().float().reshape(1)
        finite = torch.isfinite(v)
        too_big = finite & (v.abs() > bound) if bound > 0 else torch.zeros_like(finite)
        flags = torch.cat([(~finite).float(), too_big.float()])
        if self.acc.num_processes > 1:
            flags = self.acc.reduce(flags, "sum")
        bad_nan, bad_big = flags.tolist()
        if bad_nan > 0:
            raise NonFiniteLoss(
                f"non-finite loss at optimiser step {step + 1} (epoch {epoch}, micro-batch {micro}): "
                f"tps={res['tps_loss'].item()}, ups={res.get('ups_loss', torch.tensor(0.)).item()}; stopped before "
                f"the update, {self._fix()}")
        if bad_big > 0:
            raise Diverged(f"training diverged at optimiser step {step + 1} (epoch {epoch}, micro-batch {micro}): "
                           f"loss {v.item():.3g} is above --divergence_bound {bound:g}; stopped before the update, "
                           + self._fix())

    def _check_grad_norm(self, gn: float, step: int) -> None:
        if not math.isfinite(gn):
            raise NonFiniteLoss(f"non-finite gradient norm at optimiser step {step + 1}: stopped before the update; "
                                + self._fix())
        bound = self.targs.divergence_bound
        if bound > 0 and gn > bound:
            raise Diverged(f"training diverged at optimiser step {step + 1}: gradient norm {gn:.3g} is above "
                           f"--divergence_bound {bound:g}; stopped before the update, " + self._fix())

    def _optimizer_step(self, step: int) -> None:
        """AdamW's update, then a check that every trainable weight is still finite (on every process)."""
        try:
            self.opt.step()
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            raise Diverged(f"the optimiser's update overflowed at optimiser step {step + 1} ({e}): the learning "
                           "rate is far too large; " + self._fix()) from e
        trainable = [q for q in self.model.parameters() if q.requires_grad]
        ok = torch.stack([torch.isfinite(q.detach()).all() for q in trainable]).all() if trainable else None
        bad = torch.tensor([0.0 if ok is None or bool(ok) else 1.0], device=self.device)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, "sum")
        if bad.item() > 0:
            raise NonFiniteLoss(f"non-finite weights after optimiser step {step + 1}: the run diverged; "
                                + self._fix())

    # ---------------------------------------------------------------------------------------- logging
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
            append_jsonl(self.out / "metrics.jsonl", [rec])
            post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if rec.get("auroc_unmasked") is not None:
                post["auroc"] = f"{rec['auroc_unmasked']:.3f}"
            bar.set_postfix(post)
            log.info("step %d/%d: %s", step, self.total_steps, ", ".join(
                f"{k} {rec[k]:.4g}" for k in ("loss", "tps_loss", "ups_loss", "auroc_unmasked", "auroc_masked",
                                               "self_wrong_frac", "auroc_self") if rec.get(k) is not None))
        return rec


def run(margs: ModelArgs, dargs: DataArgs, targs: TrainArgs, extra: SftArgs | LoraArgs, script: str) -> dict:
    """Train as the arguments say; returns {"step", "stopped", "metrics" (last log line), "paths", "output_dir"}."""
    return run_to_end(Trainer(margs, dargs, targs, plan_from(extra, script)))
