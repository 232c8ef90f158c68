"""Evaluate sampling strategies (sources) on GSM8K, MATH-500, a local jsonl or the arithmetic task.

    python remedi/eval_gsm_math.py --model_name GSAI-ML/LLaDA-8B-Base --ups_head ups.pt \
        --dataset openai/gsm8k --subset main --split test --format gsm8k --max_samples 50 --infer_bs 1 \
        --steps 128 --gen_length 128 --block_length 16 --temperature 0.0 --cfg_scale 0.0 --eos_gating
    accelerate launch remedi/eval_gsm_math.py ...          # items split across GPUs, same results
    python remedi/eval_gsm_math.py --rescore runs/x/results.jsonl   # re-check completions, no model

Every source runs on the same items with the same per-item seeds; results.jsonl gets one line per
finished item (a rerun with the same --output_dir skips finished items), summary.json/summary.md hold
accuracy with 95% Wilson intervals and paired tests between sources. Library: remedi/gsm_eval.py.
"""
if __package__ in (None, ""):  # run as a file: import the package from the repo root, never from remedi/ itself
    import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from remedi.evaluation import runner as ge
from remedi.evaluation.answer_check import FORMATS
from remedi.model.checkpoint import atomic_path, versions, write_json_atomic
from remedi.arguments import ModelArgs, arg, parse_args, setup_logging
from remedi.model.loading import (EMBEDDED_MODEL, default_chat, load_for_inference, load_tokenizer, preflight,
                      resolve_special_ids)
from remedi.decoding.sampler import STRATEGIES
from remedi.decoding.args import SamplingArgs

log = logging.getLogger("eval_gsm_math")


SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SamplingArgs)]


@dataclass
class EvalArgs:
    ups_head: Optional[str] = arg(None, "UPS checkpoint (.pt/.safetensors); default for the embedded model: its "
                                  "ups_head.pt if present")
    lora_path: Optional[str] = arg(None, "peft LoRA folder merged into the backbone before sampling")
    dataset: Optional[str] = arg(None, "openai/gsm8k, HuggingFaceH4/MATH-500, a local .jsonl/.json (or a folder "
                                 "with <split>.jsonl), or 'arith'; default: the embedded model's arithmetic test split")
    subset: Optional[str] = arg(None, "hub dataset config (openai/gsm8k: main)")
    split: str = arg("test", "dataset split")
    format: Optional[str] = arg(None, f"answer format: {' | '.join(FORMATS)}; default guessed from the dataset")
    sources: Optional[str] = arg(None, "comma list of strategies (" + ", ".join(STRATEGIES) + "); default "
                                 "llada_low_confidence, plus ups,tps_prob,random when a UPS is given")
    steps_list: Optional[str] = arg(None, "comma list of step counts to sweep (accuracy vs NFE); default: --steps")
    fewshot: int = arg(0, "few-shot exemplars from the train split (Base models)")
    fewshot_file: Optional[str] = arg(None, "where few-shot exemplars come from (default: the dataset's train split)")
    chat: bool = arg(False, "use the chat template (without --chat/--no_chat: on for *Instruct* models only)")
    no_chat: bool = arg(False, "plain-text prompts even for an Instruct model")
    max_samples: int = arg(300, "items to evaluate (-1: the whole split)")
    start: int = arg(0, "index of the first item")
    shuffle: bool = arg(False, "shuffle the split with --seed before --start/--max_samples")
    infer_bs: int = arg(32, "prompts per generate call (float32 results do not depend on it; in bf16 batched "
                        "kernels round differently, so keep it fixed when comparing runs)")
    output_dir: Optional[str] = arg(None, "default runs/eval-<dataset>-<timestamp>; rerun with the same folder "
                                    "to resume")
    rescore: Optional[str] = arg(None, "re-check the completions of an earlier results.jsonl; loads no model")
    trajectory_out: Optional[str] = arg("auto", "folder for a trajectory picture (PNG + HTML) of the first item "
                                        "per source; auto: <output_dir>/trajectories, none: no pictures")
    n_boot: int = arg(2000, "paired bootstrap resamples")

    def __post_init__(self):
        if self.chat and self.no_chat:
            raise ValueError("--chat and --no_chat contradict each other; pass one")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.infer_bs < 1:
            raise ValueError(f"--infer_bs must be >= 1, got {self.infer_bs}")
        if self.fewshot < 0:
            raise ValueError(f"--fewshot must be >= 0, got {self.fewshot}")
        if self.max_samples == 0 or self.max_samples < -1:
            raise ValueError(f"--max_samples must be a positive count or -1 (all), got {self.max_samples}")


