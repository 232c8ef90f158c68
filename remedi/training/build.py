"""Setting up a Remask SFT run before its first step: flag checks, accelerate, output paths, the tokenizer and
special ids, the data, the model (what trains, what stays frozen, LoRA) and the optimiser with its schedule.

Order matters: everything that can fail without weights (flag combinations, output paths, config, UPS/LoRA
compatibility, tokenizer ids, data fields) runs before the model loads and before anything is written, so a
bad command stops in seconds instead of after an 8B load or a finished run.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from remedi.arguments import ModelArgs
from remedi.files import check_writable
from remedi.model.checkpoint import add_stream, check_ups_compatible, load_pretrained, load_ups, read_ups
from remedi.model.config import LLaDAConfig, get_config
from remedi.model.llada import RemeDiLM, UPSHead, init_weights
from remedi.model.loading import (MASK_TOKEN, SpecialIds, default_chat, load_tokenizer, pick_dtype, preflight,
                                  resolve_special_ids)
from remedi.training.args import DataArgs, Plan, TrainArgs, default_taps, lora_target_modules
from remedi.training.data import (TokenizedData, check_fields, load_records, micro_batches, resolve_fields,
                                  tokenize_records)

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (seed, purpose, rank, ...): independent streams without shared state."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def lr_lambda(args: TrainArgs, total: int):
    """LambdaLR factor of a Remask SFT run (:func:`schedule` with its flags)."""
    return schedule(args.warmup_steps, args.lr_scheduler, args.min_lr_ratio, total)


def schedule(warmup: int, kind: str = "constant", min_ratio: float = 0.0, total: int = 0):
    """LambdaLR factor: linear warmup, then cosine / linear decay to ``min_ratio`` at ``total``, or constant."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1 - frac
        return min_ratio + (1 - min_ratio) * shape
    return f


# ------------------------------------------------------------------------------------ checks without weights
def validate_combination(t: TrainArgs, p: Plan) -> None:
    """Flag combinations that would train nothing, or something that cannot be saved where asked."""
    has_ups = t.ups_arch != "none" or t.load_ups_head is not None
    if not has_ups and t.lambda_ups != 0:
        raise ValueError("--ups_arch none has no UPS to train: pass --lambda_ups 0 (plain masked-diffusion "
                         "training) or choose --ups_arch head/stream")
    if p.train_backbone == "none" and (not has_ups or t.lambda_ups == 0) and t.ups_arch != "stream":
        raise ValueError("nothing would train: the backbone is frozen (--train_backbone none) and the UPS loss "
                         "is off; set --lambda_ups > 0 or --train_backbone full")
    if p.mode == "alternating" and not has_ups:
        raise ValueError("--train_mode alternating needs a UPS (--ups_arch head or stream)")
    if t.noise_source == "self" and not has_ups:
        raise ValueError("--noise_source self trains the UPS on the model's own mistakes: it needs a UPS "
                         "(--ups_arch head or stream)")
    if t.save_model_dir and not (p.train_backbone == "full" or (p.train_backbone == "none"
                                                                 and t.ups_arch == "stream")):
        raise ValueError("--save_model_dir writes a trained backbone (+stream): it needs --train_backbone full, "
                         "or a stream UPS on a frozen backbone (LoRA adapters go to --save_lora_dir, a head UPS "
                         "to --save_path/--save_ups_head)")


def check_outputs(t: TrainArgs, p: Plan, out: Path) -> None:
    """Every path the run will write, checked now: a folder given for a file (or the reverse), or a place
    that cannot be written, would otherwise fail only after the whole run, losing what it trained."""
    check_writable(out, "--output_dir", is_dir=True)
    if (out / "results.jsonl").exists() or (out / "summary.json").exists():
        raise ValueError(f"--output_dir {out} holds an eval run (results.jsonl / summary.json); training there would "
                         "mix the two: choose a new --output_dir")
    if p.ups_out:
        check_writable(p.ups_out, p.ups_flag)
    if p.lora_out:
        check_writable(p.lora_out, "--save_lora_dir", is_dir=True)
    if t.save_model_dir:
        check_writable(t.save_model_dir, "--save_model_dir", is_dir=True)


@dataclass
class ModelSpec:
    """What the run knows about its model before any weight loads."""

    cfg: LLaDAConfig
    tokenizer: Any
    ids: SpecialIds
    special_ids: list[int]  # never drawn as replacement tokens
    model_dir: Optional[Path]  # None with --init_config
    tok_dir: Path
    ups_meta: Optional[dict]  # metadata of --load_ups_head
    arch: Optional[str]  # the UPS that trains: head, stream or none


