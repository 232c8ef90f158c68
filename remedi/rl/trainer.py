"""The Remask-RL loop (GRPO over whole trajectories) on accelerate; train_remask_rl.py calls :func:`run`.

One update (optimiser step), as the RemeDi authors run it (RemeDi, arXiv:2509.23653, Eq. 8):

1. ``prompts_per_update`` prompts, ``group_size`` rollouts each (:func:`remedi.rl.rollout.rollout`, on the
   sampler's engine: ``--rollout_tokens``, ``--rollout_positions``, ``--rollout_graphs``), split over
   processes and ``grad_accum`` chunks of whole groups, and decoded ``--rollout_batch`` rollouts at a time.
   Rollout b of prompt p draws from its own generator seeded by (seed, update, prompt id, group index), so
   a run is the same at any chunking or batching. Unless ``--no_greedy_stats``, each prompt is also decoded
   once with the evaluated decision (greedy tokens, top_k positions): its reward is the ``--advantage
   greedy`` baseline, its remasks/block the number the rollouts' should stay close to.
2. Rewards (``--reward``, 0/1 math-verify by default; ``--reward_weight`` for the shaped one) and
   advantages (:func:`remedi.rl.advantages.advantages`: ``--advantage group`` A = (R - mean) / (std + 1e-4)
   as the authors, ``loo`` or ``greedy``; ``--credit block``: per-block reward-to-go, (N, nb)).
3. For each rollout batch and step index i: one forward that re-scores step i of every block (block-causal
   layout [prompt | final | x_t(i) of every block]; with ``--layout bidirectional`` one row per block, the
   sampler's view) -- or, with ``--cache_features``, the head UPS on the hidden states the rollout
   recorded, no forward -- and one backward of the clipped surrogate (:mod:`remedi.rl.loss`), normalised
   by the update's number of rollouts per process (DDP averages processes), so the passes sum to the
   gradient of the loss.
4. Gradient clipping, AdamW step, warm-up schedule. The policy changes once per rollout batch, so the
   ratios are 1 when the gradient is taken (REINFORCE with group baselines, clipping inactive).

What trains: ``--train ups`` (the UPS head or stream; the backbone is frozen, LoRA from --lora_path merged
into it) or ``--train ups_lora`` (UPS + peft LoRA adapters). The model is kept in eval mode (no dropout),
so the loss forward scores exactly the policy that sampled.

Faults and restarts: the same runtime as Remask SFT (:mod:`remedi.training.runtime`, :mod:`remedi.training.state`),
so the same rules: output paths are checked before the model loads; the run folder is locked; checkpoints are
atomic and ``--resume`` restores the trainable weights, optimiser, scheduler and RNG (falling back past a
damaged checkpoint), and the data position follows from the update index, so a resumed run ends with the
same weights. ``--max_seconds`` ends a call cleanly (a checkpoint, no export) when one more update would not
fit, so time-limited jobs carry a run on by repeating the command with --resume. A non-finite loss /
gradient norm, or a loss forward whose log-probs disagree with the rollout's (mean |log ratio| >
``--max_log_ratio`` before the step), stops the run before the optimiser step with a message saying what
happened (every process stops together).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from remedi.arguments import ModelArgs, setup_logging
from remedi.decoding.sampler import SamplerConfig
from remedi.files import append_jsonl, check_writable, read_jsonl, write_json_atomic
from remedi.model.loading import load_model, load_tokenizer, pick_dtype, preflight, resolve_special_ids
from remedi.rl import checkpoints as ckpt
from remedi.rl.args import RLArgs
from remedi.tracking import log_metrics
from remedi.rl.advantages import advantages, decision_stats, kept_from_orders
from remedi.rl.data import load_items
from remedi.rl.loss import StepStats, cached_step_logprobs, clean_prefix_cache, step_logprobs, step_loss
from remedi.rl.plots import plot_curves
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
RESUME_FREE = {"resume", "stop_after_updates", "max_seconds", "save_every", "save_total_limit", "output_dir", "save_ups_head",
               "save_lora_dir", "max_updates", "device", "report_to", "probe_temperatures"}
"""Arguments that may change between an RL run and its --resume (they do not change the trajectory)."""
ARG_DEFAULTS = dataclass_defaults(ModelArgs, RLArgs)
PROBE_PROMPTS = 8
"""Prompts --probe_temperatures decodes (one rollout each per temperature, plus one greedy decode)."""


class RLTrainer:
    """One Remask-RL run, on the shared runtime (:mod:`remedi.training.runtime`): :meth:`setup`, :meth:`train`."""

    def __init__(self, margs: ModelArgs, rargs: RLArgs):
        self.margs, self.rargs = margs, rargs
        self.acc = self.lock = None
        self.t_begin = time.monotonic()  # --max_seconds counts from here (setup included)

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
                                  r.cache, r.layout, tokens=r.rollout_tokens, positions=r.rollout_positions,
                                  graphs=r.rollout_graphs, record_hidden=r.cache_features).validate()
        # the evaluated decision: greedy tokens, the K_n best UPS scores (the eval sampler's ``ups`` strategy)
        self.greedy_cfg = replace(self.rcfg, tokens="greedy", positions="top_k", record_hidden=False)
        self.greedy = r.advantage == "greedy" or r.greedy_stats
        if r.prompts_per_update % (self.world * r.grad_accum):
            raise ValueError(f"--prompts_per_update {r.prompts_per_update} must be a multiple of processes x "
                             f"--grad_accum = {self.world} x {r.grad_accum}")
        if r.rollout_graphs and self.fsdp:
            raise ValueError("--rollout_graphs runs the bare model's blocks, which FSDP shards: drop --rollout_graphs "
                             "or run data-parallel (configs/accelerate_ddp.yaml)")
        arch = (self.ups_meta or {}).get("ups_arch", "stream")
        if r.cache_features and arch != "head":
            raise ValueError(f"--cache_features scores a UPS head from recorded hidden states, but "
                             f"{r.ups_head or m.model_name} is a {arch} UPS (it changes the backbone's keys/values): "
                             "drop --cache_features")
        if r.cache_features and self.fsdp:
            raise ValueError("--cache_features is not supported under FSDP: run data-parallel "
                             "(configs/accelerate_ddp.yaml)")
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
        self.reward_ctx = RewardContext(self.tokenizer, self.ids, shaped_weight=r.reward_weight,
                                        block_length=r.block_length)
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
            n_lora = sum(p.numel() for p in self.lora_params)
            what = (f"the UPS ({n:,} parameters; backbone frozen)" if not n_lora else
                    f"the UPS and LoRA adapters ({n:,} parameters, {n_lora:,} of them LoRA)")
            log.info("model %s: UPS %s (%s); training %s; frozen weights in %s", m.model_name, lm.ups_description,
                     r.ups_head or "model's own stream", what, dtype)

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

    def _write_lora(self, out_dir: Path, full, update=None) -> None:
        meta = self._meta(update) if update is not None else {"args": self.record}
        ckpt.write_lora(self.lm, out_dir, full, self.margs.model_name, meta)

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

    def _decode(self, cfg: RolloutConfig, prompts: list, keys: list[str]) -> list:
        """Rollouts of ``prompts`` in batches of --rollout_batch (0: one batch), rollout b drawing from the
        generator seeded by ``keys[b]`` (so a rollout is the same at any batching): a list of RolloutBatch."""
        dev, B = self.device, self.rargs.rollout_batch or max(len(prompts), 1)
        model = self.lm if cfg.graphs else self.model  # the static decoder runs the bare model (no_grad: no DDP)
        out = []
        for lo in range(0, len(prompts), B):
            gens = [torch.Generator(device=dev).manual_seed(item_seed(self.margs.seed, k)) for k in keys[lo:lo + B]]
            out.append(rollout(model, prompts[lo:lo + B], cfg, self.ids, gens))
        return out

    def _score(self, batches: list, rows: list) -> dict:
        """Rewards of consecutive rollout batches answering ``rows``: per-rollout tensors, concatenated."""
        parts, lo = [], 0
        for b in batches:
            parts.append(self.reward_fn(b, rows[lo:lo + b.n], self.reward_ctx))
            lo += b.n
        if self.rargs.credit == "block" and any(p.block_reward is None for p in parts):
            raise ValueError(f"--credit block: --reward {self.rargs.reward} returned no per-block parts")
        nan = torch.full((lo,), float("nan"))
        truth = [p.extras.get("truth") for p in parts]
        return {"reward": torch.cat([p.reward.float().cpu() for p in parts]),
                "correct": torch.cat([p.correct.float().cpu() for p in parts]),
                "block": (torch.cat([p.block_reward.float().cpu() for p in parts])
                          if all(p.block_reward is not None for p in parts) else None),
                "truth": torch.cat([t.float().cpu() for t in truth]) if all(t is not None for t in truth) else nan,
                "remasks": torch.cat([b.remasks.float().mean(1).cpu() for b in batches])}

    def _loss_terms(self, batch, i: int, cache):
        """(tok, pl) new log-probs of step index ``i`` (cached features or a loss forward)."""
        if self.rargs.cache_features:
            return cached_step_logprobs(self.lm, batch, i, self.rcfg)
        return step_logprobs(self.model, batch, i, self.rcfg, self.ids.mask, cache)

    def run_update(self, update: int) -> dict:
        r, acc, dev = self.rargs, self.acc, self.device
        t_start = time.perf_counter()
        epoch, order = self.update_prompts(update)
        per_chunk = r.prompts_per_update // (self.world * r.grad_accum)
        n_local = r.prompts_per_update // self.world * r.group_size
        S = self.rcfg.steps_per_block
        stats = StepStats(r.clip_mode, kl=self.reference is not None)
        cols, greedy_cols = [], []
        # summed over processes: remask events, re-commits, same-token re-commits, blocks, zero-advantage groups
        counts = torch.zeros(5, dtype=torch.float64)
        t_roll = t_greedy = 0.0
        # the loss path: with cached features the head is scored outside DDP, its gradient averaged by hand below
        loss_model = self.lm if r.cache_features else self.model
        for c in range(r.grad_accum):
            lo = (c * self.world + self.rank) * per_chunk
            chunk = [self.items[i] for i in order[lo:lo + per_chunk]]
            rows = [it for it in chunk for _ in range(r.group_size)]
            t0 = time.perf_counter()
            batches = self._decode(self.rcfg, [list(it.prompt_ids) for it in rows],
                                   [f"rl:{update}:{it.id}:{g}" for it in chunk for g in range(r.group_size)])
            res = self._score(batches, rows)
            t_roll += time.perf_counter() - t0
            greedy = None
            if self.greedy:  # one decode per prompt with the evaluated decision: baseline and/or statistics
                t0 = time.perf_counter()
                gb = self._decode(self.greedy_cfg, [list(it.prompt_ids) for it in chunk],
                                  [f"rl:{update}:{it.id}:greedy" for it in chunk])
                gres = self._score(gb, chunk)
                t_greedy += time.perf_counter() - t0
                greedy_cols.append(torch.stack([gres["reward"], gres["correct"], gres["remasks"], gres["truth"]], 1))
                if r.advantage == "greedy":
                    greedy = gres["block"] if r.credit == "block" else gres["reward"]
            adv = advantages(res["reward"], r.group_size, r.advantage, r.credit, block_rewards=res["block"],
                             greedy=greedy)  # (n,) or (n, nb)
            zero = (adv.reshape(len(chunk), -1).abs() <= 1e-8).all(1)
            counts[4] += float(zero.sum())
            lo = 0
            for k, batch in enumerate(batches):
                a = adv[lo:lo + batch.n].float().to(dev)
                lo += batch.n
                dstat = decision_stats(kept_from_orders(batch.orders), batch.tokens)
                counts[:4] += torch.tensor([dstat["remasks"], dstat["recommits"],
                                            dstat["same_token_recommit_share"] * dstat["recommits"]
                                            if dstat["recommits"] else 0.0, dstat["blocks"]], dtype=torch.float64)
                cache = clean_prefix_cache(self.model, batch) if self.shared_prefix and not r.cache_features else None
                for i in range(S):
                    last = c == r.grad_accum - 1 and k == len(batches) - 1 and i == S - 1
                    sync = last and not r.cache_features
                    with contextlib.nullcontext() if sync or r.cache_features else acc.no_sync(self.model):
                        ref = None
                        if self.reference is not None:
                            with torch.no_grad(), self._reference_weights():
                                ref = self._loss_terms(batch, i, cache)
                        loss, st = step_loss(loss_model, batch, i, a, self.rcfg, self.ids.mask, clip=r.clip,
                                             mode=r.clip_mode, normaliser=float(n_local), reference=ref,
                                             kl_coef=r.kl_coef, cache=cache, features=r.cache_features)
                        bad = torch.tensor([0.0 if math.isfinite(st["loss"]) else 1.0], device=dev)
                        if self.world > 1:  # every process stops together
                            bad = acc.reduce(bad, "sum")
                        if bad.item() > 0:
                            raise NonFiniteLoss(f"non-finite loss at update {update + 1}, step index {i}: stopped "
                                                f"before the optimiser step; {self._last_ckpt_note()}")
                        acc.backward(loss)
                    stats.add(st)
                cols.append(torch.stack([
                    res["reward"][lo - batch.n:lo], res["correct"][lo - batch.n:lo], res["remasks"][lo - batch.n:lo],
                    batch.pl_entropy.mean((1, 2)).float().cpu(),
                    torch.tensor([float(row.index(self.ids.eos)) if self.ids.eos in row else float(len(row))
                                  for row in batch.final.tolist()]),
                    res["truth"][lo - batch.n:lo]], 1))
                del cache
            del batches
        if r.cache_features and self.world > 1:  # the head ran outside DDP: average its gradient here
            for p in self.ups_params:  # every process joins every reduce, also one whose loss left p without a grad
                p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), "mean")
        rec = self._reduce(stats.record(), torch.cat(cols), torch.cat(greedy_cols) if greedy_cols else None, counts)
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
        n_roll = r.prompts_per_update * r.group_size
        n_tok = n_roll * self.rcfg.gen_length
        rec.update(update=update + 1, epoch=epoch, rollouts=n_roll, grad_norm=gn, **lrs,
                   rollout_seconds=t_roll, greedy_seconds=t_greedy, loss_seconds=sec - t_roll - t_greedy,
                   update_seconds=sec, rollout_tokens_per_s=n_tok / max(t_roll, 1e-9),
                   rollouts_per_s=n_roll / max(t_roll, 1e-9), time=time.time())
        return rec

    def _reduce(self, rec: dict, per_rollout: torch.Tensor, per_item, counts: torch.Tensor) -> dict:
        """Per-update statistics over every process's rollouts: per_rollout (n, 6) reward, correct,
        remasks/block, PL entropy, length, equation truth; per_item (prompts, 4) the greedy decode's reward,
        correct, remasks/block, equation truth (None: no greedy decode); counts (5,) sums (see run_update)."""
        acc, gs = self.acc, self.rargs.group_size
        keys = sorted(k for k in rec if k != "loss")
        scal = torch.tensor([rec["loss"]] + [rec[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.world > 1:
            per_rollout = acc.gather(per_rollout.to(self.device)).cpu()
            per_item = None if per_item is None else acc.gather(per_item.to(self.device)).cpu()
            counts = acc.reduce(counts.to(self.device), "sum").cpu()
            scal = acc.gather(scal[None]).cpu()  # (world, k)
        else:
            scal = scal[None].cpu()
        R = per_rollout[:, 0]
        nan = float("nan")
        _, recommits, same, blocks, zero = (float(x) for x in counts)
        out = {"reward_mean": float(R.mean()), "reward_std": float(R.std()) if R.numel() > 1 else 0.0,
               "accuracy": float(per_rollout[:, 1].mean()),
               "groups_all_equal": float((R.view(-1, gs).std(1) == 0).float().mean()) if gs > 1 else 1.0,
               "zero_advantage_share": zero / (R.numel() // gs),
               "remasks_per_block": float(per_rollout[:, 2].mean()), "pl_entropy": float(per_rollout[:, 3].mean()),
               "same_token_recommit_share": same / recommits if recommits else nan,
               "recommits_per_block": recommits / blocks if blocks else nan,
               "completion_tokens": float(per_rollout[:, 4].mean()), "loss": float(scal[:, 0].sum())}
        if not per_rollout[:, 5].isnan().all():  # rewards that count equations
            out["equation_truth"] = float(per_rollout[:, 5].mean())
        if per_item is not None:
            out.update(greedy_reward_mean=float(per_item[:, 0].mean()), greedy_accuracy=float(per_item[:, 1].mean()),
                       greedy_remasks_per_block=float(per_item[:, 2].mean()))
            if not per_item[:, 3].isnan().all():
                out["greedy_equation_truth"] = float(per_item[:, 3].mean())
        for j, k in enumerate(keys, 1):
            col = scal[:, j]
            out[k] = float(col.min() if k.endswith("_min") else col.max() if k.endswith("_max") else col.mean())
        return out

    # ------------------------------------------------------------------------------------ the probe
    def probe_temperatures(self, temperatures: list[float], n_prompts: int = PROBE_PROMPTS) -> list[dict]:
        """Remasks/block of rollouts at each position temperature against the greedy decode (the evaluated
        decision) on the first ``n_prompts`` training prompts, one rollout each, the run's token rule: a
        temperature whose rollouts remask about as often as the greedy decode keeps the trained policy close
        to the evaluated one. Rows {ups_temperature, remasks_per_block, greedy_remasks_per_block, pl_entropy,
        reward_mean, greedy_reward_mean}; the greedy row has ups_temperature 0."""
        items = self.items[:n_prompts]
        prompts = [list(it.prompt_ids) for it in items]
        rows = []
        for T in [0.0] + list(temperatures):
            cfg = self.greedy_cfg if T == 0 else replace(self.rcfg, positions="plackett_luce", ups_temperature=T,
                                                          record_hidden=False)
            batches = self._decode(cfg, prompts, [f"probe:{T}:{it.id}" for it in items])
            res = self._score(batches, items)
            rows.append({"ups_temperature": T, "remasks_per_block": float(res["remasks"].mean()),
                         "pl_entropy": float(torch.cat([b.pl_entropy.mean((1, 2)).cpu() for b in batches]).mean())
                         if T else 0.0, "reward_mean": float(res["reward"].mean())})
        for row in rows:
            row["greedy_remasks_per_block"] = rows[0]["remasks_per_block"]
            row["greedy_reward_mean"] = rows[0]["reward_mean"]
        return rows

    def _run_probe(self) -> None:
        temps = self.rargs.probe_temperature_list()
        if not temps or not self.main:
            return
        t0 = time.perf_counter()
        rows = self.probe_temperatures(temps)
        n = min(len(self.items), PROBE_PROMPTS)
        lines = [f"position temperature probe ({n} prompts, {self.rcfg.tokens} tokens, "
                 f"{time.perf_counter() - t0:.1f} s): remasks/block of rollouts vs the greedy decode",
                 f"{'T_pos':>8} {'remasks/block':>14} {'greedy':>8} {'PL entropy':>11} {'reward':>8}"]
        for row in rows:
            name = "greedy" if row["ups_temperature"] == 0 else f"{row['ups_temperature']:g}"
            lines.append(f"{name:>8} {row['remasks_per_block']:>14.2f} {row['greedy_remasks_per_block']:>8.2f} "
                         f"{row['pl_entropy']:>11.3f} {row['reward_mean']:>8.3f}")
        print("\n".join(lines), flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "probe.json", {"prompts": n, "tokens": self.rcfg.tokens, "rows": rows})

    def _out_of_time(self, longest: float) -> bool:
        """--max_seconds: would one more update as long as the longest so far pass the call's wall time? Every
        process stops together (the checkpoint that follows is collective)."""
        limit = self.rargs.max_seconds
        if not limit:
            return False
        late = torch.tensor([float(time.monotonic() - self.t_begin + longest > limit)], device=self.device)
        if self.world > 1:
            late = self.acc.reduce(late, "sum")  # late anywhere: late everywhere
        return bool(late.item() > 0)

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
        self._run_probe()
        bar = tqdm(total=r.max_updates, initial=update, disable=not self.main, desc=SCRIPT, dynamic_ncols=True)
        rec: dict = {}
        stopped = None  # why the loop stopped before --max_updates
        longest = 0.0
        while update < r.max_updates:
            t0 = time.monotonic()
            rec = self.run_update(update)
            update += 1
            longest = max(longest, time.monotonic() - t0)
            if self.main:
                append_jsonl(metrics_path, [rec])
                log_metrics(self, rec, update)
                bar.set_postfix({"reward": f"{rec['reward_mean']:.3f}", "acc": f"{rec['accuracy']:.3f}",
                                 "remask/blk": f"{rec['remasks_per_block']:.1f}"})
            bar.update(1)
            saved = bool(r.save_every and update % r.save_every == 0 and update < r.max_updates)
            if saved:
                self.save_checkpoint(update)
            if r.stop_after_updates is not None and update >= r.stop_after_updates and update < r.max_updates:
                stopped = "--stop_after_updates"
                break
            if update < r.max_updates and self._out_of_time(longest):
                if not saved:  # the stop must be resumable whatever --save_every says
                    self.save_checkpoint(update)
                stopped = "--max_seconds"
                break
        bar.close()
        curves = None
        if self.main:
            title = (f"Remask RL of {Path(self.margs.model_name).name} on {r.dataset}: {r.reward} reward, "
                     f"{r.prompts_per_update} prompts x {r.group_size} rollouts per update")
            curves = str(plot_curves(read_jsonl(metrics_path), self.out / "curves.png", title))
        if stopped:
            if self.main:
                log.info("stopped after update %d of %d (%s); continue with --resume", update, r.max_updates, stopped)
            return {"update": update, "stopped": True, "metrics": rec, "paths": {"curves": curves}}
        paths = self.export(update)
        paths["curves"] = curves
        return {"update": update, "stopped": False, "metrics": rec, "paths": paths}


def run(margs: ModelArgs, rargs: RLArgs) -> dict:
    """Train as the arguments say; returns {"update", "stopped", "metrics" (last update), "paths", "output_dir"}."""
    return run_to_end(RLTrainer(margs, rargs))
