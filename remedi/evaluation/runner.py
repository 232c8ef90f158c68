"""An eval run: plan (every cheap check), decode item by item into results.jsonl, summarise.

:func:`plan_run` opens the inference session (model folder, defaults.json, UPS metadata, tokenizer) and
reads the dataset and builds every prompt before a weight is read, so a bad flag fails in a second.
:func:`run` splits the items over the processes accelerate started (each item's random stream depends
only on (seed, item id), so the results do not depend on the number of GPUs), appends finished records
line by line on rank 0 and writes the reports. :func:`rescore` re-checks stored completions, no model.

Code formats (``--format humaneval|mbpp``, or the hub ids ``openai_humaneval`` / ``mbpp``): each batch's
completions are executed against the problems' tests in the sandbox (:mod:`remedi.sandbox`)
before the batch's records are appended, ``correct`` is "the tests passed" (accuracy = pass@1), and
``--rescore`` re-executes the stored completions against the tests stored in each record.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from remedi.arguments import ModelArgs, arg, setup_logging
from remedi.decoding.args import SamplingArgs
from remedi.decoding.sampler import STRATEGIES
from remedi.evaluation import data as D
from remedi.evaluation import results as R
from remedi.evaluation.report import render_markdown, summarize
from remedi.files import LOCK_NAME, RunLock, atomic_path, check_writable, write_json_atomic
from remedi.model.checkpoint import versions
from remedi.session import Session, fixed_settings, open_session, parse_sources

FORMATS = D.FORMATS

log = logging.getLogger("eval_gsm_math")


@dataclass
class EvalArgs:
    ups_head: Optional[str] = arg(None, "UPS checkpoint (.pt/.safetensors); default for the embedded model: its "
                                  "ups_residual.pt if present")
    lora_path: Optional[str] = arg(None, "peft LoRA folder merged into the backbone before sampling")
    dataset: Optional[str] = arg(None, "openai/gsm8k, HuggingFaceH4/MATH-500, openai_humaneval, mbpp (sanitized), a "
                                 "local .jsonl/.json (or a folder with <split>.jsonl), or 'arith'; default: the "
                                 "embedded model's arithmetic test split")
    subset: Optional[str] = arg(None, "hub dataset config (openai/gsm8k: main)")
    split: str = arg("test", "dataset split")
    format: Optional[str] = arg(None, f"answer format: {' | '.join(FORMATS)} (humaneval/mbpp: scored by running "
                                "the tests in a sandbox); default guessed from the dataset")
    sources: Optional[str] = arg(None, "comma list of strategies (" + ", ".join(STRATEGIES) + "); default "
                                 "llada_low_confidence, plus ups,tps_prob,entropy,random when a UPS is given; the "
                                 "embedded model: llada_low_confidence,tps_prob,margin,entropy,random,ups")
    steps_list: Optional[str] = arg(None, "comma list of step counts to sweep (accuracy vs NFE); default: --steps")
    fewshot: int = arg(0, "few-shot exemplars from the train split (Base models)")
    fewshot_file: Optional[str] = arg(None, "where few-shot exemplars come from (default: the dataset's train split)")
    chat: bool = arg(False, "use the chat template (without --chat/--no_chat: on for *Instruct* models only)")
    no_chat: bool = arg(False, "plain-text prompts even for an Instruct model")
    max_samples: int = arg(300, "items to evaluate (-1: the whole split)")
    n_samples: int = arg(1, "completions per item (item id '<id>#<k>', its own random stream): the report adds "
                         "pass@k for k = 1, 2, 4, ... <= n (sample with --temperature > 0)")
    start: int = arg(0, "index of the first item")
    shuffle: bool = arg(False, "shuffle the split with --seed before --start/--max_samples")
    infer_bs: int = arg(32, "prompts per generate call (float32 results do not depend on it; in bf16 batched "
                        "kernels round differently, so keep it fixed when comparing runs)")
    output_dir: Optional[str] = arg(None, "default runs/eval-<dataset>-<timestamp>; rerun with the same folder "
                                    "to resume")
    rescore: Optional[str] = arg(None, "re-check the completions of an earlier results.jsonl; loads no model")
    trajectory_out: Optional[str] = arg("auto", "folder for a trajectory picture (PNG) per source of the first item "
                                        "that some source got right; auto: <output_dir>/trajectories, none: no pictures")
    n_boot: int = arg(2000, "paired bootstrap resamples")
    allow_weak_sandbox: bool = arg(False, "score humaneval/mbpp even where the code sandbox lacks a required layer "
                                   "(bubblewrap, seccomp, ...): generated code could then read or harm this machine")

    def __post_init__(self):
        if self.chat and self.no_chat:
            raise ValueError("--chat and --no_chat contradict each other; pass one")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.infer_bs < 1:
            raise ValueError(f"--infer_bs must be >= 1, got {self.infer_bs}")
        if self.fewshot < 0:
            raise ValueError(f"--fewshot must be >= 0, got {self.fewshot}")
        if self.n_samples < 1:
            raise ValueError(f"--n_samples must be >= 1, got {self.n_samples}")
        if self.max_samples == 0 or self.max_samples < -1:
            raise ValueError(f"--max_samples must be a positive count or -1 (all), got {self.max_samples}")


@dataclass
class Plan:
    session: Session
    spec: D.ItemSource
    items: list
    prompts: dict  # item id -> (prompt ids, prompt text)
    sources: list[str]
    steps: list[int]
    fixed: dict  # settings every line of results.jsonl shares (checked on resume)
    note: str = ""


def _csv(s: Optional[str]) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _default_sources(has_ups: bool, embedded: bool) -> list[str]:
    if has_ups and embedded:
        return ["llada_low_confidence", "tps_prob", "margin", "entropy", "random", "ups"]
    return ["llada_low_confidence"] + (["ups", "tps_prob", "entropy", "random"] if has_ups else [])


def plan_run(m: ModelArgs, s: SamplingArgs, e: EvalArgs) -> Plan:
    """Every cheap check (paths, UPS fit, dataset fields, sources, lengths) before a weight is read."""
    if e.output_dir:
        check_writable(e.output_dir, "--output_dir", is_dir=True)
    chat = True if e.chat else (False if e.no_chat else None)
    session = open_session(m.model_name, s, ups_head=e.ups_head, lora_path=e.lora_path, chat=chat, seed=m.seed,
                           mask_id=m.mask_id)
    sources = parse_sources(e.sources, session.has_ups, _default_sources(session.has_ups, session.embedded))
    try:
        steps = [int(x) for x in _csv(e.steps_list)] or [s.steps]
    except ValueError:
        raise ValueError(f"--steps_list must be comma-separated integers, got {e.steps_list!r}") from None
    spec = D.resolve_dataset(e.dataset, e.subset, e.split, e.format)
    if D.is_code(spec.fmt):
        _check_sandbox(e)
    items, note = D.select_items(D.load_items(spec), e.start, e.max_samples, e.shuffle, m.seed)
    if note:
        log.warning(note)
    if e.n_samples > 1:
        if not s.temperature:
            log.warning("--n_samples %d at --temperature 0: greedy token draws differ only through random "
                        "sources; pass --temperature > 0 for independent samples", e.n_samples)
        items = [dataclasses.replace(it, id=f"{it.id}#{k}") for it in items for k in range(e.n_samples)]
    exemplars = []
    if e.fewshot:
        exemplars = D.fewshot_exemplars(D.load_items(D.fewshot_source(spec, e.fewshot_file)), e.fewshot,
                                        exclude_ids=[it.id for it in items] if not e.fewshot_file else ())
    style = D.prompt_style(spec, session.chat)
    prompts = {it.id: D.encode(session.tokenizer, D.build_prompt(it.question, spec.fmt, style, exemplars), style)
               for it in items}
    session.check_prompts(sources, [len(p[0]) for p in prompts.values()], steps)
    fixed = {**fixed_settings(session), "dtype": m.dtype, "dataset": spec.name, "subset": spec.subset,
             "split": spec.split, "format": spec.fmt, "prompt_style": style, "fewshot": e.fewshot,
             "fewshot_ids": [x.id for x in exemplars]}
    return Plan(session, spec, items, prompts, sources, steps, fixed, note)


def _default_output_dir(spec: D.ItemSource) -> Path:
    name = D.ARITH if spec.kind == D.ARITH else (spec.name.replace("/", "_") if spec.kind == "hub"
                                                 else Path(spec.name).stem)
    return Path("runs") / f"eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _open_output(out: Path, fixed: dict) -> set:
    """Create or resume ``out``: checks config.json, repairs a torn last line; returns finished keys."""
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())["fixed"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"--output_dir {out} holds a config.json that is not an eval run's (a training run's "
                             "folder?); choose a new --output_dir") from None
        R.check_resume(old, fixed)
    elif out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):  # our own lock file aside
        raise ValueError(f"--output_dir {out} is not empty and holds no eval run (a training run's folder?); "
                         "choose a new or empty --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    return {R.record_key(r) for r in R.read_results(out / "results.jsonl", repair=True)}


def write_reports(out: Path, records: list, title: str, n_boot: int, seed: int, extra: dict) -> dict:
    from remedi.evaluation.plots import has_steps_sweep, plot_accuracy, plot_accuracy_vs_nfe

    summary = summarize(records, n_boot=n_boot, seed=seed)
    model = model_title(extra.get("config") or {})
    files = {"results": str(extra.pop("results")), "summary.json": str(out / "summary.json"),
             "summary.md": str(out / "summary.md"),
             "accuracy.png": str(plot_accuracy(summary, out / "accuracy.png", title, model))}
    if has_steps_sweep(summary):
        files["accuracy_vs_nfe.png"] = str(plot_accuracy_vs_nfe(summary, out / "accuracy_vs_nfe.png", title, model))
    summary = {**summary, **extra, "files": files}
    write_json_atomic(out / "summary.json", summary)
    md = render_markdown(summary, title)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(md)
    print(md + "\n" + "\n".join(f"{k}: {v}" for k, v in files.items()))
    return summary


def model_title(fixed: dict) -> Optional[str]:
    """A reader's name for the model of a run (folder names, never machine paths): model, + UPS, + LoRA."""
    if not fixed.get("model_name"):
        return None
    name = lambda p: Path(str(p)).name if Path(str(p)).expanduser().exists() else str(p)  # noqa: E731
    out = name(fixed["model_name"])
    if fixed.get("ups_head"):
        out += f" + UPS {Path(str(fixed['ups_head'])).name}"
    if fixed.get("lora_path"):
        out += f" + LoRA {Path(str(fixed['lora_path'])).name}"
    return out


