"""Compare confidence sources on the same prompts, side by side (the library of infer_compare.py).

Every check that needs no weights (prompts, sources, lengths against the model's defaults.json) runs
in :func:`run_compare` before the weights load (``session.check_prompts``); each prompt's random stream
comes from (seed, prompt index) through the session, so the same ``--seed`` draws as eval_gsm_math.py does
for an item of the same id.
"""
from __future__ import annotations

import json
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from remedi.arguments import ModelArgs, arg
from remedi.decoding.args import SamplingArgs
from remedi.decoding.sampler import STRATEGIES
from remedi.files import atomic_path, check_writable, read_jsonl
from remedi.session import open_session, parse_sources

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
        for flag in ("output_jsonl", "trajectory_out"):
            if getattr(self, flag):
                check_writable(getattr(self, flag), f"--{flag}", is_dir=flag == "trajectory_out")
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
        for n, row in enumerate(read_jsonl(p), 1):
            text = row.get("prompt", row.get("question"))
            if text is None:
                raise ValueError(f"--prompts_file {path} record {n}: no 'prompt' or 'question' field")
            out.append(text)
        return out
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def default_prompt(session) -> list[str]:
    """With no prompt on the embedded model: the first problem of its test split (a demo, said in the log)."""
    test = session.model_dir / "data" / "test.jsonl"
    if not (session.embedded and test.is_file()):
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts_file FILE")
    question = read_jsonl(test)[0]["question"]
    log.info("no --prompt given: decoding the embedded model's first test problem (%s)", test)
    return [question]


def run_compare(m: ModelArgs, s: SamplingArgs, c: CompareArgs) -> list[dict]:
    texts = list(c.prompt or []) + (read_prompts(c.prompts_file) if c.prompts_file else [])
    chat = False if c.no_chat else c.chat
    session = open_session(m.model_name, s, ups_head=c.ups_head, lora_path=c.lora_path, chat=chat, seed=m.seed,
                           mask_id=m.mask_id)
    texts = texts or default_prompt(session)
    sources = parse_sources(c.sources, session.has_ups, UPS_SOURCES if session.has_ups else TRAINING_FREE_SOURCES)
    prompts = [session.encode(t) for t in texts]
    session.check_prompts(sources, [len(p) for p in prompts])
    session.load(m.device, m.dtype)
    log.info("%d prompt(s), sources %s, chat=%s", len(prompts), ",".join(sources), session.chat)
    gens: dict[tuple[int, str], object] = {}
    for src in sources:
        for lo in range(0, len(prompts), c.batch_size):
            batch = list(range(lo, min(lo + c.batch_size, len(prompts))))
            outs = session.generate([prompts[i] for i in batch], src, [str(i) for i in batch],
                                    record_trajectory=bool(c.trajectory_out))
            gens.update({(i, src): g for i, g in zip(batch, outs)})
    records = []
    for i, text in enumerate(texts):
        for src in sources:
            g = gens[i, src]
            records.append(dict(prompt=text, source=src,
                                text=session.tokenizer.decode(g.tokens, skip_special_tokens=True),
                                generated_ids=[int(t) for t in g.tokens], nfe=g.nfe, remasks=g.remasks,
                                remasks_per_block=g.remasks_per_block, seconds=round(g.seconds, 6),
                                model_name=m.model_name, ups_head=session.ups_head, lora_path=c.lora_path,
                                seed=m.seed, chat=session.chat, steps=s.steps, gen_length=s.gen_length,
                                block_length=s.block_length, temperature=s.temperature, cfg_scale=s.cfg_scale,
                                logits_eos_inf=s.logits_eos_inf, confidence_eos_eot_inf=s.confidence_eos_eot_inf,
                                eos_gating=s.eos_gating))
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
                draw_trajectory(gens[i, src], session.tokenizer, stem.with_suffix(".png"), stem.with_suffix(".html"),
                                title=f"source {src}", prompt=text)
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