@dataclass
class Plan:
    spec: ge.DatasetSpec
    items: list
    prompts: dict  # item id -> (prompt ids, prompt text)
    sources: list[str]
    steps: list[int]
    ups_head: Optional[str]
    fixed: dict  # settings every line of results.jsonl shares (checked on resume)
    note: str = ""


def _csv(s: Optional[str]) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _default_sources(has_ups: bool, embedded: bool) -> list[str]:
    if has_ups and embedded:
        return ["llada_low_confidence", "tps_prob", "margin", "random", "ups"]
    return ["llada_low_confidence"] + (["ups", "tps_prob", "random"] if has_ups else [])


def plan_run(m: ModelArgs, s: SamplingArgs, e: EvalArgs, argv) -> Plan:
    """Every cheap check (paths, UPS fit, dataset fields, sources, lengths) before a weight is read."""
    embedded = Path(m.model_name).expanduser().resolve() == EMBEDDED_MODEL.resolve()
    ups_head = e.ups_head
    if ups_head is None and embedded and ge.EMBEDDED_UPS.is_file():
        ups_head = str(ge.EMBEDDED_UPS)
        log.info("using the embedded model's UPS head %s", ups_head)
    model_dir, cfg, ups_meta = preflight(m.model_name, ups_head, e.lora_path)
    ge.apply_model_defaults(s, model_dir, ge.explicit_flags(argv, SAMPLING_FIELDS))
    has_ups = ups_meta is not None or bool(cfg.ups_taps)
    sources = _csv(e.sources) or _default_sources(has_ups, embedded)
    bad = [x for x in sources if x not in STRATEGIES]
    if bad:
        raise ValueError(f"--sources: unknown {bad}; choose from {', '.join(STRATEGIES)}")
    if len(set(sources)) != len(sources):
        raise ValueError(f"--sources lists a source twice: {sources}")
    try:
        steps = [int(x) for x in _csv(e.steps_list)] or [s.steps]
    except ValueError:
        raise ValueError(f"--steps_list must be comma-separated integers, got {e.steps_list!r}") from None
    for src in sources:
        for st in steps:
            ge.sampler_config(s, src, st).validate(has_ups=has_ups)

    spec = ge.resolve_dataset(e.dataset, e.subset, e.split, e.format)
    items, note = ge.select_items(ge.load_items(spec), e.start, e.max_samples, e.shuffle, m.seed)
    if note:
        log.warning(note)
    exemplars = []
    if e.fewshot:
        exemplars = ge.fewshot_exemplars(ge.load_items(ge.fewshot_source(spec, e.fewshot_file)), e.fewshot,
                                         exclude_ids=[it.id for it in items] if not e.fewshot_file else ())
    chat = e.chat or (not e.no_chat and default_chat(m.model_name))
    style = ge.prompt_style(spec, chat)
    tok = load_tokenizer(model_dir)
    resolve_special_ids(tok, cfg, m.mask_id)  # a wrong --mask_id fails here, not after the weights load
    prompts = {}
    for it in items:
        ids, text = ge.encode(tok, ge.build_prompt(it.question, spec.fmt, style, exemplars), style)
        prompts[it.id] = (ids, text)
    longest = max(len(p[0]) for p in prompts.values())
    ge.sampler_config(s, sources[0], steps[0]).validate(cfg.max_sequence_length, longest)
    fixed = {"model_name": str(m.model_name), "ups_head": ups_head, "lora_path": e.lora_path, "dtype": m.dtype,
             "seed": m.seed, "dataset": spec.name, "subset": spec.subset, "split": spec.split, "format": spec.fmt,
             "prompt_style": style, "fewshot": e.fewshot, "fewshot_ids": [x.id for x in exemplars],
             **{k: v for k, v in dataclasses.asdict(s).items() if k != "steps"}}
    return Plan(spec, items, prompts, sources, steps, ups_head, fixed, note)