def preflight_model(m: ModelArgs, d: DataArgs, t: TrainArgs, p: Plan) -> ModelSpec:
    """Config, UPS/LoRA compatibility, tokenizer and special ids: everything that can fail without weights."""
    if t.init_config:
        tok = load_tokenizer(t.tokenizer)
        mask = tok.convert_tokens_to_ids(MASK_TOKEN)
        if mask is None or mask == tok.unk_token_id:
            mask = tok.mask_token_id
        if mask is None:
            raise ValueError(f"--tokenizer {t.tokenizer} has no mask token {MASK_TOKEN}")
        n = len(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cfg = get_config(t.init_config, vocab_size=n, embedding_size=n, mask_token_id=int(mask),
                         eos_token_id=int(tok.eos_token_id), pad_token_id=int(pad))
        model_dir, tok_dir, meta = None, Path(t.tokenizer), None
        if t.load_ups_head:
            _, meta = read_ups(t.load_ups_head)
            check_ups_compatible(meta, cfg, t.load_ups_head)
        if p.lora and p.lora.load_lora_dir:
            raise ValueError("--load_lora_dir with --init_config: adapters belong to a pretrained --model_name")
    else:
        lora_dir = p.lora.load_lora_dir if p.lora else None
        model_dir, cfg, meta = preflight(m.model_name, t.load_ups_head, lora_dir)
        tok_dir = model_dir
        tok = load_tokenizer(model_dir)
    if d.seq_len > cfg.max_sequence_length:
        raise ValueError(f"--seq_len {d.seq_len} exceeds the model's max_sequence_length {cfg.max_sequence_length}")
    arch = t.ups_arch
    if meta is not None:
        if meta["ups_arch"] != t.ups_arch:
            log.warning("--load_ups_head %s holds a %s UPS: training that (not --ups_arch %s)",
                        t.load_ups_head, meta["ups_arch"], t.ups_arch)
        arch = meta["ups_arch"]
    if arch != "stream" and cfg.ups_taps:
        if arch == "head":
            raise ValueError(f"{m.model_name} already has a stream UPS (taps {cfg.ups_taps}); train it with "
                             "--ups_arch stream")
        arch = "stream"
    ids = resolve_special_ids(tok, cfg, m.mask_id)
    specials = set(getattr(tok, "all_special_ids", []) or [])
    specials |= {i for i in (ids.mask, ids.eos, ids.pad, ids.eot, ids.bos) if i is not None}
    return ModelSpec(cfg, tok, ids, sorted(specials), model_dir, tok_dir, meta, arch)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class TrainData:
    data: TokenizedData
    chat: bool
    steps_per_epoch: int
    total_steps: int


def load_data(m: ModelArgs, d: DataArgs, t: TrainArgs, spec: ModelSpec, world: int, main: bool) -> TrainData:
    """Records -> tokenised examples, and the number of optimiser steps they give."""
    rows, source = load_records(d.dataset, d.split, d.subset, arith_n=d.arith_n, seed=m.seed)
    prompt, answer, join = resolve_fields(d.dataset, d.prompt_field, d.answer_field)
    check_fields(rows, prompt, answer, source)
    if d.max_examples:
        rows = rows[: d.max_examples]
    chat = {"chat": True, "plain": False}.get(d.prompt_format)
    if chat is None:
        chat = default_chat(m.model_name if not t.init_config else t.init_config)
    data = tokenize_records(rows, spec.tokenizer, prompt_field=prompt, answer_fields=answer, answer_join=join,
                            seq_len=d.seq_len, chat=chat, eos_id=spec.ids.eos, eot_id=spec.ids.eot, source=source)
    if main:
        log.info("%s (%s prompts); lengths %s", data.summary(), "chat" if chat else "plain", data.stats)
    per_epoch = len(micro_batches(len(data.examples), t.batch_size, world, 0, 0, 0))
    steps_per_epoch = per_epoch // t.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"{len(data.examples)} examples cannot fill one optimiser step of "
                         f"{t.batch_size} x {world} processes x {t.grad_accum} accumulation"
                         + (f" ({data.n_skipped} of {data.n_records} records dropped{data.dropped_note(3)})"
                            if data.n_skipped else ""))
    return TrainData(data, chat, steps_per_epoch, t.max_steps or t.epochs * steps_per_epoch)


# ----------------------------------------------------------------------------------------------- model
@dataclass
class BuiltModel:
    lm: RemeDiLM
    ups_params: list[nn.Parameter]
    backbone_params: list[nn.Parameter]  # LoRA adapters or the full backbone; empty when frozen


def attach_lora(inner: nn.Module, load_dir: Optional[str], r: int, alpha: float, dropout: float, target: str,
                warn: bool = True, flag: str = "--load_lora_dir") -> nn.Module:
    """peft adapters on the backbone's block linears: new ones, or the trainable adapters of ``load_dir``
    (Remask SFT's LoRA script and Remask RL's ``--train ups_lora`` alike; hub-layout LLaDAModelLM adapters too)."""
    from peft import LoraConfig, get_peft_model

    from remedi.model.loading import load_lora

    if load_dir:
        pm = load_lora(inner, load_dir, is_trainable=True)
        c = pm.peft_config["default"]
        if (c.r, c.lora_alpha) != (r, alpha) and warn:
            log.warning("%s %s has r=%s alpha=%s: training those (not --lora_r %s --lora_alpha %s)",
                        flag, load_dir, c.r, c.lora_alpha, r, alpha)
        return pm
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(target),
                     bias="none")
    return get_peft_model(inner, cfg)


