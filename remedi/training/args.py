"""Arguments of the two training scripts (one dataclass per concern, shared by both) and the run plan.

``train_remask_sft.py`` parses ModelArgs + DataArgs + TrainArgs + SftArgs, ``train_remask_lora.py`` the same
with LoraArgs instead of SftArgs; :func:`plan_from` turns the last one into what the loop trains. Paper
values quoted in the help are RemeDi's (arXiv:2509.23653).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from remedi.arguments import ModelArgs, arg
from remedi.model.config import CONFIGS
from remedi.model.loading import LORA_AUTO_TARGET
from remedi.training.noise import INCORRECT_SOURCES, SCHEDULES, check_r_incorrect
from remedi.training.self_noise import NOISE_SOURCES, SELF_SELECT
from remedi.training.data import KNOWN
from remedi.tracking import REPORT_TO_HELP


@dataclass
class DataArgs:
    dataset: str = arg("arith", "known hub dataset (" + ", ".join(k for k in KNOWN if k != "arith") + "), a hub id "
                       "with --prompt_field/--answer_field, a local .jsonl/.json/.parquet file or a folder of "
                       "<split>.jsonl files, or 'arith' (the embedded model's synthetic task, generated in memory)")
    split: Optional[str] = arg(None, "split to train on (default: the dataset's training split; MATH-500: test)")
    subset: Optional[str] = arg(None, "hub config (gsm8k: main; opc-sft-stage2: educational_instruct, evol_instruct, "
                                "mceval_instruct, comma list to concatenate)")
    prompt_field: Optional[str] = arg(None, "record field holding the prompt (known datasets: preset)")
    answer_field: Optional[str] = arg(None, "record field(s) holding the answer, comma list joined by a blank line "
                                      "(s1K: deepseek_thinking_trajectory,deepseek_attempt; pass deepseek_attempt "
                                      "for the attempt only)")
    prompt_format: str = arg("auto", "chat (chat template, Instruct models), plain (Base models) or auto (chat when "
                             "the model name contains 'instruct')")
    seq_len: int = arg(256, "tokens per row (prompt + answer + EOS padding); longer answers are truncated")
    pad_to: str = arg("seq_len", "seq_len (every row padded with EOS to --seq_len, as LLaDA SFT) or batch (to the "
                      "longest row of the micro-batch: faster, shorter EOS tails)")
    max_examples: Optional[int] = arg(None, "use only the first N records (quick runs)")
    arith_n: int = arg(20000, "--dataset arith: number of generated training problems")

    def __post_init__(self):
        if self.prompt_format not in ("auto", "chat", "plain"):
            raise ValueError(f"--prompt_format {self.prompt_format!r}: choose auto, chat or plain")
        if self.pad_to not in ("seq_len", "batch"):
            raise ValueError(f"--pad_to {self.pad_to!r}: choose seq_len or batch")
        if self.seq_len < 2:
            raise ValueError(f"--seq_len must be >= 2, got {self.seq_len}")


@dataclass
class TrainArgs:
    init_config: Optional[str] = arg(None, "start from random weights of this named config (" + ", ".join(CONFIGS) +
                                     ") instead of --model_name; needs --tokenizer (vocabulary and special ids)")
    tokenizer: Optional[str] = arg(None, "tokenizer folder for --init_config")
    ups_arch: str = arg("head", "head (Linear/MLP on the final hidden state), stream (paper's dual stream), none")
    ups_width: int = arg(0, "head UPS hidden width (0: a single Linear(d, 1))")
    ups_taps: Optional[str] = arg(None, "stream UPS taps, comma list of backbone block indices (default: the paper's "
                                  "0,10,20,30 of 32 blocks scaled to the model's depth)")
    load_ups_head: Optional[str] = arg(None, "continue training this UPS checkpoint (.pt/.safetensors)")
    lambda_ups: float = arg(1.0, "weight of the UPS loss (paper 0.3; the README's LLaDA-8B commands 1.0)")
    r_incorrect: float = arg(0.1, "incorrect-token noise rho_incorrect(t) = 4 r t (1-t); r in [0, 0.25]")
    mask_schedule: str = arg("linear", "rho_mask(t): linear (t, the paper) or llada ((1-1e-3) t + 1e-3)")
    incorrect_source: str = arg("batch", "replacement tokens: batch (unigram of the batch, authors' code) or vocab "
                                "(uniform over the non-special vocabulary)")
    noise_source: str = arg("random", "what fills the positions chosen for corruption: random (replacements from "
                            "--incorrect_source) or self (the model's own predictions from a no-gradient pass on "
                            "the masked state, labelled 1 where they equal the answer, 0 where not)")
    self_noise_ratio: float = arg(1.0, "--noise_source self: fraction of the corruption positions filled by the "
                                  "model; the rest keep --incorrect_source replacements")
    self_noise_temperature: float = arg(0.0, "--noise_source self: 0 takes the argmax prediction, > 0 samples at "
                                        "this temperature")
    self_noise_select: str = arg("random", "--noise_source self: random (the positions the noise chose) or "
                                 "confident (each row commits as many positions, those the model is surest of, "
                                 "as a low-confidence sampler would; PRISM-style)")
    label_smoothing: bool = arg(False, "UPS labels 0.95 / 0.05 / 0.05 + 0.9 p instead of 1 / 0 / p")
    block_diffusion: bool = arg(False, "draw t per answer block of --train_block_length instead of per row (the "
                                "block-causal prompt|clean|noisy layout of the authors' code is not implemented)")
    train_block_length: int = arg(32, "block length for --block_diffusion")
    batch_size: int = arg(1, "rows per micro-batch per process")
    grad_accum: int = arg(1, "micro-batches per optimiser step (through accelerate)")
    epochs: int = arg(1, "passes over the data (ignored when --max_steps is set)")
    max_steps: Optional[int] = arg(None, "optimiser steps to run (overrides --epochs)")
    warmup_steps: int = arg(0, "linear warmup steps")
    lr_scheduler: str = arg("cosine", "cosine, linear or constant (after warmup)")
    min_lr_ratio: float = arg(0.0, "final lr as a fraction of the peak (cosine/linear)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off; the norm is still logged)")
    divergence_bound: float = arg(1e6, "stop (and save nothing) when the loss or the gradient norm exceeds this: "
                                  "the run has diverged, lower the learning rate; non-finite values always stop; "
                                  "0: no bound")
    gradient_checkpointing: bool = arg(False, "recompute block activations in the backward (saves memory)")
    compile: bool = arg(False, "torch.compile every transformer block (GPU; static shapes, best with --pad_to "
                        "seq_len)")
    mixed_precision: str = arg("auto", "auto (bf16 on GPU, none on CPU), bf16, fp16 or no")
    output_dir: Optional[str] = arg(None, "metrics.jsonl, args.json and checkpoints (default runs/<script>-<time>)")
    save_every: int = arg(0, "write a resumable checkpoint every N optimiser steps (0: off)")
    save_total_limit: int = arg(2, "keep this many most recent checkpoints")
    resume: bool = arg(False, "continue the run in --output_dir from its latest checkpoint, exactly")
    log_every: int = arg(10, "optimiser steps per metrics.jsonl line")
    report_to: str = arg("none", REPORT_TO_HELP)
    save_model_dir: Optional[str] = arg(None, "write the trained backbone (+stream) in hub layout with the "
                                        "tokenizer, loadable with --model_name DIR (for --train_backbone full)")
    stop_after_steps: Optional[int] = arg(None, "stop after this many optimiser steps as if killed (no final "
                                          "save; for tests and time-limited jobs, resume with --resume)")

    def __post_init__(self):
        check_r_incorrect(self.r_incorrect)
        from remedi.tracking import check_report_to

        check_report_to(self.report_to)
        checks = [
            (self.ups_arch in ("head", "stream", "none"), f"--ups_arch {self.ups_arch!r}: choose head, stream or none"),
            (self.mask_schedule in SCHEDULES, f"--mask_schedule {self.mask_schedule!r}: choose {', '.join(SCHEDULES)}"),
            (self.incorrect_source in INCORRECT_SOURCES,
             f"--incorrect_source {self.incorrect_source!r}: choose {', '.join(INCORRECT_SOURCES)}"),
            (self.noise_source in NOISE_SOURCES, f"--noise_source {self.noise_source!r}: choose "
             f"{', '.join(NOISE_SOURCES)}"),
            (0.0 < self.self_noise_ratio <= 1.0, "--self_noise_ratio must be in (0, 1]"),
            (self.self_noise_temperature >= 0, "--self_noise_temperature must be >= 0 (0: argmax)"),
            (self.self_noise_select in SELF_SELECT, f"--self_noise_select {self.self_noise_select!r}: choose "
             f"{', '.join(SELF_SELECT)}"),
            (self.noise_source != "self" or self.r_incorrect > 0, "--noise_source self fills the positions chosen "
             "for corruption, and --r_incorrect 0 chooses none: set --r_incorrect > 0 (e.g. 0.1)"),
            (self.noise_source == "self" or (self.self_noise_ratio, self.self_noise_temperature,
                                             self.self_noise_select) == (1.0, 0.0, "random"),
             "--self_noise_ratio/--self_noise_temperature/--self_noise_select apply only with --noise_source self"),
            (self.divergence_bound >= 0, "--divergence_bound must be >= 0 (0: no bound)"),
            (self.lr_scheduler in ("cosine", "linear", "constant"),
             f"--lr_scheduler {self.lr_scheduler!r}: choose cosine, linear or constant"),
            (self.mixed_precision in ("auto", "bf16", "fp16", "no"),
             f"--mixed_precision {self.mixed_precision!r}: choose auto, bf16, fp16 or no"),
            (self.batch_size >= 1, "--batch_size must be >= 1"),
            (self.grad_accum >= 1, "--grad_accum must be >= 1"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max_steps must be >= 1"),
            (self.warmup_steps >= 0 and self.save_every >= 0, "--warmup_steps/--save_every must be >= 0"),
            (self.lambda_ups >= 0, "--lambda_ups must be >= 0"),
            (self.ups_width >= 0, "--ups_width must be >= 0"),
            (self.train_block_length >= 1, "--train_block_length must be >= 1"),
            (self.log_every >= 1 and self.save_total_limit >= 1, "--log_every/--save_total_limit must be >= 1"),
            (0.0 <= self.min_lr_ratio <= 1.0, "--min_lr_ratio must be in [0, 1]"),
            (not self.init_config or self.tokenizer, "--init_config needs --tokenizer DIR (vocabulary, special ids)"),
            (not self.resume or self.output_dir, "--resume needs the --output_dir of the run to continue"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.init_config and self.init_config not in CONFIGS:
            raise ValueError(f"--init_config {self.init_config!r}: named configs are {sorted(CONFIGS)}")


@dataclass
class SftArgs:
    lr: float = arg(1e-4, "learning rate (AdamW) of everything that trains")
    train_backbone: str = arg("none", "none (frozen backbone; trains the UPS) or full (everything); LoRA: use "
                              "train_remask_lora.py")
    save_path: Optional[str] = arg(None, "where to write the trained UPS (.pt or .safetensors; default "
                                   "<output_dir>/ups.safetensors)")

    def __post_init__(self):
        if self.train_backbone == "lora":
            raise ValueError("--train_backbone lora: LoRA training is train_remask_lora.py (use train_remask_lora.py)")
        if self.train_backbone not in ("none", "full"):
            raise ValueError(f"--train_backbone {self.train_backbone!r}: choose none or full (LoRA: "
                             "use train_remask_lora.py)")


@dataclass
class LoraArgs:
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: float = arg(32.0, "LoRA alpha")
    lora_dropout: float = arg(0.05, "LoRA dropout")
    lora_target: str = arg("auto", "auto (every linear of every backbone block, never the LM head) or a comma "
                           "list of block linear names (q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out)")
    lr_lora: float = arg(5e-5, "learning rate of the LoRA adapters")
    lr_ups: float = arg(1e-4, "learning rate of the UPS")
    train_mode: str = arg("joint", "joint (one step on L_TPS + lambda L_UPS) or alternating (--alt_ratio TPS steps "
                          "per UPS step)")
    alt_ratio: int = arg(4, "alternating mode: LoRA/TPS optimiser steps per UPS step")
    load_lora_dir: Optional[str] = arg(None, "continue training this peft LoRA adapter folder")
    save_lora_dir: Optional[str] = arg(None, "where to write the adapters (peft format; default <output_dir>/lora)")
    save_ups_head: Optional[str] = arg(None, "where to write the trained UPS (default <output_dir>/ups.safetensors)")

    def __post_init__(self):
        if self.train_mode not in ("joint", "alternating"):
            raise ValueError(f"--train_mode {self.train_mode!r}: choose joint or alternating")
        if self.alt_ratio < 1:
            raise ValueError(f"--alt_ratio must be >= 1, got {self.alt_ratio}")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        lora_target_modules(self.lora_target)


LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def lora_target_modules(spec: str) -> str:
    """A peft target regex restricted to backbone block linears (a bare ``ff_out`` would hit the LM head)."""
    if spec == "auto":
        return LORA_AUTO_TARGET
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in LORA_LINEARS]
    if not names or bad:
        raise ValueError(f"--lora_target {spec!r}: use auto or a comma list of {', '.join(LORA_LINEARS)}")
    return r".*transformer\.blocks\.\d+\.(" + "|".join(names) + r")$"


def default_taps(n_layers: int) -> tuple[int, ...]:
    """The paper's taps 0, 10, 20, 30 of 32 blocks, scaled to ``n_layers`` (rounded down, distinct)."""
    return tuple(sorted({min(n_layers - 1, (k * 10 * n_layers) // 32) for k in range(4)}))


@dataclass
class Plan:
    """What one run trains, derived from the script's arguments (one per script, same loop)."""

    script: str
    train_backbone: str  # none | lora | full
    lr_backbone: float  # LoRA adapters or full backbone
    lr_ups: float
    mode: str = "joint"
    alt_ratio: int = 4
    lora: Optional[LoraArgs] = None
    ups_out: Optional[str] = None
    lora_out: Optional[str] = None

    @property
    def ups_flag(self) -> str:
        """The flag that names the UPS output in this script."""
        return "--save_ups_head" if self.lora else "--save_path"

    @property
    def lr_flags(self) -> str:
        """The learning-rate flags of this script (divergence messages name them)."""
        return "--lr_lora / --lr_ups" if self.lora else "--lr"


def plan_from(extra: SftArgs | LoraArgs, script: str) -> Plan:
    if isinstance(extra, LoraArgs):
        return Plan(script, "lora", extra.lr_lora, extra.lr_ups, extra.train_mode, extra.alt_ratio, extra,
                    ups_out=extra.save_ups_head, lora_out=extra.save_lora_dir)
    return Plan(script, extra.train_backbone, extra.lr, extra.lr, ups_out=extra.save_path)


SCRIPT_ARGS = {"train_remask_sft": (ModelArgs, DataArgs, TrainArgs, SftArgs),
               "train_remask_lora": (ModelArgs, DataArgs, TrainArgs, LoraArgs)}
"""The dataclasses each training script parses (its flags are their fields)."""

_OTHER_SCRIPT = {
    "train_remask_sft": ("train_remask_lora", "this script trains the UPS (or the full model); for LoRA training "
                                              "use train_remask_lora.py"),
    "train_remask_lora": ("train_remask_sft", "here use --lr_lora/--lr_ups, --save_ups_head and --save_lora_dir (the "
                                              "backbone trains through LoRA)"),
}


def _flags(arg_types) -> set[str]:
    return {f"--{f.name}" for t in arg_types for f in dataclasses.fields(t)}


def other_script_hint(script: str):
    """The ``unknown_hint`` of one training script: name the unknown flags that are the other script's."""
    other, advice = _OTHER_SCRIPT[script]
    theirs = _flags(SCRIPT_ARGS[other]) - _flags(SCRIPT_ARGS[script])

    def hint(flags: list[str]) -> Optional[str]:
        found = [f for f in flags if f in theirs]
        if not found:
            return None
        return f"{', '.join(found)} {'belongs' if len(found) == 1 else 'belong'} to {other}.py; {advice}"
    return hint
