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
from remedi.session import open_session, parse_sources, usable_sources

log = logging.getLogger("infer_compare")

DEMO_RESULTS = "runs/infer_compare-{time}.jsonl"
"""Where the no-prompt demo saves its lines when --output_jsonl is not given."""
QUIT_WORDS = ("quit", "exit", ":q")


@dataclass
class CompareArgs:
    ups_head: Optional[str] = arg(None, "UPS checkpoint (.pt/.safetensors); default for the embedded model: its "
                                  "ups_residual.pt when present")
    lora_path: Optional[str] = arg(None, "peft LoRA folder merged into the backbone before sampling")
    prompt: Optional[str] = arg(None, "a prompt; repeat the flag for several (--prompt a --prompt b)",
                                action="append")
    prompts_file: Optional[str] = arg(None, ".txt (one prompt per line) or .jsonl (a 'prompt' or 'question' field)")
    sources: Optional[str] = arg(None, f"comma list of {', '.join(STRATEGIES)}; default: every one of them "
                                 "(ups only with a UPS)")
    chat: Optional[bool] = arg(None, "wrap prompts in the chat template (default: for *Instruct* models)",
                               nargs="?", const=True)
    no_chat: bool = arg(False, "plain prompts, no chat template")
    batch_size: int = arg(8, "prompts decoded together (left-padded; each row's result is as if alone)")
    output_jsonl: Optional[str] = arg(None, "write one JSON line per prompt and source here (default: only the "
                                      "no-prompt demo saves, to runs/infer_compare-<time>.jsonl; none: never)")
    trajectory_out: Optional[str] = arg(None, "folder for a trajectory PNG + HTML per prompt and source")
    interactive: bool = arg(False, "after the prompts given (if any): read prompts from stdin one line at a time and "
                            "print every source's answer side by side; an empty line, quit or end of input ends it")

    def __post_init__(self) -> None:
        if self.output_jsonl in ("none", ""):
            self.output_jsonl = ""  # asked for no file
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


def default_items(session) -> list:
    """With no prompt on the embedded model: the first problem of its test split, with its gold answer (a demo,
    said in the log)."""
    from remedi.evaluation import data as D

    if not session.embedded:
        raise ValueError("no prompt: give --prompt TEXT (repeatable), --prompts_file FILE or --interactive")
    spec = D.resolve_dataset(None, None, "test", None)
    item = D.load_items(spec)[0]
    log.info("no --prompt given: decoding the embedded model's first test problem (%s, item %s) with every source",
             Path(spec.name).name, item.id)
    return [item]


def _verdict(item, completion: str) -> dict:
    """gold / extracted / correct of a completion, when the prompt came with a gold answer."""
    if item is None:
        return {}
    from remedi.evaluation.results import make_record

    r = make_record(item, "", None, "", completion, "gsm8k")
    return {"id": item.id, "gold": r["gold"], "extracted": r["extracted"], "correct": r["correct"]}


class Comparer:
    """A loaded session and its sources: decodes prompts into records (the batch and the interactive mode)."""

    def __init__(self, m: ModelArgs, s: SamplingArgs, c: CompareArgs, session, sources: list[str]):
        self.m, self.s, self.c, self.session, self.sources = m, s, c, session, sources

    def decode(self, texts: list[str], items: Optional[list] = None, first_index: int = 0) -> tuple[list, dict]:
        """Records (prompt-major, sources in order) and the generations {(prompt index, source): Generation}."""
        c, m, s, session = self.c, self.m, self.s, self.session
        items = items or [None] * len(texts)
        prompts = [session.encode(t) for t in texts]
        session.check_prompts(self.sources, [len(p) for p in prompts])
        gens: dict[tuple[int, str], object] = {}
        for src in self.sources:
            for lo in range(0, len(prompts), c.batch_size):
                batch = list(range(lo, min(lo + c.batch_size, len(prompts))))
                outs = session.generate([prompts[i] for i in batch], src, [str(first_index + i) for i in batch],
                                        record_trajectory=bool(c.trajectory_out))
                gens.update({(i, src): g for i, g in zip(batch, outs)})
        records = []
        for i, text in enumerate(texts):
            for src in self.sources:
                g = gens[i, src]
                completion = session.tokenizer.decode(g.tokens, skip_special_tokens=True)
                records.append(dict(prompt=text, source=src, text=completion, **_verdict(items[i], completion),
                                    generated_ids=[int(t) for t in g.tokens], nfe=g.nfe, remasks=g.remasks,
                                    remasks_per_block=g.remasks_per_block, seconds=round(g.seconds, 6),
                                    model_name=m.model_name, ups_head=session.ups_head, lora_path=c.lora_path,
                                    seed=m.seed, chat=session.chat, steps=s.steps, gen_length=s.gen_length,
                                    block_length=s.block_length, temperature=s.temperature, cfg_scale=s.cfg_scale,
                                    logits_eos_inf=s.logits_eos_inf,
                                    confidence_eos_eot_inf=s.confidence_eos_eot_inf, eos_gating=s.eos_gating))
        return records, gens

    def draw(self, texts: list[str], gens: dict, records: list[dict], first_index: int = 0) -> None:
        from remedi.decoding.trajectory import draw_trajectory

        out = Path(self.c.trajectory_out)
        out.mkdir(parents=True, exist_ok=True)
        by_key = {(r["prompt"], r["source"]): r for r in records}
        for i, text in enumerate(texts):
            for src in self.sources:
                r = by_key[text, src]
                stem = out / f"prompt{first_index + i:03d}_{src}"
                draw_trajectory(gens[i, src], self.session.tokenizer, stem.with_suffix(".png"),
                                stem.with_suffix(".html"), title=f"source {src}", prompt=text, gold=r.get("gold"),
                                correct=r.get("correct"), answer=r["text"])
        log.info("wrote trajectories to %s", out)