def dataset_title(spec: D.ItemSource) -> str:
    """A reader's name for the data (never a machine path)."""
    if spec.kind == D.ARITH:
        return f"arithmetic task ({spec.split} split)"
    if spec.kind == "hub":
        return f"{spec.name} ({spec.split})"
    return f"{Path(spec.name).name} ({spec.fmt} format)"


def _check_sandbox(e: EvalArgs) -> None:
    """Before any model or sample work: refuse code scoring on a host whose sandbox lacks a required layer."""
    from remedi import sandbox

    if e.allow_weak_sandbox:
        sandbox.accept_weak_host()
        missing = sandbox.missing_layers()
        if missing:
            log.warning("--allow_weak_sandbox: scoring generated code without %s", ", ".join(missing))
    sandbox.require_strong()


def rescore(e: EvalArgs, seed: int) -> dict:
    path = Path(e.rescore)
    if not path.is_file():
        raise FileNotFoundError(f"--rescore {path} does not exist; give the results.jsonl of an earlier eval run")
    old = R.read_results(path)
    if not old:
        raise ValueError(f"--rescore {path}: no records found")
    cfg_path = path.parent / "config.json"
    fmt = e.format or (json.loads(cfg_path.read_text())["fixed"]["format"] if cfg_path.is_file() else None)
    if fmt is None:
        raise ValueError(f"--rescore: no config.json beside {path} to read the answer format from; pass --format")
    if D.is_code(fmt):
        _check_sandbox(e)
    records = R.rescore_records(old, fmt)
    out = Path(e.output_dir) if e.output_dir else path.parent
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "rescored.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    changed = sum(a.get("correct") != b["correct"] for a, b in zip(old, records))
    log.info("rescored %d records from %s (%d verdicts changed)", len(records), path, changed)
    return write_reports(out, records, f"rescored results ({fmt} format)", e.n_boot, seed,
                         {"results": out / "rescored.jsonl", "rescored_from": str(path), "format": fmt,
                          "verdicts_changed": changed})