def wrap_lora(inner: nn.Module, p: Plan, main: bool) -> nn.Module:
    """The LoRA script's adapters (new, or continued from --load_lora_dir)."""
    la = p.lora
    return attach_lora(inner, la.load_lora_dir, la.lora_r, la.lora_alpha, la.lora_dropout, la.lora_target, main)


def split_trainable(lm: RemeDiLM) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(UPS parameters, the other trainable ones: LoRA adapters or the full backbone), in ``lm``'s order."""
    ups_ids = {id(q) for mod in lm.ups_modules() for q in mod.parameters()}
    ups_params = [q for q in lm.parameters() if id(q) in ups_ids]
    return ups_params, [q for q in lm.parameters() if q.requires_grad and id(q) not in ups_ids]


def seed_build(seed: int, build_seed: int) -> None:
    """The global RNG while a model is built (peft's adapter init draws from it): the same on every process."""
    random.seed(seed)
    torch.manual_seed(build_seed)


def build_model(m: ModelArgs, t: TrainArgs, p: Plan, spec: ModelSpec, device: torch.device, fsdp: bool,
                main: bool) -> BuiltModel:
    """Backbone (pretrained or random), the UPS, what trains; trainable parts keep float32 master weights."""
    frozen_dtype = pick_dtype(m.dtype, device)
    # FSDP flattens each wrapped unit into one tensor of one dtype: keep everything float32 there
    # (its mixed-precision policy computes in bf16)
    base_dtype = torch.float32 if p.train_backbone == "full" or fsdp else frozen_dtype
    # global RNG: the same on every process while building (peft's adapter init draws from it)
    seed_build(m.seed, derive_seed(m.seed, "build"))
    if t.init_config:
        with torch.device(device):
            lm = RemeDiLM(spec.cfg)
        init_weights(lm, std=0.02, generator=torch.Generator().manual_seed(derive_seed(m.seed, "init")))
        lm.to(base_dtype)
        lm.name_or_path = f"init:{t.init_config}"
    else:
        lm = load_pretrained(spec.model_dir, dtype=base_dtype, device=device)
        lm.name_or_path = m.model_name
    if spec.ups_meta is not None:
        load_ups(t.load_ups_head, lm)
    elif spec.arch == "head":
        head = UPSHead(spec.cfg.d_model, t.ups_width)
        init_weights(head, std=0.02, generator=torch.Generator().manual_seed(derive_seed(m.seed, "ups")))
        lm.attach_head(head.to(device))
    elif spec.arch == "stream" and not lm.model.has_stream:
        taps = tuple(int(x) for x in t.ups_taps.split(",")) if t.ups_taps else default_taps(spec.cfg.n_layers)
        add_stream(lm, taps)
    ups = lm.ups_modules()
    for mod in ups:
        mod.to(torch.float32)
    for prm in lm.parameters():
        prm.requires_grad_(p.train_backbone == "full")
    for mod in ups:
        for prm in mod.parameters():
            prm.requires_grad_(True)
    if p.train_backbone == "lora":
        lm.model = wrap_lora(lm.model, p, main)
        for mod in ups:  # peft freezes everything but the adapters
            for prm in mod.parameters():
                prm.requires_grad_(True)
    if t.gradient_checkpointing:
        lm.set_gradient_checkpointing(True)
    if t.compile:
        lm.compile_blocks()
    lm.train()
    ups_params, backbone_params = split_trainable(lm)
    if main:
        n_train = sum(q.numel() for q in ups_params + backbone_params)
        log.info("model %s: %.2fM parameters, %d trainable (UPS %s, backbone %s), frozen dtype %s",
                 lm.name_or_path, lm.num_parameters() / 1e6, n_train, spec.arch, p.train_backbone, base_dtype)
    return BuiltModel(lm, ups_params, backbone_params)


def adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """AdamW over parameter groups; the fused kernel when every parameter is on a GPU (one launch for all of
    them instead of several per tensor; BENCHMARKS.md has the measured difference for the stream UPS). Same update rule; CPU runs keep the default, so their numbers do not change."""
    params = [q for g in groups for q in g["params"]]
    fused = bool(params) and all(q.is_cuda for q in params)
    return torch.optim.AdamW(groups, fused=True if fused else None, **kwargs)


def build_optimizer(t: TrainArgs, p: Plan, built: BuiltModel, total_steps: int):
    """AdamW with one parameter group per part (backbone/LoRA, UPS), each with its lr; the LambdaLR schedule."""
    groups = []
    if built.backbone_params:
        groups.append({"params": built.backbone_params, "lr": p.lr_backbone, "name": "backbone"})
    if built.ups_params:
        groups.append({"params": built.ups_params, "lr": p.lr_ups, "name": "ups"})
    opt = adamw(groups, lr=groups[0]["lr"], weight_decay=t.weight_decay, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, total_steps))
