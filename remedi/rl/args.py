"""Arguments of train_remask_rl.py (with :class:`remedi.arguments.ModelArgs`).

Defaults follow the RemeDi authors' Remask RL: 16 rollouts a prompt, 16 prompts an update,
T_tok = T_pos = 1.2, clip 0.2 (token and PL terms clipped separately), no KL, AdamW lr 3e-6, 10 warm-up
updates, gradient clipping 1.0, 100 updates, 16 steps per 32-token block.

Fields that default to ``None`` are filled by :meth:`RLArgs.resolve`: gen_length / block_length / steps
from the model folder's ``defaults.json`` (the embedded model: gen 96, block 32, 48 steps, i.e. the authors'
16 steps per 32-token block), and for the embedded tiny model (the default ``--model_name``) a CPU-sized
demonstration, :data:`EMBEDDED_DEFAULTS`: 2 prompts x 4 rollouts an update, 4 updates, lr 1e-3 (AdamW's
usual step for its 25k-parameter MLP head; 3e-6 would not move it in a few updates), 1 warm-up update,
and the ``bidirectional`` layout: the embedded model and its UPS were trained on whole sequences, and
decode the first 200 validation problems at 0.390 in that view (a near-greedy rollout reproduces the
sampler's ``ups`` strategy) but at 0.135 in the block-causal one (CPU, float32). One update is 8
rollouts of 96 tokens (48 full-sequence forwards each) and 16 loss passes of 8 x 3 rows: about 13 s of
one CPU core, so the run takes about a minute. It shows the loop working, not an accuracy gain (4
updates of 8 rollouts are far too few for that).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from remedi.arguments import arg, fill_defaults
from remedi.decoding.args import MODEL_DEFAULTS_FILE, model_sampling_defaults
from remedi.rl.advantages import BASELINES, CREDITS
from remedi.rl.rewards import REWARDS
from remedi.tracking import REPORT_TO_HELP

log = logging.getLogger(__name__)

AUTHORS_DEFAULTS = {"group_size": 16, "prompts_per_update": 16, "max_updates": 100, "lr": 3e-6, "warmup_steps": 10,
                    "layout": "block_causal"}
EMBEDDED_DEFAULTS = {"group_size": 4, "prompts_per_update": 2, "max_updates": 4, "lr": 1e-3, "warmup_steps": 1,
                     "layout": "bidirectional"}
TRAIN_MODES = ("ups", "ups_lora")
CLIP_MODES = ("separate", "joint")
ROLLOUT_TOKENS = ("sample", "greedy")
ROLLOUT_POSITIONS = ("plackett_luce", "top_k")
BLOCK_PART_REWARDS = frozenset({"math_verify", "equation_truth", "math_verify+equation_truth", "toy_remasks",
                                "toy_no_remasks"})
"""Rewards that return per-block parts (``RewardResult.block_reward``), i.e. the ones ``--credit block`` can use."""
WEIGHTED_REWARDS = frozenset({"math_verify+equation_truth"})
"""Rewards that read ``--reward_weight`` (lambda of correct + lambda * shaped)."""


MODEL_DEFAULTS = {"gen_length": 256, "block_length": 32, "steps": 128}  # library values; defaults.json may override


def auto(key: str, help: str):
    """A field filled from AUTHORS_DEFAULTS (or EMBEDDED_DEFAULTS for the embedded model) when not given."""
    return arg(None, help + f" (default: {AUTHORS_DEFAULTS[key]}; embedded model: {EMBEDDED_DEFAULTS[key]})")


def from_model(key: str, help: str):
    """A field the model folder's defaults.json may set (None on the command line = not given)."""
    return arg(None, help + f" (default: the model folder's defaults.json, else {MODEL_DEFAULTS[key]})")