def run_batch(session: Session, plan: Plan, batch: list, source: str, steps: int) -> list[dict]:
    """Generate one batch of items with one source and step count; returns finished records."""
    t0 = time.perf_counter()
    outs = session.generate([plan.prompts[it.id][0] for it in batch], source, [it.id for it in batch], steps)
    wall = time.perf_counter() - t0
    completions = [session.tokenizer.decode(out.tokens, skip_special_tokens=True) for out in outs]
    executed = [None] * len(batch)
    if D.is_code(plan.spec.fmt):  # the whole batch at once: one sandboxed process per completion, concurrently
        executed = R.execute_code([it.problem for it in batch], completions, plan.spec.fmt)
    records = []
    for it, out, completion, ex in zip(batch, outs, completions, executed):
        stats = dict(nfe=out.nfe, remasks=out.remasks, remasks_per_block=list(out.remasks_per_block),
                     seconds=wall / len(batch), gen_tokens=len(out.tokens))
        if ex is not None:
            records.append(R.make_code_record(it, source, steps, plan.prompts[it.id][1], completion, plan.spec.fmt,
                                              execution=ex, **stats))
        else:
            records.append(R.make_record(it, source, steps, plan.prompts[it.id][1], completion, plan.spec.fmt,
                                         **stats))
    return records


