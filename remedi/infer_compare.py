"""Compare decoding strategies / confidence sources on the same prompts, side by side.

    python remedi/infer_compare.py --model_name GSAI-ML/LLaDA-8B-Base --ups_head ups.pt \\
        --prompt "Give a brief plan for learning calculus." --prompt "Write a Python function ..." \\
        --steps 128 --gen_length 128 --block_length 16 --logits_eos_inf --confidence_eos_eot_inf

Sources (``--sources``, comma list) are the sampler's strategies: ups, tps_prob, margin, entropy, random
(RemeDi remasking) and llada_low_confidence, llada_random (LLaDA, no remasking). Default: ups,tps_prob,random
with a UPS, else the training-free ones. Every bad flag is reported before the model's weights load.
"""
if __package__ in (None, ""):  # run as a file: import the package from the repo root, never from remedi/ itself
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702

import dataclasses
import json
import logging
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from remedi.model.checkpoint import atomic_path
from remedi.arguments import ModelArgs, arg, parse_args, setup_logging
from remedi.model.loading import (EMBEDDED_MODEL, default_chat, encode_prompt, load_for_inference, load_tokenizer, preflight,
                      resolve_special_ids)
from remedi.decoding.sampler import STRATEGIES, generate
from remedi.decoding.args import SamplingArgs, apply_model_defaults, explicit_flags

log = logging.getLogger("infer_compare")

UPS_SOURCES = ("ups", "tps_prob", "random")
TRAINING_FREE_SOURCES = ("llada_low_confidence", "tps_prob", "margin", "entropy", "random")


@dataclass
class CompareArgs:
    ups_head: Optional[str] = arg(None, "UPS checkpoint (.pt/.safetensors); default for the embedded model: its "
                                  "ups_head.pt when present")
    lora_path: Optional[str] = arg(None, "peft LoRA folder merged into the backbone before sampling")
    prompt: Optional[str] = arg(None, "a prompt; repeat the flag for several (--prompt a --prompt b)",
                                action="append")
    prompts_file: Optional[str] = arg(None, ".txt (one prompt per line) or .jsonl (a 'prompt' or 'question' field)")
    sources: Optional[str] = arg(None, f"comma list of {', '.join(STRATEGIES)}; default "
                                 f"{','.join(UPS_SOURCES)} with a UPS, else {','.join(TRAINING_FREE_SOURCES)}")
    chat: Optional[bool] = arg(None, "wrap prompts in the chat template (default: for *Instruct* models)",
                               nargs="?", const=True)
    no_chat: bool = arg(False, "plain prompts, no chat template")
    batch_size: int = arg(8, "prompts decoded together (left-padded; each row's result is as if alone)")
    output_jsonl: Optional[str] = arg(None, "write one JSON line per prompt and source here")
    trajectory_out: Optional[str] = arg(None, "folder for a trajectory PNG + HTML per prompt and source")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.chat is not None and self.no_chat:
            raise ValueError("--chat and --no_chat contradict each other; give one")


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts_file {path} does not exist")
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("prompt", row.get("question"))
            if text is None:
                raise ValueError(f"--prompts_file {path} line {n}: no 'prompt' or 'question' field")
            out.append(text)
        return out
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_sources(sources: Optional[str], has_ups: bool) -> list[str]:
    if sources is None:
        return list(UPS_SOURCES if has_ups else TRAINING_FREE_SOURCES)
    out = [s.strip() for s in sources.split(",") if s.strip()]
    bad = [s for s in out if s not in STRATEGIES]
    if bad or not out:
        raise ValueError(f"--sources: unknown source(s) {bad or sources!r}; choose from {', '.join(STRATEGIES)}")
    if "ups" in out and not has_ups:
        raise ValueError("--sources ups needs a UPS: pass --ups_head CHECKPOINT (or a model with a UPS stream)")
    return list(dict.fromkeys(out))


def default_ups_head(model_name: str) -> Optional[str]:
    """The embedded model's own UPS checkpoint, when the embedded model is used and ships one."""
    if Path(model_name).resolve() == EMBEDDED_MODEL.resolve() and (EMBEDDED_MODEL / "ups_head.pt").is_file():
        return str(EMBEDDED_MODEL / "ups_head.pt")
    return None