def _default_output_dir(spec: ge.DatasetSpec) -> Path:
    name = ge.ARITH if spec.kind == ge.ARITH else (spec.name.replace("/", "_") if spec.kind == "hub"
                                                   else Path(spec.name).stem)
    return Path("runs") / f"eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _open_output(out: Path, fixed: dict) -> set:
    """Create or resume ``out``: checks config.json, repairs a torn last line; returns finished keys."""
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        ge.check_resume(json.loads(cfg_path.read_text())["fixed"], fixed)
    out.mkdir(parents=True, exist_ok=True)
    return {ge.record_key(r) for r in ge.read_results(out / "results.jsonl", repair=True)}


def write_reports(out: Path, records: list, title: str, n_boot: int, seed: int, extra: dict) -> dict:
    from remedi.evaluation.plots import has_steps_sweep, plot_accuracy, plot_accuracy_vs_nfe

    summary = ge.summarize(records, n_boot=n_boot, seed=seed)
    files = {"results": str(extra.pop("results")), "summary.json": str(out / "summary.json"), "summary.md": str(out / "summary.md"),
             "accuracy.png": str(plot_accuracy(summary, out / "accuracy.png", title))}
    if has_steps_sweep(summary):
        files["accuracy_vs_nfe.png"] = str(plot_accuracy_vs_nfe(summary, out / "accuracy_vs_nfe.png", title))
    summary = {**summary, **extra, "files": files}
    write_json_atomic(out / "summary.json", summary)
    md = ge.render_markdown(summary, title)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(md)
    print(md + "\n" + "\n".join(f"{k}: {v}" for k, v in files.items()))
    return summary