def run(m: ModelArgs, s: SamplingArgs, e: EvalArgs, argv: list[str]) -> dict:
    """The whole eval (see the module docstring); returns the summary on rank 0, {} elsewhere."""
    if e.rescore:
        setup_logging(True)
        return rescore(e, m.seed)

    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    # No GPU (or --device cpu): processes started by torchrun talk over gloo on the CPU.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available() \
        or str(m.device or "").startswith("cpu")
    state = PartialState(cpu=cpu)
    setup_logging(state.is_main_process)
    with state.main_process_first():  # rank 0 fills the hub caches (model, dataset) before the others read them
        plan = plan_run(m, s, e)
    # Rank 0 opens (or resumes) the output folder; everyone learns the folder and the finished keys.
    msg = [None, None, None]
    if state.is_main_process:
        out = Path(e.output_dir) if e.output_dir else _default_output_dir(plan.spec)
        try:
            had_lock = (out / LOCK_NAME).exists()
            lock = RunLock(out)  # held (one eval per folder) until this function returns
            try:
                msg = [str(out), sorted(_open_output(out, plan.fixed), key=str), None]
            except ValueError:  # a refused folder is left as it was: no lock file of ours in it
                lock.release()
                if not had_lock:
                    (out / LOCK_NAME).unlink(missing_ok=True)
                raise
            write_json_atomic(out / "config.json", {"fixed": plan.fixed, "last_run": {
                "argv": argv, "sources": plan.sources, "steps": plan.steps, "n_items": len(plan.items),
                "start": e.start, "max_samples": e.max_samples, "world_size": state.num_processes,
                "sampling_origin": plan.session.sampling.origin, "versions": versions()}})
        except ValueError as err:
            msg = [None, None, str(err)]
    if state.num_processes > 1:
        broadcast_object_list(msg)
    if msg[2]:
        raise ValueError(msg[2])
    out, done = Path(msg[0]), {tuple(k) for k in msg[1]}

    todo = {(st, src): [it for it in plan.items if (it.id, src, st) not in done]
            for st in plan.steps for src in plan.sources}
    total = sum(len(v) for v in todo.values())
    log.info("%d items x %d sources x %d step counts: %d to run, %d already in %s", len(plan.items),
             len(plan.sources), len(plan.steps), total, len(plan.items) * len(plan.sources) * len(plan.steps) - total,
             out / "results.jsonl")
    session = plan.session
    if total:
        device = state.device if state.num_processes > 1 or not m.device else torch.device(m.device)
        session.load("cpu" if device.type == "cpu" else str(device), m.dtype)  # safetensors rejects "cpu:0"
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", disable=not state.is_main_process, dynamic_ncols=True)
        world, rank, bs = state.num_processes, state.process_index, e.infer_bs
        for (st, src), items in todo.items():
            mine = items[rank::world]
            rounds = -(-len(items[0::world]) // bs) if items else 0  # equal on every rank
            for r in range(rounds):
                batch = mine[r * bs:(r + 1) * bs]
                recs = run_batch(session, plan, batch, src, st) if batch else []
                recs = gather_object(recs) if world > 1 else recs
                if state.is_main_process:
                    R.append_records(out / "results.jsonl", recs)
                    bar.update(len(recs))
                    bar.set_postfix(source=src, steps=st)
        bar.close()
        traj_dir = {"auto": out / "trajectories", "none": None, "": None}.get(
            e.trajectory_out, Path(e.trajectory_out) if e.trajectory_out else None)
        if traj_dir is not None and state.is_main_process:
            _trajectories(plan, traj_dir, R.read_results(out / "results.jsonl"))
    state.wait_for_everyone()
    if state.num_processes > 1:  # no collectives follow; rank 0 writes the reports alone
        state.destroy_process_group()
    if not state.is_main_process:
        return {}
    wanted = {(it.id, src, st) for it in plan.items for src in plan.sources for st in plan.steps}
    records = [r for r in R.read_results(out / "results.jsonl") if R.record_key(r) in wanted]
    return write_reports(out, records, dataset_title(plan.spec), e.n_boot, m.seed,
                         {"results": out / "results.jsonl", "config": plan.fixed, "sources": plan.sources,
                          "steps": plan.steps, "note": plan.note, "output_dir": str(out)})


def picture_item(plan: Plan, records: list[dict]):
    """The item the trajectory pictures show: the first one (in run order) that at least one source got right
    at the first step count, so the pictures can show a right decoding beside wrong ones; else the first item."""
    right = {str(r["id"]) for r in records if r.get("correct") and r.get("steps") == plan.steps[0]}
    return next((it for it in plan.items if it.id in right), plan.items[0])


def _trajectories(plan: Plan, out: Path, records: list[dict]) -> None:
    """A picture of one item's decoding per source (see :func:`picture_item`), with its prompt, what the model
    answered, the gold answer and the verdict."""
    from remedi.decoding.trajectory import draw_trajectory

    session, it = plan.session, picture_item(plan, records)
    out.mkdir(parents=True, exist_ok=True)
    for src in plan.sources:
        gen = session.generate([plan.prompts[it.id][0]], src, [it.id], plan.steps[0], record_trajectory=True)[0]
        completion = session.tokenizer.decode(gen.tokens, skip_special_tokens=True)
        verdict = R.make_record(it, src, plan.steps[0], "", completion, plan.spec.fmt)
        path = out / f"trajectory-{src}-{it.id}.png"
        answer = verdict["extracted"] if verdict.get("extracted") is not None else completion
        draw_trajectory(gen, session.tokenizer, path, title=f"{src}, item {it.id}, {plan.steps[0]} steps",
                        prompt=it.question, gold=it.gold, correct=verdict["correct"], answer=answer)
        log.info("trajectory of %s with %s: %s", it.id, src, path)