def item_generator(seed: int, item: int, device) -> torch.Generator:
    """Each prompt's own random stream, derived from (seed, prompt index): independent of batching."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + item)


def main(argv=None) -> list[dict]:
    m, s, c = parse_args([ModelArgs, SamplingArgs, CompareArgs], argv, description=__doc__)
    setup_logging()
    # ---- every check that needs no weights
    ups_head = c.ups_head or default_ups_head(m.model_name)
    if ups_head and not c.ups_head:
        log.info("using the embedded model's UPS %s", ups_head)
    texts = list(c.prompt or []) + (read_prompts(c.prompts_file) if c.prompts_file else [])
    if not texts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts_file FILE")
    model_dir, cfg, _ = preflight(m.model_name, ups_head, c.lora_path)
    apply_model_defaults(s, model_dir, explicit_flags(sys.argv[1:] if argv is None else argv,
                                                      [f.name for f in dataclasses.fields(SamplingArgs)]))
    has_ups = bool(ups_head) or bool(cfg.ups_taps)
    sources = parse_sources(c.sources, has_ups)
    tokenizer = load_tokenizer(model_dir)
    ids = resolve_special_ids(tokenizer, cfg, m.mask_id)
    chat = False if c.no_chat else (c.chat if c.chat is not None else default_chat(m.model_name))
    prompts = [encode_prompt(tokenizer, t, chat) for t in texts]
    longest = max(len(p) for p in prompts)
    for src in sources:
        s.to_sampler_config(src).validate(cfg.max_sequence_length, longest, has_ups)
    # ---- the model
    loaded = load_for_inference(m.model_name, ups_head, c.lora_path, m.device, m.dtype, m.mask_id)
    model, device = loaded.model, next(loaded.model.parameters()).device
    log.info("model %s (UPS: %s) on %s; %d prompt(s), sources %s, chat=%s", m.model_name,
             loaded.model.ups_arch or "none", device, len(prompts), ",".join(sources), chat)
    records: list[dict] = []
    gens: dict[tuple[int, str], object] = {}
    for src in sources:
        scfg = s.to_sampler_config(src, record_trajectory=bool(c.trajectory_out))
        for lo in range(0, len(prompts), c.batch_size):
            batch = list(range(lo, min(lo + c.batch_size, len(prompts))))
            outs = generate(model, [prompts[i] for i in batch], scfg, ids,
                            [item_generator(m.seed, i, device) for i in batch])
            for i, g in zip(batch, outs):
                gens[i, src] = g
    for i, text in enumerate(texts):
        for src in sources:
            g = gens[i, src]
            records.append(dict(prompt=text, source=src, text=tokenizer.decode(g.tokens, skip_special_tokens=True),
                                generated_ids=[int(t) for t in g.tokens], nfe=g.nfe, remasks=g.remasks,
                                remasks_per_block=g.remasks_per_block, seconds=round(g.seconds, 6),
                                model_name=m.model_name, ups_head=ups_head, lora_path=c.lora_path, seed=m.seed,
                                chat=chat, steps=s.steps, gen_length=s.gen_length, block_length=s.block_length,
                                temperature=s.temperature, cfg_scale=s.cfg_scale, logits_eos_inf=s.logits_eos_inf,
                                confidence_eos_eot_inf=s.confidence_eos_eot_inf, eos_gating=s.eos_gating))
    print(format_comparison(records, sources))
    if c.output_jsonl:
        with atomic_path(c.output_jsonl) as tmp:
            Path(tmp).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        log.info("wrote %d lines to %s", len(records), c.output_jsonl)
    if c.trajectory_out:
        from remedi.decoding.trajectory import draw_trajectory

        out = Path(c.trajectory_out)
        out.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            for src in sources:
                stem = out / f"prompt{i:03d}_{src}"
                short = text if len(text) <= 70 else text[:69] + "\u2026"
                draw_trajectory(gens[i, src], tokenizer, stem.with_suffix(".png"), stem.with_suffix(".html"),
                                title=f"{src}: {short}")
        log.info("wrote trajectories to %s", out)
    return records


def format_comparison(records: list[dict], sources: list[str], width: int = 100) -> str:
    """Per prompt: a table of source / NFE / remasks / seconds, then each source's answer, indented."""
    lines = []
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r)
    w = max(len(s) for s in sources)
    for n, (prompt, rows) in enumerate(by_prompt.items(), 1):
        lines += ["=" * width, f"[{n}] {prompt}", "-" * width,
                  f"{'source':<{w}}  {'NFE':>5}  {'remasks':>7}  {'seconds':>8}  answer"]
        for r in rows:
            flat = " ".join(r["text"].split())
            flat = flat if len(flat) <= width - w - 30 else flat[: width - w - 31] + "\u2026"
            lines.append(f"{r['source']:<{w}}  {r['nfe']:>5}  {r['remasks']:>7}  {r['seconds']:>8.3f}  {flat}")
        for r in rows:
            lines.append(f"--- {r['source']}:")
            paras = r["text"].split("\n") if r["text"].strip() else ["(empty)"]
            for para in paras:
                lines += textwrap.wrap(para, width - 4, initial_indent="    ", subsequent_indent="    ") or [""]
    lines.append("=" * width)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