@dataclass
class RLArgs:
    # what trains
    ups_head: Optional[str] = arg(None, "Remask-SFT UPS checkpoint to start from, head or stream (.pt/.safetensors; "
                                  "default: the embedded model's ups_residual.pt, or the model's own stream)")
    lora_path: Optional[str] = arg(None, "peft LoRA folder: trained further with --train ups_lora, merged into the "
                                   "frozen backbone with --train ups")
    train: str = arg("ups", "ups (the UPS only, backbone frozen) or ups_lora (UPS + LoRA adapters on the backbone)")
    lora_r: int = arg(16, "rank of new LoRA adapters (--train ups_lora without --lora_path)")
    lora_alpha: float = arg(32.0, "alpha of new LoRA adapters")
    lora_target: str = arg("auto", "auto (every linear of every backbone block) or a comma list of q_proj, k_proj, "
                           "v_proj, attn_out, ff_proj, up_proj, ff_out")
    lr_lora: Optional[float] = arg(None, "learning rate of the LoRA adapters (default: --lr)")
    # data and reward
    dataset: str = arg("arith", "'arith' (the embedded model's task, generated), openai/gsm8k, "
                       "HuggingFaceH4/MATH-500, or a local .jsonl/.json/.parquet (question/answer or problem/answer)")
    split: Optional[str] = arg(None, "split (default train; MATH-500: test)")
    subset: Optional[str] = arg(None, "hub config (gsm8k: main)")
    format: Optional[str] = arg(None, "answer format gsm8k or math (default: from the dataset)")
    prompt_format: str = arg("auto", "chat, plain or auto (chat for *Instruct* models)")
    max_examples: Optional[int] = arg(None, "use the first N problems only")
    arith_n: int = arg(2000, "--dataset arith: problems generated for training")
    reward: str = arg("math_verify", "reward function: " + ", ".join(sorted(REWARDS)))
    reward_weight: float = arg(0.5, "lambda of math_verify+equation_truth (correct + lambda x share of true "
                               "equations; < 1 keeps every right answer above every wrong one)")
    advantage: str = arg("group", "baseline: group ((R - mean) / std over the group, the authors'), loo (R minus "
                         "the mean of the group's other rollouts) or greedy (R minus the reward of the item's greedy "
                         "rollout: the evaluated decision; one extra rollout per prompt)")
    credit: str = arg("sequence", "sequence (one advantage per rollout) or block (per-block reward-to-go: block j's "
                      "decisions get the reward of blocks j..end; needs a reward with block parts)")
    # rollouts
    group_size: Optional[int] = auto("group_size", "rollouts per prompt (GRPO group)")
    prompts_per_update: Optional[int] = auto("prompts_per_update", "prompts per optimiser step (all processes)")
    gen_length: Optional[int] = from_model("gen_length", "generated tokens per rollout")
    block_length: Optional[int] = from_model("block_length", "block length (block-causal decoding)")
    steps: Optional[int] = from_model("steps", "denoising steps per rollout (steps / blocks per block)")
    temperature: float = arg(1.2, "token temperature T_tok")
    ups_temperature: float = arg(1.2, "Plackett-Luce position temperature T_pos")
    rollout_tokens: str = arg("sample", "sample (at --temperature, the authors') or greedy (argmax, as the eval "
                              "sampler: only the positions are stochastic)")
    rollout_positions: str = arg("plackett_luce", "plackett_luce (at --ups_temperature) or top_k (the K_n best "
                                 "UPS scores, the eval rule: only the tokens are stochastic)")
    rollout_graphs: bool = arg(False, "roll out on the static-buffer decoder (CUDA graphs on a GPU): the bare "
                               "model only (not with --train ups_lora or FSDP)")
    rollout_batch: int = arg(0, "rollouts decoded (and scored by the loss) per batch; 0: all of a --grad_accum "
                             "chunk at once. Lets thousands of rollouts an update fit in memory")
    greedy_stats: bool = arg(True, "decode each prompt once more with the eval decision (greedy tokens, top_k "
                             "positions) per update and log its reward and remasks/block (always on with "
                             "--advantage greedy; --no_greedy_stats saves 1 / group_size of the rollouts)")
    probe_temperatures: Optional[str] = arg(None, "comma list of position temperatures (e.g. 0.05,0.1,0.3): "
                                            "before training, print remasks/block of rollouts at each against the "
                                            "greedy decode on a few prompts (probe.json)")
    cache_features: bool = arg(False, "record the hidden states at rollout time and score the head UPS from them "
                               "(no loss forward; a head UPS on the frozen backbone, --train ups only)")
    layout: Optional[str] = auto("layout", "what a block sees while it is decoded: block_causal (the prompt and "
                                 "finished blocks; the authors' RL, for a model SFT'd in block-diffusion form) or "
                                 "bidirectional (the whole sequence, later blocks masked: the project's sampler, for a "
                                 "model trained on whole sequences)")
    cache: Optional[str] = arg(None, "block_causal: prefix (KV cache of prompt + finished blocks, default) or none "
                               "(exact recomputation); bidirectional: none")
    # loss and optimiser
    clip: float = arg(0.2, "PPO clip epsilon")
    clip_mode: str = arg("separate", "separate (token and PL ratios clipped apart, the authors' code) or joint (one "
                         "ratio per block step)")
    kl_coef: float = arg(0.0, "k3 KL penalty to the starting policy (0: off, as the authors; > 0 costs one more "
                         "forward per step index)")
    lr: Optional[float] = auto("lr", "AdamW learning rate (UPS)")
    warmup_steps: Optional[int] = auto("warmup_steps", "linear warm-up updates, constant after")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off; the norm is still logged)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_updates: Optional[int] = auto("max_updates", "optimiser steps (updates) to run")
    grad_accum: int = arg(1, "chunks each update's rollouts are generated and scored in (whole groups; memory)")
    max_log_ratio: float = arg(0.5, "divergence stop: mean |log ratio| above this before the step means the loss "
                               "forward disagrees with the rollout")
    mixed_precision: str = arg("auto", "auto (bf16 on GPU, none on CPU), bf16, fp16 or no")
    # outputs
    output_dir: Optional[str] = arg(None, "metrics.jsonl, curves.png, args.json, checkpoints (default "
                                    "runs/train_remask_rl-<time>)")
    save_every: int = arg(0, "resumable checkpoint every N updates (0: off)")
    save_total_limit: int = arg(2, "checkpoints kept")
    resume: bool = arg(False, "continue the run in --output_dir from its latest checkpoint, exactly")
    stop_after_updates: Optional[int] = arg(None, "stop after N updates as if killed (no final export; tests)")
    max_seconds: float = arg(0.0, "wall time of this call, from the start: after an update, when another one of "
                             "the longest so far would pass it, write a checkpoint and stop (no final export); "
                             "continue with --resume. Every call makes at least one update (0: no limit)")
    save_ups_head: Optional[str] = arg(None, "where to write the trained UPS (default <output_dir>/ups.safetensors)")
    save_lora_dir: Optional[str] = arg(None, "where to write the LoRA adapters (default <output_dir>/lora)")
    report_to: str = arg("none", REPORT_TO_HELP)

    def __post_init__(self):
        from remedi.tracking import check_report_to

        check_report_to(self.report_to)
        checks = [
            (self.train in TRAIN_MODES, f"--train {self.train!r}: choose {' or '.join(TRAIN_MODES)}"),
            (self.clip_mode in CLIP_MODES, f"--clip_mode {self.clip_mode!r}: choose {' or '.join(CLIP_MODES)}"),
            (self.prompt_format in ("auto", "chat", "plain"), f"--prompt_format {self.prompt_format!r}: auto, chat "
                                                              "or plain"),
            (self.format in (None, "gsm8k", "math"), f"--format {self.format!r}: choose gsm8k or math"),
            (self.mixed_precision in ("auto", "bf16", "fp16", "no"),
             f"--mixed_precision {self.mixed_precision!r}: auto, bf16, fp16 or no"),
            (self.layout in (None, "block_causal", "bidirectional"),
             f"--layout {self.layout!r}: choose block_causal or bidirectional"),
            (self.cache in (None, "prefix", "none"), f"--cache {self.cache!r}: choose prefix or none"),
            (self.reward in REWARDS, f"--reward {self.reward!r}: choose one of {', '.join(sorted(REWARDS))}"),
            (0 <= self.clip < 1, f"--clip must be in [0, 1), got {self.clip}"),
            (self.kl_coef >= 0, f"--kl_coef must be >= 0, got {self.kl_coef}"),
            (self.grad_accum >= 1, "--grad_accum must be >= 1"),
            (self.save_every >= 0 and self.save_total_limit >= 1, "--save_every >= 0, --save_total_limit >= 1"),
            (self.max_seconds >= 0, f"--max_seconds must be >= 0 (0: no limit), got {self.max_seconds}"),
            (self.max_grad_norm >= 0 and self.weight_decay >= 0, "--max_grad_norm/--weight_decay must be >= 0"),
            (self.max_log_ratio > 0, "--max_log_ratio must be > 0"),
            (self.arith_n >= 1 and (self.max_examples is None or self.max_examples >= 1),
             "--arith_n/--max_examples must be >= 1"),
            (not self.resume or self.output_dir, "--resume needs the --output_dir of the run to continue"),
            (self.rollout_tokens in ROLLOUT_TOKENS,
             f"--rollout_tokens {self.rollout_tokens!r}: choose {' or '.join(ROLLOUT_TOKENS)}"),
            (self.rollout_positions in ROLLOUT_POSITIONS,
             f"--rollout_positions {self.rollout_positions!r}: choose {' or '.join(ROLLOUT_POSITIONS)}"),
            (not (self.rollout_tokens == "greedy" and self.rollout_positions == "top_k"),
             "--rollout_tokens greedy with --rollout_positions top_k is the deterministic eval decision: nothing "
             "to learn from; sample the tokens or use --rollout_positions plackett_luce"),
            (self.advantage in BASELINES, f"--advantage {self.advantage!r}: choose one of {', '.join(BASELINES)}"),
            (self.credit in CREDITS, f"--credit {self.credit!r}: choose one of {', '.join(CREDITS)}"),
            (self.credit != "block" or self.reward in BLOCK_PART_REWARDS,
             f"--credit block needs a reward with per-block parts ({', '.join(sorted(BLOCK_PART_REWARDS))}); "
             f"--reward {self.reward} has none: use --credit sequence"),
            (isinstance(self.reward_weight, (int, float)) and 0 <= self.reward_weight < float("inf"),
             f"--reward_weight must be a number >= 0, got {self.reward_weight}"),
            (self.reward_weight == 0.5 or self.reward in WEIGHTED_REWARDS,
             f"--reward_weight is read by {', '.join(sorted(WEIGHTED_REWARDS))} only, not --reward {self.reward}"),
            (self.rollout_batch >= 0, f"--rollout_batch must be >= 0 (0: a whole chunk), got {self.rollout_batch}"),
            (not (self.rollout_graphs and self.train == "ups_lora"),
             "--rollout_graphs runs the bare model's blocks and cannot decode through LoRA adapters that train: "
             "drop --rollout_graphs or use --train ups"),
            (not (self.cache_features and self.train != "ups"),
             "--cache_features needs a frozen backbone (--train ups): with LoRA training the features change "
             "every update, drop --cache_features"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.probe_temperature_list()  # checked here, before any model loads

    def probe_temperature_list(self) -> list[float]:
        """--probe_temperatures as floats (empty when not given); each must be > 0."""
        if not self.probe_temperatures:
            return []
        try:
            out = [float(t) for t in self.probe_temperatures.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--probe_temperatures {self.probe_temperatures!r}: a comma list of numbers, e.g. "
                             "0.05,0.1,0.3") from None
        if not out or any(not (0 < t < float("inf")) for t in out):
            raise ValueError(f"--probe_temperatures {self.probe_temperatures!r}: every temperature must be > 0")
        return out

    def resolve(self, model_dir: str | Path, embedded: bool) -> dict[str, str]:
        """Fill the ``None`` fields (see the module docstring) with the reader every script uses
        (:func:`remedi.arguments.fill_defaults` over the model folder's defaults.json), then check them;
        returns {field: where its value came from}."""
        path = Path(model_dir) / MODEL_DEFAULTS_FILE
        shipped = {k: v for k, v in model_sampling_defaults(model_dir).items() if k in MODEL_DEFAULTS}
        origin = fill_defaults(self, shipped, path, MODEL_DEFAULTS)
        origin.update(fill_defaults(self, EMBEDDED_DEFAULTS if embedded else {}, "embedded-model default",
                                    AUTHORS_DEFAULTS))
        if self.cache is None:
            self.cache = "prefix" if self.layout == "block_causal" else "none"
            origin["cache"] = f"follows --layout {self.layout}"
        taken = {k: getattr(self, k) for k, w in origin.items() if w != "command line"}
        log.info("defaults: %s", ", ".join(f"{k} {v} ({origin[k]})" for k, v in taken.items()))
        self.check_resolved()
        return origin

    def check_resolved(self) -> None:
        """Checks of the values :meth:`resolve` filled in."""
        for name in ("group_size", "prompts_per_update", "max_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2 and self.advantage != "greedy":
            raise ValueError(f"--advantage {self.advantage} needs --group_size >= 2: a group of one has no baseline "
                             "(its advantage is 0); raise --group_size or use --advantage greedy")
        if self.lr <= 0 or (self.lr_lora is not None and self.lr_lora <= 0):
            raise ValueError("--lr / --lr_lora must be > 0")
        if self.warmup_steps < 0:
            raise ValueError("--warmup_steps must be >= 0")