def rescore(e: EvalArgs, seed: int) -> dict:
    path = Path(e.rescore)
    old = ge.read_results(path)
    if not old:
        raise ValueError(f"--rescore {path}: no records found")
    cfg_path = path.parent / "config.json"
    fmt = e.format or (json.loads(cfg_path.read_text())["fixed"]["format"] if cfg_path.is_file() else None)
    if fmt is None:
        raise ValueError(f"--rescore: no config.json beside {path} to read the answer format from; pass --format")
    records = ge.rescore_records(old, fmt)
    out = Path(e.output_dir) if e.output_dir else path.parent
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "rescored.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    changed = sum(a.get("correct") != b["correct"] for a, b in zip(old, records))
    log.info("rescored %d records from %s (%d verdicts changed)", len(records), path, changed)
    return write_reports(out, records, f"rescored {path.name} ({fmt})", e.n_boot, seed,
                         {"results": out / "rescored.jsonl", "rescored_from": str(path), "format": fmt, "verdicts_changed": changed})


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    m, s, e = parse_args([ModelArgs, SamplingArgs, EvalArgs], argv, description=__doc__)
    if e.rescore:
        setup_logging(True)
        return rescore(e, m.seed)

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    import torch

    # No GPU (or --device cpu): processes started by torchrun talk over gloo on the CPU.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available() \
        or str(m.device or "").startswith("cpu")
    state = PartialState(cpu=cpu)
    setup_logging(state.is_main_process)
    with state.main_process_first():  # rank 0 fills the hub caches (model, dataset) before the others read them
        plan = plan_run(m, s, e, argv)
    # Rank 0 opens (or resumes) the output folder; everyone learns the folder and the finished keys.
    msg = [None, None, None]
    if state.is_main_process:
        out = Path(e.output_dir) if e.output_dir else _default_output_dir(plan.spec)
        try:
            msg = [str(out), sorted(_open_output(out, plan.fixed), key=str), None]
            write_json_atomic(out / "config.json", {"fixed": plan.fixed, "last_run": {
                "argv": argv, "sources": plan.sources, "steps": plan.steps, "n_items": len(plan.items),
                "start": e.start, "max_samples": e.max_samples, "world_size": state.num_processes,
                "versions": versions()}})
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
    if total:
        device = state.device if state.num_processes > 1 or not m.device else torch.device(m.device)
        device = "cpu" if device.type == "cpu" else str(device)  # safetensors rejects "cpu:0"
        loaded = load_for_inference(m.model_name, plan.ups_head, e.lora_path, device=device, dtype=m.dtype,
                                    mask_id=m.mask_id)
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", disable=not state.is_main_process, dynamic_ncols=True)
        world, rank, bs = state.num_processes, state.process_index, e.infer_bs
        for (st, src), items in todo.items():
            mine = items[rank::world]
            rounds = -(-len(items[0::world]) // bs) if items else 0  # equal on every rank
            for r in range(rounds):
                batch = mine[r * bs:(r + 1) * bs]
                recs = []
                if batch:
                    recs = ge.run_batch(loaded.model, loaded.tokenizer, loaded.ids, batch,
                                        [plan.prompts[it.id][0] for it in batch],
                                        [plan.prompts[it.id][1] for it in batch], src, st, s, plan.spec.fmt,
                                        m.seed, device="cpu")
                recs = gather_object(recs) if world > 1 else recs
                if state.is_main_process:
                    ge.append_records(out / "results.jsonl", recs)
                    bar.update(len(recs))
                    bar.set_postfix(source=src, steps=st)
        bar.close()
        traj_dir = {"auto": out / "trajectories", "none": None, "": None}.get(
            e.trajectory_out, Path(e.trajectory_out) if e.trajectory_out else None)
        if traj_dir is not None and state.is_main_process:
            _trajectories(loaded, plan, s, m.seed, traj_dir)
    state.wait_for_everyone()
    if state.num_processes > 1:  # no collectives follow; rank 0 writes the reports alone
        state.destroy_process_group()
    if not state.is_main_process:
        return {}
    wanted = {(it.id, src, st) for it in plan.items for src in plan.sources for st in plan.steps}
    records = [r for r in ge.read_results(out / "results.jsonl") if ge.record_key(r) in wanted]
    return write_reports(out, records, f"{plan.spec.name} ({plan.spec.fmt})", e.n_boot, m.seed,
                         {"results": out / "results.jsonl", "config": plan.fixed, "sources": plan.sources, "steps": plan.steps, "note": plan.note,
                          "output_dir": str(out)})


def _trajectories(loaded, plan: Plan, s, seed: int, out: Path) -> None:
    """Picture of the first item's decoding per source (needs remedi.decoding.trajectory.draw_trajectory)."""
    try:
        from remedi.decoding.trajectory import draw_trajectory
    except ImportError:
        log.warning("trajectories: remedi.decoding.trajectory.draw_trajectory is not available; no pictures drawn")
        return
    it = plan.items[0]
    out.mkdir(parents=True, exist_ok=True)
    for src in plan.sources:
        cfg = dataclasses.replace(ge.sampler_config(s, src, plan.steps[0]), record_trajectory=True)
        gen = ge._generate(loaded.model, [plan.prompts[it.id][0]], cfg, loaded.ids,
                           [ge.item_generator(seed, it.id)])[0]
        path = out / f"trajectory-{src}-{it.id}.png"
        draw_trajectory(gen, loaded.tokenizer, path, title=f"{src}, item {it.id}")
        log.info("trajectory of %s with %s: %s", it.id, src, path)


if __name__ == "__main__":
    main()