def run_compare(m: ModelArgs, s: SamplingArgs, c: CompareArgs, stdin=None) -> list[dict]:
    import sys
    import time

    texts = list(c.prompt or []) + (read_prompts(c.prompts_file) if c.prompts_file else [])
    chat = False if c.no_chat else c.chat
    session = open_session(m.model_name, s, ups_head=c.ups_head, lora_path=c.lora_path, chat=chat, seed=m.seed,
                           mask_id=m.mask_id)
    items = None
    if not texts and not c.interactive:
        items = default_items(session)
        texts = [it.question for it in items]
        if c.output_jsonl is None:
            c.output_jsonl = DEMO_RESULTS.format(time=time.strftime("%Y%m%d-%H%M%S"))
            check_writable(c.output_jsonl, "--output_jsonl")
    sources = parse_sources(c.sources, session.has_ups, usable_sources(session.has_ups))
    session.check_prompts(sources, [len(session.encode(t)) for t in texts])
    session.load(m.device, m.dtype)
    cmp = Comparer(m, s, c, session, sources)
    log.info("%d prompt(s), sources %s, chat=%s", len(texts), ",".join(sources), session.chat)
    records: list[dict] = []
    if texts:
        records, gens = cmp.decode(texts, items)
        print(format_comparison(records, sources))
        if c.trajectory_out:
            cmp.draw(texts, gens, records)
    if c.interactive:
        records += interactive(cmp, sys.stdin if stdin is None else stdin, first_index=len(texts))
    if c.output_jsonl:
        with atomic_path(c.output_jsonl) as tmp:
            Path(tmp).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        log.info("wrote %d lines (one per prompt and source) to %s", len(records), c.output_jsonl)
    return records


def interactive(cmp: Comparer, stream, first_index: int = 0) -> list[dict]:
    """A prompt loop: each line read from ``stream`` is decoded by every source and printed side by side."""
    records: list[dict] = []
    print(f"interactive: type a prompt and press Enter; {len(cmp.sources)} sources answer side by side "
          f"({', '.join(cmp.sources)}). An empty line, 'quit' or end of input (Ctrl-D) ends.", flush=True)
    n = first_index
    while True:
        print("prompt> ", end="", flush=True)
        line = stream.readline()
        if not line:
            print()
            break
        text = line.rstrip("\n")
        if not text.strip() or text.strip().lower() in QUIT_WORDS:
            break
        try:
            recs, gens = cmp.decode([text], first_index=n)
        except ValueError as e:  # e.g. a prompt too long for the model: say so and keep the loop
            print(f"error: {' '.join(str(e).split())}", flush=True)
            continue
        print(format_comparison(recs, cmp.sources), flush=True)
        if cmp.c.trajectory_out:
            cmp.draw([text], gens, recs, first_index=n)
        records += recs
        n += 1
    return records


def format_comparison(records: list[dict], sources: list[str], width: int = 100) -> str:
    """Per prompt: a table of source / NFE / remasks / seconds, then each source's answer, indented."""
    lines = []
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r)
    w = max(len(s) for s in sources)
    for n, (prompt, rows) in enumerate(by_prompt.items(), 1):
        graded = any("correct" in r for r in rows)
        lines += ["=" * width, f"[{n}] {prompt}"]
        if graded:
            right = [r["source"] for r in rows if r.get("correct")]
            lines.append(f"gold answer: {rows[0]['gold']}; right: {', '.join(right) if right else 'none'} "
                         f"({len(right)} of {len(rows)} sources)")
        lines += ["-" * width, f"{'source':<{w}}  {'NFE':>5}  {'remasks':>7}  {'seconds':>8}  "
                  + ("right  " if graded else "") + "answer"]
        for r in rows:
            flat = " ".join(r["text"].split())
            room = width - w - 30 - (7 if graded else 0)
            flat = flat if len(flat) <= room else flat[: room - 1] + "\u2026"
            mark = (f"{'yes' if r.get('correct') else 'no':<5}  " if graded else "")
            lines.append(f"{r['source']:<{w}}  {r['nfe']:>5}  {r['remasks']:>7}  {r['seconds']:>8.3f}  {mark}{flat}")
        for r in rows:
            lines.append(f"--- {r['source']}:")
            paras = r["text"].split("\n") if r["text"].strip() else ["(empty)"]
            for para in paras:
                lines += textwrap.wrap(para, width - 4, initial_indent="    ", subsequent_indent="    ") or [""]
    lines.append("=" * width)
    return "\n".join(lines)


