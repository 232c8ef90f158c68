"""The Remask-RL loop (GRPO over whole trajectories) on accelerate; train_remask_rl.py calls :func:`run`.

One update (optimiser step), as the RemeDi authors run it (RemeDi, arXiv:2509.23653, Eq. 8):

1. ``prompts_per_update`` prompts, ``group_size`` rollouts each (:func:`remedi.rl.rollout.rollout`), split
   over processes and ``grad_accum`` chunks of whole groups. Rollout b of prompt p draws from its own
   generator seeded by (seed, update, prompt id, group index), so a run is the same at any chunking.
2. Rewards (``--reward``, 0/1 math-verify by default) and group advantages A = (R - mean) / (std + 1e-4).
3. For each step index i: one forward that re-scores step i of every block (block-causal layout
   [prompt | final | x_t(i) of every block]; with ``--layout bidirectional`` one row per block, the
   sampler's view) and one backward of the clipped surrogate (:mod:`remedi.rl.loss`), normalised by the
   update's number of rollouts per process (DDP averages processes), so the S passes sum to the gradient
   of the loss.
4. Gradient clipping, AdamW step, warm-up schedule. The policy changes once per rollout batch, so the
   ratios are 1 when the gradient is taken (REINFORCE with group baselines, clipping inactive).

What trains: ``--train ups`` (the UPS head or stream; the backbone is frozen, LoRA from --lora_path merged
into it) or ``--train ups_lora`` (UPS + peft LoRA adapters). The model is kept in eval mode (no dropout),
so the loss forward scores exactly the policy that sampled.

Faults and restarts: the same runtime as Remask SFT (:mod:`remedi.training.runtime`, :mod:`remedi.training.state`),
so the same rules: output paths are checked before the model loads; the run folder is locked; checkpoints are
atomic and ``--resume`` restores the trainable weights, optimiser, scheduler and RNG (falling back past a
damaged checkpoint), and the data position follows from the update index, so a resumed run ends with the
same weights. A non-finite loss / gradient norm, or a loss forward whose log-probs disagree with the
rollout's (mean |log ratio| > ``--max_log_ratio`` before the step), stops the run before the optimiser
step with a message saying what happened (every process stops together).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from remedi.arguments import ModelArgs, setup_logging
from remedi.decoding.sampler import SamplerConfig
from remedi.files import append_jsonl, check_writable, read_jsonl
from remedi.model.loading import load_model, load_tokenizer, pick_dtype, preflight, resolve_special_ids
from remedi.rl import checkpoints as ckpt
from remedi.rl.args import RLArgs
from remedi.rl.data import load_items
from remedi.rl.loss import StepStats, clean_prefix_cache, step_logprobs, step_loss
from remedi.rl.plots import plot_curves
from remedi.rl.policy import group_advantages
from remedi.rl.rewards import RewardContext, get_reward
from remedi.rl.rollout import RolloutConfig, rollout
from remedi.session import default_ups_head, is_embedded, item_seed
from remedi.training.build import adamw, attach_lora, schedule, seed_build, split_trainable
from remedi.training.runtime import (Diverged, NonFiniteLoss, claim_resume_point, lock_run_folder, make_accelerator,
                                     output_dir, run_to_end, truncate_metrics)
from remedi.training.state import (args_record, dataclass_defaults, latest_checkpoint, load_trainable,
                                   restore_optimizer_and_rng, write_args)

log = logging.getLogger(__name__)

SCRIPT = "train_remask_rl"
RESUME_FREE = {"resume", "stop_after_updates", "save_every", "save_total_limit", "output_dir", "save_ups_head",
               "save_lora_dir", "max_updates", "device"}
"""Arguments that may change between an RL run and its --resume (they do not change the trajectory)."""
ARG_DEFAULTS = dataclass_defaults(ModelArgs, RLArgs)


class RLTrainer:
    """One Remask-RL run, on the shared runtime (:mod:`remedi.training.runtime`): :meth:`setup`, :meth:`train`."""

    def __init__(self, margs: ModelArgs, rargs: RLArgs):
        self.margs, self.rargs = margs, rargs
        self.acc = self.lock = None

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        m, r = self.margs, self.rargs
        self.acc, self.device = make_accelerator(m.device, r.mixed_precision)
        acc = self.acc
        self.main, self.world, self.rank = acc.is_main_process, acc.num_processes, acc.process_index
        self.fsdp = acc.distributed_type.name == "FSDP"
        setup_logging(self.main)
        if self.fsdp:
            plugin = acc.state.fsdp_plugin
            if getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
                raise ValueError("FSDP with a frozen backbone needs fsdp_version: 2 or use_orig_params: true in the "
                                 "accelerate config (FSDP1 flattens frozen and trainable weights together)")
            if r.kl_coef > 0:
                raise ValueError("--kl_coef > 0 is not supported under FSDP (its reference swaps weights in place); "
                                 "run data-parallel (configs/accelerate_ddp.yaml)")
        self.out = output_dir(r.output_dir, SCRIPT, acc)
        self._check_outputs()
        self._preflight()
        self.lock = lock_run_folder(self.out, acc)
        self.resume_from = claim_resume_point(self.out, acc, self.record, r.resume, ARG_DEFAULTS, RESUME_FREE,
                                              exports=(r.save_ups_head, r.save_lora_dir))
        self._load_data()
        self._build_model()
        self._build_optimizer()

    def _check_outputs(self) -> None:
        """Every output path is usable: before any weight loads."""
        r = self.rargs
        check_writable(self.out, "--output_dir", is_dir=True)
        if r.save_ups_head:
            check_writable(r.save_ups_head, "--save_ups_head")
        if r.save_lora_dir:
            if r.train != "ups_lora":
                raise ValueError("--save_lora_dir needs --train ups_lora (with --train ups nothing but the UPS trains)")
            check_writable(r.save_lora_dir, "--save_lora_dir", is_dir=True)

    def _preflight(self) -> None:
        """The model folder, UPS and LoRA metadata, defaults and lengths: everything that needs no weights."""
        m, r = self.margs, self.rargs
        if r.ups_head is None:
            r.ups_head = default_ups_head(m.model_name)
        self.model_dir, cfg, self.ups_meta = preflight(m.model_name, r.ups_head, r.lora_path)
        if self.ups_meta is None and not cfg.ups_taps:
            raise ValueError(f"{m.model_name} has no UPS: Remask RL starts from a Remask-SFT UPS, pass --ups_head "
                             "CHECKPOINT (train one with train_remask_sft.py)")
        self.origin = r.resolve(self.model_dir, is_embedded(m.model_name))
        script = ((self.ups_meta or {}).get("args") or {}).get("script")
        if r.layout == "block_causal" and script in ("train_remask_sft", "train_remask_lora"):
            log.warning("--ups_head %s was trained by %s on whole sequences, but --layout block_causal decodes each "
                        "block seeing only the prompt and earlier blocks: the model is off its training distribution "
                        "there; --layout bidirectional matches its training (and the sampler)", r.ups_head, script)
        # lengths as the sampler checks them (one rule, one message); then what only a stochastic policy needs
        SamplerConfig(gen_length=r.gen_length, block_length=r.block_length, steps=r.steps).validate()
        self.rcfg = RolloutConfig(r.gen_length, r.block_length, r.steps, r.temperature, r.ups_temperature,
                                  r.cache, r.layout).validate()
        if r.prompts_per_update % (self.world * r.grad_accum):
            raise ValueError(f"--prompts_per_update {r.prompts_per_update} must be a multiple of processes x "
                             f"--grad_accum = {self.world} x {r.grad_accum}")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(self.model_dir)
        self.ids = resolve_special_ids(self.tokenizer, cfg, m.mask_id)
        self.record = {**args_record(m, r), "script": SCRIPT}

    def _load_data(self) -> None:
        m, r = self.margs, self.rargs
        self.items, self.data_source = load_items(r, self.tokenizer, m.model_name, m.seed,
                                                  self.cfg.max_sequence_length - r.gen_length)
        if len(self.items) < r.prompts_per_update:
            raise ValueError(f"{self.data_source}: {len(self.items)} usable prompts cannot fill one update of "
                             f"--prompts_per_update {r.prompts_per_update}")
        self.reward_fn = get_reward(r.reward)
        if self.main:
            log.info("%s: %d prompts; reward %s; %d prompts x %d rollouts an update", self.data_source,
                     len(self.items), r.reward, r.prompts_per_update, r.group_size)

    def _build_model(self) -> None:
        """Backbone + UPS (+ LoRA merged, --train ups) through the shared loader; LoRA adapters that train
        (--train ups_lora) through the shared LoRA builder; UPS in float32, everything else frozen."""
        m, r = self.margs, self.rargs
        dev = self.device
        dtype = pick_dtype(m.dtype, dev)
        seed_build(m.seed, item_seed(m.seed, "build"))  # peft's adapter init draws from the global RNG
        lm = load_model(self.model_dir, self.cfg, ups_head=r.ups_head if self.ups_meta is not None else None,
                        lora_path=r.lora_path if r.train == "ups" else None, device=str(dev), dtype=m.dtype)
        lm.name_or_path = m.model_name
        self.lm_config = lm.config  # with the stream's taps; before peft wraps lm.model
        for p in lm.parameters():
            p.requires_grad_(False)
        for mod in lm.ups_modules():
            mod.to(torch.float32)  # float32 master weights for what trains
        if r.train == "ups_lora":
            lm.model = attach_lora(lm.model, r.lora_path, r.lora_r, r.lora_alpha, 0.0, r.lora_target, warn=False)
            drop = lm.model.peft_config["default"].lora_dropout
            if drop:
                raise ValueError(f"--lora_path {r.lora_path} has lora_dropout {drop}: the loss forward must score "
                                 "the sampling policy exactly; re-save the adapters with lora_dropout 0")
        for mod in lm.ups_modules():
            for p in mod.parameters():
                p.requires_grad_(True)
        lm.eval()
        self.lm = lm
        self.ups_params, self.lora_params = split_trainable(lm)
        self.trainable_names = [n for n, p in lm.named_parameters() if p.requires_grad]
        # a head on a frozen backbone leaves every key/value fixed: the loss passes share [prompt | final]
        self.shared_prefix = lm.ups_arch == "head" and not self.lora_params and r.layout == "block_causal"
        # the reference policy of the KL penalty: the starting weights (rebuilt identically on resume)
        self.reference = ({n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
                          if r.kl_coef > 0 else None)
        if self.main:
            n = sum(p.numel() for p in self.ups_params + self.lora_params)
            log.info("model %s: UPS %s (%s), trains %s: %d parameters (%.2fM LoRA); frozen dtype %s", m.model_name,
                     lm.ups_arch, r.ups_head or "model's own stream", r.train, n,
                     sum(p.numel() for p in self.lora_params) / 1e6, dtype)

    def _build_optimizer(self) -> None:
        r = self.rargs
        groups = [{"params": self.ups_params, "lr": r.lr, "name": "ups"}]
        if self.lora_params:
            groups.append({"params": self.lora_params, "lr": r.lr_lora or r.lr, "name": "lora"})
        opt = adamw(groups, lr=r.lr, weight_decay=r.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(r.warmup_steps))  # warm-up, then constant
        if self.resume_from is not None:  # weights before prepare (DDP broadcasts them from rank 0)
            load_trainable(self.lm, self.trainable_names, self.resume_from, self.world)
        self.model, self.opt = self.acc.prepare(self.lm, opt)

    # ------------------------------------------------------------------------------------ checkpoints
    def _meta(self, update: int) -> dict:
        return {"args": self.record, "rl": {"update": update, "dataset": self.data_source}}

    def _write_ups(self, path: Path, update: int, full) -> None:
        ckpt.write_ups(path, self.lm, self.lm_config, self._meta(update), full, bool(self.lora_params),
                       self.margs.model_name)

    def _write_lora(self, out_dir: Path, full) -> None:
        ckpt.write_lora(self.lm, out_dir, full)

    def save_checkpoint(self, update: int) -> None:
        ckpt.save_checkpoint(self, update)

    def export(self, update: int) -> dict:
        return ckpt.export(self, update)

    def _load_state(self, ck: Path) -> int:
        st = restore_optimizer_and_rng(ck, self.rank, self.opt, self.sched)
        if self.main:
            log.info("resumed from %s (update %d)", ck, st["update"])
        return int(st["update"])

    def _last_ckpt_note(self) -> str:
        ck = latest_checkpoint(self.out) if (self.out / "checkpoints").exists() else None
        return f"last checkpoint: {ck}" if ck else "no checkpoint was written (--save_every)"

    # ------------------------------------------------------------------------------------ one update
    def update_prompts(self, update: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of an update: consecutive slices of per-epoch permutations (tail dropped)."""
        from remedi.training.data import epoch_order

        n, k = len(self.items), self.rargs.prompts_per_update
        usable = (n // k) * k
        epoch, offset = divmod(update * k, usable)
        return epoch, epoch_order(n, self.margs.seed, epoch)[offset:offset + k]

    @contextlib.contextmanager
    def _reference_weights(self):
        params = dict(self.lm.named_parameters())
        with torch.no_grad():
            saved = {n: params[n].detach().clone() for n in self.reference}
            for n, v in self.reference.items():
                params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    def run_update(self, update: int) -> dict:
        r, acc, dev = self.rargs, self.acc, self.device
        t_start = time.perf_counter()
        epoch, order = self.update_prompts(update)
        per_chunk = r.prompts_per_update // (self.world * r.grad_accum)
        n_local = r.prompts_per_update // self.world * r.group_size
        S = self.rcfg.steps_per_block
        stats = StepStats(r.clip_mode, kl=self.reference is not None)
        rewards, correct, remasks, entropy, lengths = [], [], [], [], []
        t_roll = 0.0
        ctx = RewardContext(self.tokenizer, self.ids)
        for c in range(r.grad_accum):
            lo = (c * self.world + self.rank) * per_chunk
            chunk = [self.items[i] for i in order[lo:lo + per_chunk]]
            rows = [it for it in chunk for _ in range(r.group_size)]
            gens = [torch.Generator(device=dev).manual_seed(item_seed(self.margs.seed, f"rl:{update}:{it.id}:{g}"))
                    for it in chunk for g in range(r.group_size)]
            t0 = time.perf_counter()
            batch = rollout(self.model, [list(it.prompt_ids) for it in rows], self.rcfg, self.ids, gens)
            res = self.reward_fn(batch, rows, ctx)
            t_roll += time.perf_counter() - t0
            adv = group_advantages(res.reward.float(), r.group_size).to(dev)  # (n,)
            cache = clean_prefix_cache(self.model, batch) if self.shared_prefix else None
            for i in range(S):
                last = c == r.grad_accum - 1 and i == S - 1
                with contextlib.nullcontext() if last else acc.no_sync(self.model):
                    ref = None
                    if self.reference is not None:
                        with torch.no_grad(), self._reference_weights():
                            ref = step_logprobs(self.model, batch, i, self.rcfg, self.ids.mask, cache)
                    loss, st = step_loss(self.model, batch, i, adv, self.rcfg, self.ids.mask, clip=r.clip,
                                         mode=r.clip_mode, normaliser=float(n_local), reference=ref,
                                         kl_coef=r.kl_coef, cache=cache)
                    bad = torch.tensor([0.0 if math.isfinite(st["loss"]) else 1.0], device=dev)
                    if self.world > 1:  # every process stops together
                        bad = acc.reduce(bad, "sum")
                    if bad.item() > 0:
                        raise NonFiniteLoss(f"non-finite loss at update {update + 1}, step index {i}: stopped before "
                                             f"the optimiser step; {self._last_ckpt_note()}")
                    acc.backward(loss)
                stats.add(st)
            rewards.append(res.reward.float())
            correct.append(res.correct.float())
            remasks.append(batch.remasks.float().mean(1).cpu())
            entropy.append(batch.pl_entropy.mean((1, 2)).cpu())
            lengths.append(torch.tensor([float(row.index(self.ids.eos)) if self.ids.eos in row else float(len(row))
                                         for row in batch.final.tolist()]))
        rec = self._reduce(stats.record(), rewards, correct, remasks, entropy, lengths)
        for part in ("tok", "pl"):
            v = rec.get(f"{part}_abs_log_ratio", 0.0)
            if v == v and v > r.max_log_ratio:
                raise Diverged(
                    f"update {update + 1}: the loss forward's {part} log-probs disagree with the rollout's (mean |log "
                    f"ratio| {v:.3g} > --max_log_ratio {r.max_log_ratio}) although the policy has not changed since "
                    f"sampling: the loss layout does not score what the rollout sampled (numerics or a bug); stopped "
                    f"before the optimiser step; {self._last_ckpt_note()}")
        params = [p for g in self.opt.param_groups for p in g["params"]]
        gn = acc.clip_grad_norm_(params, r.max_grad_norm if r.max_grad_norm > 0 else float("inf"))
        gn = float(gn) if gn is not None else float("nan")
        if not math.isfinite(gn):
            raise NonFiniteLoss(f"non-finite gradient norm at update {update + 1}: stopped before the optimiser "
                                 f"step; {self._last_ckpt_note()}")
        lrs = {f"lr_{g['name']}": g["lr"] for g in self.opt.param_groups}
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        sec = time.perf_counter() - t_start
        n_tok = r.prompts_per_update * r.group_size * self.rcfg.gen_length
        rec.update(update=update + 1, epoch=epoch, rollouts=r.prompts_per_update * r.group_size, grad_norm=gn, **lrs,
                   rollout_seconds=t_roll, loss_seconds=sec - t_roll, update_seconds=sec,
                   rollout_tokens_per_s=n_tok / max(t_roll, 1e-9), time=time.time())
        return rec

    def _reduce(self, rec: dict, rewards, correct, remasks, entropy, lengths) -> dict:
        """Per-update statistics over every process's rollouts."""
        acc, gs = self.acc, self.rargs.group_size
        per_rollout = torch.stack([torch.cat(x) for x in (rewards, correct, remasks, entropy, lengths)], 1)  # (n, 5)
        keys = sorted(k for k in rec if k != "loss")
        scal = torch.tensor([rec["loss"]] + [rec[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.world > 1:
            per_rollout = acc.gather(per_rollout.to(self.device)).cpu()
            scal = acc.gather(scal[None]).cpu()  # (world, k)
        else:
            scal = scal[None].cpu()
        R = per_rollout[:, 0]
        out = {"reward_mean": float(R.mean()), "reward_std": float(R.std()) if R.numel() > 1 else 0.0,
               "accuracy": float(per_rollout[:, 1].mean()),
               "groups_all_equal": float((R.view(-1, gs).std(1) == 0).float().mean()),
               "remasks_per_block": float(per_rollout[:, 2].mean()), "pl_entropy": float(per_rollout[:, 3].mean()),
               "completion_tokens": float(per_rollout[:, 4].mean()), "loss": float(scal[:, 0].sum())}
        for j, k in enumerate(keys, 1):
            col = scal[:, j]
            out[k] = float(col.min() if k.endswith("_min") else col.max() if k.endswith("_max") else col.mean())
        return out

    # ------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from tqdm.auto import tqdm

        r = self.rargs
        update = 0
        torch.manual_seed(item_seed(self.margs.seed, f"train:{self.rank}"))
        if self.resume_from is not None:
            update = self._load_state(self.resume_from)
        metrics_path = self.out / "metrics.jsonl"
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is None:
                write_args(self.out, {**self.record, "resolved_from": self.origin})
            truncate_metrics(metrics_path, update, "update")
        bar = tqdm(total=r.max_updates, initial=update, disable=not self.main, desc=SCRIPT, dynamic_ncols=True)
        rec: dict = {}
        stopped = False
        while update < r.max_updates:
            rec = self.run_update(update)
            update += 1
            if self.main:
                append_jsonl(metrics_path, [rec])
                bar.set_postfix({"reward": f"{rec['reward_mean']:.3f}", "acc": f"{rec['accuracy']:.3f}",
                                 "remask/blk": f"{rec['remasks_per_block']:.1f}"})
            bar.update(1)
            if r.save_every and update % r.save_every == 0 and update < r.max_updates:
                self.save_checkpoint(update)
            if r.stop_after_updates is not None and update >= r.stop_after_updates and update < r.max_updates:
                stopped = True
                break
        bar.close()
        curves = None
        if self.main:
            title = (f"Remask RL of {Path(self.margs.model_name).name} on {r.dataset}: {r.reward} reward, "
                     f"{r.prompts_per_update} prompts x {r.group_size} rollouts per update")
            curves = str(plot_curves(read_jsonl(metrics_path), self.out / "curves.png", title))
        if stopped:
            if self.main:
                log.info("stopped after update %d (--stop_after_updates); continue with --resume", update)
            return {"update": update, "stopped": True, "metrics": rec, "paths": {"curves": curves}}
        paths = self.export(update)
        paths["curves"] = curves
        return {"update": update, "stopped": False, "metrics": rec, "paths": paths}


def run(margs: ModelArgs, rargs: RLArgs) -> dict:
    """Train as the arguments say; returns {"update", "stopped", "metrics" (last update), "paths", "output_dir"}."""
    return run_to_end(RLTrainer(margs, rargs))
