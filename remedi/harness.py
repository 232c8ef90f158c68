"""lm-evaluation-harness adapter: the project's sampler as lm-eval model ``remedi`` (lm-eval 0.4.13).

    python -m remedi.harness --model remedi --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,preset=fast_dllm_gsm8k \
        --tasks gsm8k --num_fewshot 5 --output_path runs/lm_eval
    accelerate launch -m remedi.harness --model remedi --model_args pretrained=...,preset=... --tasks gsm8k ...

``python -m remedi.harness ARGS`` registers the model and hands ARGS to lm-eval's own command line (every
lm-eval flag works), with ``--model remedi`` as the default, the shipped tasks of :mod:`remedi.lm_eval_tasks`
indexed, the device this machine has when ``--device`` is not given, and the model_args checked before
anything loads (:meth:`RemediLM.check_args`: one ``error:`` line, exit 2). The launcher also wraps lm-eval's
``simple_evaluate`` so that, after the evaluation, the adapter's speed summary (:meth:`RemediLM.summary`:
generated tokens per forward, response-only tokens/s, mean NFE) is printed, stored in lm-eval's results
under ``"remedi"`` (so it lands in lm-eval's ``results_*.json``) and written with every resolved setting,
the seed, the GPU name and the torch/CUDA versions to ``remedi_run_<time>.json`` beside lm-eval's output
(``--output_path``). ``import remedi.harness`` alone registers the model for ``lm_eval.simple_evaluate``
in a script; :func:`simple_evaluate` here is the same call plus that summary.

Model args (``--model_args k=v,k=v``; explicit ones override a preset's, which override the model folder's
``defaults.json``, which override the library defaults):

* ``pretrained``: hub id or local hub-layout folder (default: the embedded model); ``ups_head``,
  ``lora_path``, ``mask_id``, ``dtype`` (auto|bf16|fp16|fp32), ``device``, ``seed`` (default 0);
* ``preset``: one of :data:`remedi.evaluation.presets.PRESETS` (published protocols);
* ``strategy``: a sampler strategy (llada_low_confidence (default), ups, tps_prob, margin, entropy, ...);
* every :class:`remedi.decoding.args.SamplingArgs` field by name: ``steps``, ``gen_length``,
  ``block_length``, ``temperature``, ``cfg_scale``, ``logits_eos_inf``, ``confidence_eos_eot_inf``,
  ``eos_gating``, ``cache``, ``cache_refresh``, ``threshold``, ``remask_threshold``, ``compile``; and the
  sampler's ``graphs`` / ``graph_capture``;
* ``batch_size`` (prompts per sampler call; model_args win over lm-eval's ``--batch_size``),
  ``mc_num`` (Monte-Carlo samples per loglikelihood request, default 128), ``mc_batch_size`` (rows per
  forward in loglikelihood, default 32);
* ``chat`` (default false): wrap each lm-eval context as one user message of the tokenizer's chat
  template. lm-eval's own ``--apply_chat_template [--fewshot_as_multiturn]`` is the usual way (the
  adapter implements ``apply_chat_template``); do not combine the two;
* ``seed_key``: a document field whose value names the request's random stream (e.g. ``id``: the same
  per-item streams as ``remedi/eval_gsm_math.py`` on the same items); default ``<task>/<doc_id>/<idx>``;
* ``run_log``: where to write the run log JSON (default: beside lm-eval's ``--output_path``).

Requests:

* ``generate_until`` decodes through :class:`remedi.session.Session` in batches of ``batch_size``; the
  text is cut at the first of the request's ``until`` strings. ``max_gen_toks`` smaller than
  ``gen_length`` caps the generation: gen_length becomes ``max_gen_toks`` rounded *up* to a multiple of
  ``block_length`` and ``steps`` shrinks in proportion (the same steps per block), then the tokens past
  ``max_gen_toks`` are dropped. A larger ``max_gen_toks`` never lengthens the protocol's gen_length. The
  sampler's temperature comes from model_args / the preset; requests' ``temperature``/``do_sample``
  are not used (a warning says so once when a request asks to sample).
* ``loglikelihood`` (multiple-choice tasks) is LLaDA's Monte-Carlo estimate of the masked-diffusion ELBO
  of the continuation given the context (:mod:`remedi.evaluation.likelihood`, which documents it and is
  tested without lm-eval): ``mc_num`` samples per request, in forwards of up to ``mc_batch_size`` rows;
  ``cfg_scale`` > 0 adds LLaDA's unsupervised classifier-free guidance (the unconditional copy masks the
  context; twice the rows). 128 samples on LLaDA-8B make multiple-choice tasks slow; lower ``mc_num`` for
  a rough pass. Sampler settings given to a run that scores likelihoods warn once (they do not apply).
  Deterministic per request.
* ``loglikelihood_rolling`` (perplexity tasks) is not implemented.

Randomness: request i draws from ``remedi.session.item_generator(seed, item id)``, the item id being
derived from the document (``seed_key``) or from (task, doc id, request idx) and the repeat index; lm-eval
splits documents over the processes with their global doc ids, so one process and N processes draw the
same streams (identical results where the sampler is batch-invariant: float32; bf16 kernels may round
differently with other batch shapes).
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m remedi.harness: run the importable module (it registers the model once)
    from remedi.harness import main

    raise SystemExit(main())

import dataclasses
import json
import logging
import os
import platform
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("remedi.harness needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' "
                      "(or pip install -e '.[eval]')") from e

from remedi.decoding.args import SamplingArgs
from remedi.evaluation.likelihood import mc_loglikelihood, mc_mask_counts  # noqa: F401 (mc_mask_counts: API)
from remedi.evaluation.presets import PRESETS, get_preset, preset_sampling
from remedi.model.loading import EMBEDDED_MODEL, encode_prompt, pick_dtype
from remedi.session import Session, item_generator, open_session, parse_sources

log = logging.getLogger("remedi.harness")


class _QuietShippedTasks(logging.Filter):
    """lm-eval warns on every task that reads its rows through ``custom_dataset`` (about --metadata): the
    shipped tasks do so only to name their files by absolute path, so that warning is dropped for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(("remedi_arith: Custom kwargs", "remedi_arith_mc: Custom"))


logging.getLogger("lm_eval.api.task").addFilter(_QuietShippedTasks())

SAMPLING_FIELDS = {f.name: f for f in dataclasses.fields(SamplingArgs)}
SAMPLER_EXTRAS = {"graphs": bool, "graph_capture": bool}  # SamplerConfig fields without a command-line flag
PRESET_NAMES = tuple(PRESETS)
IGNORED_ARGS = ("trust_remote_code", "max_batch_size", "parallelize", "backend")  # lm-eval passes these around
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _field_kind(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(SamplingArgs)
    args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
    return args[0]


def _coerce(name: str, value: Any, kind: type) -> Any:
    """A model_args value as ``kind`` (lm-eval parses numbers and booleans already; dicts may hold strings)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE | _FALSE:
                return s in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name}={value!r}: expected {kind.__name__}") from None


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of the ``until`` strings (empty strings ignored)."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def capped_lengths(gen_length: int, block_length: int, steps: int, max_gen_toks: Optional[int]) -> tuple[int, int]:
    """(gen_length, steps) for a request allowing ``max_gen_toks`` new tokens (see the module docstring)."""
    if max_gen_toks is None or int(max_gen_toks) >= gen_length:
        return gen_length, steps
    if int(max_gen_toks) < 1:
        raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
    blocks = gen_length // block_length
    new_blocks = -(-int(max_gen_toks) // block_length)
    return new_blocks * block_length, max(1, (steps * new_blocks) // blocks)


def environment() -> dict:
    """What moves the numbers besides the settings: GPU, torch/CUDA, library versions, host."""
    from remedi.model.checkpoint import versions

    import importlib.metadata as md

    env = {**versions(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
           if torch.backends.cudnn.is_available() else None, "host": platform.node(),
           "platform": platform.platform()}
    try:
        env["lm_eval"] = md.version("lm_eval")
    except md.PackageNotFoundError:  # pragma: no cover
        env["lm_eval"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
        env["gpu_count"] = torch.cuda.device_count()
    else:
        env["gpu"] = None
    return env


@register_model("remedi")
class RemediLM(LM):
    """LLaDA / RemeDi through :class:`remedi.session.Session` for lm-eval (see the module docstring)."""

    last: Optional["RemediLM"] = None  # the newest instance (read by the launcher after evaluate)

    def __init__(self, pretrained: Optional[str] = None, preset: Optional[str] = None,
                 strategy: Optional[str] = None, ups_head: Optional[str] = None, lora_path: Optional[str] = None,
                 chat: Any = False, seed: Any = 0, mask_id: Any = None, dtype: Optional[str] = "auto",
                 device: Optional[str] = None, batch_size: Any = 1, mc_num: Any = 128, mc_batch_size: Any = 32,
                 seed_key: Optional[str] = None, default_ups: Any = True, run_log: Optional[str] = None,
                 **sampler: Any) -> None:
        super().__init__()
        self._configure(pretrained, preset, strategy, ups_head, lora_path, chat, seed, mask_id, dtype, batch_size,
                        mc_num, mc_batch_size, seed_key, default_ups, run_log, **sampler)
        dev = self._setup_processes(device)
        self.session.load("cpu" if dev.type == "cpu" else str(dev), self.dtype_arg)
        self._device = self.session.device
        self._stats = {"generate_until": {"requests": 0, "gen_tokens": 0, "nfe": 0, "remasks": 0, "seconds": 0.0},
                       "loglikelihood": {"requests": 0, "rows": 0, "forwards": 0, "tokens": 0, "seconds": 0.0}}
        self._warned: set = set()
        self.batch_sizes = {"remedi": self.batch_size}  # lm-eval's summary line shows it: the size actually used
        self.run_info = self._run_info()
        log.info("remedi adapter: %s", json.dumps(self.run_info["settings"]))
        RemediLM.last = self

    @classmethod
    def check_args(cls, model_args: dict) -> "RemediLM":
        """Every check of ``model_args`` that needs no weights (keys, values, preset, model folder, lengths):
        the configured adapter, not loaded (what ``python -m remedi.harness`` runs before lm-eval starts)."""
        args = {k: v for k, v in model_args.items() if k != "device"}
        lm = cls.__new__(cls)
        lm._configure(**args)
        return lm

    def _configure(self, pretrained: Optional[str] = None, preset: Optional[str] = None,
                   strategy: Optional[str] = None, ups_head: Optional[str] = None, lora_path: Optional[str] = None,
                   chat: Any = False, seed: Any = 0, mask_id: Any = None, dtype: Optional[str] = "auto",
                   batch_size: Any = 1, mc_num: Any = 128, mc_batch_size: Any = 32, seed_key: Optional[str] = None,
                   default_ups: Any = True, run_log: Optional[str] = None, **sampler: Any) -> None:
        """Resolve and validate the model_args, open the session (config, tokenizer, UPS metadata): no weights."""
        for k in IGNORED_ARGS:
            if sampler.pop(k, None) is not None:
                log.info("model_args %s is not used by the remedi adapter", k)
        known = set(SAMPLING_FIELDS) | set(SAMPLER_EXTRAS)
        unknown = sorted(set(sampler) - known)
        if unknown:
            raise ValueError(f"remedi model_args: unknown {unknown}; sampler settings are "
                             f"{', '.join(sorted(known))}; others: pretrained, preset, strategy, ups_head, "
                             "lora_path, chat, seed, mask_id, dtype, device, batch_size, mc_num, mc_batch_size, "
                             "seed_key, default_ups, run_log")
        given = {k: _coerce(k, v, _field_kind(SAMPLING_FIELDS[k])) for k, v in sampler.items() if k in SAMPLING_FIELDS}
        extras = {k: _coerce(k, v, SAMPLER_EXTRAS[k]) for k, v in sampler.items() if k in SAMPLER_EXTRAS}
        if strategy is not None:
            given["strategy"] = str(strategy)
        self.preset = get_preset(preset).name if preset else None
        merged, self.origin = preset_sampling(self.preset, given)
        self.strategy = merged.pop("strategy", None) or "llada_low_confidence"
        self.origin.setdefault("strategy", "default")
        self.extras = {k: v for k, v in extras.items() if v is not None}
        self.batch_size = self._batch_size(batch_size)
        self.mc_num = _coerce("mc_num", mc_num, int)
        self.mc_batch_size = _coerce("mc_batch_size", mc_batch_size, int)
        if self.mc_num < 1 or self.mc_batch_size < 1:
            raise ValueError(f"mc_num and mc_batch_size must be >= 1, got {self.mc_num}, {self.mc_batch_size}")
        self.seed_key = seed_key or None
        self.run_log = run_log or None
        self.chat = bool(_coerce("chat", chat, bool))
        self.dtype_arg = dtype or "auto"
        pick_dtype(self.dtype_arg, torch.device("cpu"))  # an unknown dtype, before anything loads
        if pretrained and not Path(str(pretrained)).expanduser().exists() and (
                str(pretrained).startswith((".", "/", "~")) or str(pretrained).count("/") != 1):
            raise FileNotFoundError(f"model_args pretrained={pretrained}: no such folder (and not a hub id like "
                                    "GSAI-ML/LLaDA-8B-Instruct); leave it out for the embedded model")

        self.session: Session = open_session(
            str(pretrained or EMBEDDED_MODEL), SamplingArgs(**merged), ups_head=ups_head or None,
            lora_path=lora_path or None, chat=self.chat, seed=_coerce("seed", seed, int) or 0,
            mask_id=_coerce("mask_id", mask_id, int), default_ups=bool(_coerce("default_ups", default_ups, bool)))
        parse_sources(self.strategy, self.session.has_ups, [])  # unknown strategy, ups without a UPS
        self.session.sampler_config(self.strategy, **self.extras).validate(self.session.cfg.max_sequence_length, 1,
                                                                           self.session.has_ups)
        self.tokenizer = self.session.tokenizer

    # ------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _batch_size(value: Any) -> int:
        if isinstance(value, str) and value.strip().lower().startswith("auto"):
            log.warning("batch_size=%s: the remedi adapter has no automatic batch size; using 1", value)
            return 1
        bs = _coerce("batch_size", value, int) if value is not None else 1
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        return bs

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "RemediLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "RemediLM":
        """model_args win over lm-eval's own --batch_size/--device (which lm-eval always passes)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**dict(arg_dict), **extra)

    def _setup_processes(self, device: Optional[str]) -> torch.device:
        """One process, or one of the processes ``accelerate launch`` / torchrun started (rank, world size)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes device cuda:0 unless told otherwise
            log.warning("device %s: CUDA is not available here, running on the CPU", device)
            device = "cpu"
        if world <= 1:
            if device:
                return torch.device(device)
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from accelerate import PartialState

        cpu = (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
               or str(device or "").startswith("cpu"))
        self._state = PartialState(cpu=cpu)
        self._rank, self._world_size = self._state.process_index, self._state.num_processes
        if device and not str(device).startswith("cpu"):
            log.info("several processes: device %s is replaced by this process's %s", device, self._state.device)
        return self._state.device

    def _run_info(self) -> dict:
        s = self.session
        settings = {"model": s.model_name, "ups_head": s.ups_head, "lora_path": s.lora_path, "preset": self.preset,
                    "strategy": self.strategy, **dataclasses.asdict(s.sampling), **self.extras, "seed": s.seed,
                    "seed_key": self.seed_key, "chat": s.chat, "batch_size": self.batch_size, "mc_num": self.mc_num,
                    "mc_batch_size": self.mc_batch_size, "dtype": str(next(s.model.parameters()).dtype),
                    "device": str(self._device), "world_size": self.world_size}
        origin = {**{k: "library default" for k in SAMPLING_FIELDS}, **s.sampling.origin,
                  **{k: v for k, v in self.origin.items()}}
        preset = get_preset(self.preset) if self.preset else None
        return {"settings": settings, "origin": origin, "environment": environment(),
                "preset": dataclasses.asdict(preset) if preset else None}

    # ----------------------------------------------------------------------------- lm-eval plumbing
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.session.model_name)).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: Any = False) -> Optional[str]:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def get_model_info(self) -> dict:
        """Merged by lm-eval into results["config"]: every resolved setting and the environment."""
        return {"remedi": self.run_info}

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor.to(self._device))

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list]:
        if self.world_size <= 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ----------------------------------------------------------------------------------- encoding
    def _encode_text(self, text: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and text.startswith(bos):  # lm-eval already applied the chat template (it starts with BOS)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return encode_prompt(self.tokenizer, text, chat=self.chat)

    def _prefix_ids(self) -> list[int]:
        t = self.tokenizer
        tid = t.bos_token_id if t.bos_token_id is not None else self.session.ids.eos
        return [int(tid)]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; trailing spaces of the context move to the continuation (lm-eval's
        rule); the continuation is the tail of the joint encoding when that starts with the context's."""
        if not context:
            return self._prefix_ids(), list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        n = len(context) - len(context.rstrip())
        if n and not self.chat:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self._encode_text(context)
        if not self.chat:
            whole = self._encode_text(context + continuation)
            if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
                return ctx, whole[len(ctx):]
        return ctx, list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])

    def _fit(self, ids: list[int], room: int, what: str) -> list[int]:
        """Left-truncate a context so that context + ``room`` tokens fit the model (lm-eval's convention)."""
        limit = self.session.cfg.max_sequence_length - room
        if limit < 1:
            raise ValueError(f"{what}: {room} new tokens do not fit max_sequence_length "
                             f"{self.session.cfg.max_sequence_length}")
        if len(ids) > limit:
            self._warn_once(f"trunc-{what}", "%s: contexts longer than %d tokens are left-truncated", what, limit)
            return ids[-limit:]
        return ids

    def _item_ids(self, requests: Sequence) -> list[tuple[str, bool]]:
        """(item id, is lm-eval padding) per request: the repeat index k > 0 gets '#k' appended."""
        seen: dict[int, int] = {}
        out = []
        for n, req in enumerate(requests):
            doc = getattr(req, "doc", None)
            idx = getattr(req, "idx", 0) or 0
            if self.seed_key and isinstance(doc, dict) and self.seed_key in doc:
                base = str(doc[self.seed_key]) + (f"/{idx}" if idx else "")
            else:
                doc_id = getattr(req, "doc_id", None)
                base = f"{getattr(req, 'task_name', None)}/{n if doc_id is None else doc_id}/{idx}"
            k = seen.get(id(req), 0)
            seen[id(req)] = k + 1
            out.append((base if k == 0 else f"{base}#{k}", k >= (getattr(req, "repeats", None) or 1)))
        return out

    # --------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        s = self.session.sampling
        jobs = []
        for req, (iid, pad) in zip(requests, self._item_ids(requests)):
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 and req.args[1] else {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_toks = kwargs.pop("max_gen_toks", None)
            max_toks = None if max_toks is None else int(max_toks)
            if kwargs.get("do_sample") and float(kwargs.get("temperature") or 0) > 0:
                self._warn_once("sample", "a request asks to sample (%s); the sampler's temperature is %s "
                                "(set it in model_args)", kwargs, s.temperature)
            other = sorted(set(kwargs) - {"do_sample", "temperature", "top_p", "top_k"})
            if other:
                self._warn_once("kw", "generation kwargs %s are not used by the remedi adapter", other)
            gen, steps = capped_lengths(s.gen_length, s.block_length, s.steps, max_toks)
            ids = self._fit(self._encode_text(context), gen, "generate_until")
            jobs.append({"req": req, "id": iid, "pad": pad, "ids": ids, "until": until, "max": max_toks,
                         "gen": gen, "steps": steps})
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["gen"], jobs[i]["steps"], -len(jobs[i]["ids"])))
        out: list[Optional[str]] = [None] * len(jobs)
        st = self._stats["generate_until"]
        bar = tqdm(total=len(jobs), desc="remedi generate", disable=disable_tqdm or self.rank != 0)
        i = 0
        while i < len(order):
            key = (jobs[order[i]]["gen"], jobs[order[i]]["steps"])
            batch = [order[i]]
            while len(batch) < self.batch_size and i + len(batch) < len(order) and \
                    (jobs[order[i + len(batch)]]["gen"], jobs[order[i + len(batch)]]["steps"]) == key:
                batch.append(order[i + len(batch)])
            i += len(batch)
            gens = self.session.generate([jobs[j]["ids"] for j in batch], self.strategy,
                                         [jobs[j]["id"] for j in batch], key[1], gen_length=key[0], **self.extras)
            for j, g in zip(batch, gens):
                job = jobs[j]
                toks = g.tokens[:job["max"]] if job["max"] is not None else g.tokens
                text = cut_at_stops(self.tokenizer.decode(toks, skip_special_tokens=True), job["until"])
                out[j] = text
                if not job["pad"]:
                    st["requests"] += 1
                    st["gen_tokens"] += len(toks)
                    st["nfe"] += g.nfe
                    st["remasks"] += g.remasks
                    st["seconds"] += g.seconds
                self.cache_hook.add_partial("generate_until", job["req"].args, text)
            bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ loglikelihood
    @property
    def cfg_scale(self) -> float:
        """LLaDA's unsupervised classifier-free guidance on the ELBO (0: none); model_args ``cfg_scale``."""
        return float(self.session.sampling.cfg_scale or 0.0)

    def generation_only_args(self) -> list[str]:
        """The model_args / preset settings that only generate_until uses (not cfg_scale, which both use)."""
        named = [k for k, v in self.origin.items() if k != "cfg_scale" and v == "model_args"]
        return sorted(named + list(self.extras)) + ([f"preset={self.preset}"] if self.preset else [])

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        unused = self.generation_only_args()
        if unused:
            self._warn_once("ll-sampler", "model_args %s only apply to generate_until tasks: loglikelihood "
                            "(multiple-choice) requests are scored by the ELBO with mc_num=%d, mc_batch_size=%d, "
                            "cfg_scale=%s", ", ".join(unused), self.mc_num, self.mc_batch_size, self.cfg_scale)
        pairs = [self._encode_pair(*req.args[:2]) for req in requests]
        ids = self._item_ids(requests)
        results = self.mc_loglikelihood([(c, t) for c, t in pairs], [i for i, _ in ids], disable_tqdm)
        st = self._stats["loglikelihood"]
        st["requests"] += sum(not pad for _, pad in ids)
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return results

    def mc_loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]], item_ids: Sequence[str],
                         disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(log-likelihood estimate, is_greedy) per (context ids, continuation ids):
        :func:`remedi.evaluation.likelihood.mc_loglikelihood` with this model, its ``mc_num``,
        ``mc_batch_size`` and ``cfg_scale``, and one random stream per request from (seed, item id)."""
        from tqdm.auto import tqdm

        prepared = []
        for (ctx, cont), iid in zip(pairs, item_ids):
            if not cont:
                raise ValueError(f"loglikelihood request {iid}: empty continuation")
            prepared.append((self._fit(list(ctx), len(cont), "loglikelihood"), list(cont)))
        gens = [item_generator(self.session.seed, f"ll:{iid}") for iid in item_ids]
        total = sum(self.mc_num + (len(c) > self.mc_num) for _, c in prepared)
        bar = tqdm(total=total, desc="remedi loglikelihood", disable=disable_tqdm or self.rank != 0)
        out = mc_loglikelihood(self.session.model, self.session.ids.mask, prepared, gens, mc_num=self.mc_num,
                               mc_batch_size=self.mc_batch_size, cfg_scale=self.cfg_scale, device=self._device,
                               stats=self._stats["loglikelihood"], progress=bar.update)
        bar.close()
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("remedi: loglikelihood_rolling (perplexity tasks such as wikitext) is not "
                                  "implemented for masked diffusion models; use generate_until or "
                                  "multiple-choice (loglikelihood) tasks")

    # ---------------------------------------------------------------------------------- summary
    def summary(self) -> dict:
        """Speed beside accuracy, summed over every process (collective when several run: call on all)."""
        stats = [self._stats]
        if self.world_size > 1:
            stats = [None] * self.world_size
            torch.distributed.all_gather_object(stats, self._stats)
        g = {k: sum(s["generate_until"][k] for s in stats) for k in self._stats["generate_until"]}
        ll = {k: sum(s["loglikelihood"][k] for s in stats) for k in self._stats["loglikelihood"]}
        g.update({"tokens_per_forward": g["gen_tokens"] / g["nfe"] if g["nfe"] else None,
                  "tokens_per_s": g["gen_tokens"] / g["seconds"] if g["seconds"] > 0 else None,
                  "mean_nfe": g["nfe"] / g["requests"] if g["requests"] else None,
                  "mean_gen_tokens": g["gen_tokens"] / g["requests"] if g["requests"] else None})
        ll["rows_per_request"] = ll["rows"] / ll["requests"] if ll["requests"] else None
        return {"generate_until": g, "loglikelihood": ll, "world_size": self.world_size,
                "note": "tokens_per_forward = generated (response) tokens / NFE; tokens_per_s = response tokens / "
                        "sampler seconds, per process (seconds summed over processes)", **self.run_info}


# ------------------------------------------------------------------------------------- launcher
def describe(summary: dict) -> str:
    g = summary["generate_until"]
    parts = [f"preset {summary['settings']['preset'] or '-'}", f"strategy {summary['settings']['strategy']}"]
    if g["requests"]:
        parts += [f"{g['requests']} generations", f"tokens/forward {g['tokens_per_forward']:.2f}",
                  f"response tokens/s {g['tokens_per_s']:.1f}" if g["tokens_per_s"] else "response tokens/s -",
                  f"mean NFE {g['mean_nfe']:.1f}"]
    ll = summary["loglikelihood"]
    if ll["requests"]:
        parts += [f"{ll['requests']} loglikelihood requests ({ll['rows']} rows, {ll['seconds']:.1f}s)"]
    env = summary["environment"]
    parts += [f"gpu {env.get('gpu') or 'none'}", f"torch {env.get('torch')}", f"cuda {env.get('cuda')}"]
    return "remedi: " + ", ".join(parts)


def run_log_path(lm: RemediLM, tracker: Any) -> Optional[Path]:
    """``run_log`` if given, else beside lm-eval's results file (``--output_path``), else None."""
    if lm.run_log:
        return Path(lm.run_log)
    out = getattr(tracker, "output_path", None)
    if not out:
        return None
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    path = Path(out)
    if path.suffix == ".json":
        return path.with_name(f"{path.stem}_remedi_run_{stamp}.json")
    gct = getattr(tracker, "general_config_tracker", None)
    sub = getattr(gct, "model_name_sanitized", None) or "remedi"
    return path / str(sub) / f"remedi_run_{stamp}.json"


def simple_evaluate(*args, **kwargs):
    """``lm_eval.simple_evaluate`` plus the adapter's summary: results["remedi"], a printed line, a run log."""
    from lm_eval import evaluator

    RemediLM.last = None
    model = kwargs.get("model", args[0] if args else None)
    if kwargs.get("task_manager") is None and len(args) <= 1:  # index the shipped tasks (remedi_arith, ...)
        from lm_eval.tasks import TaskManager

        from remedi.lm_eval_tasks import TASK_DIR

        kwargs["task_manager"] = TaskManager(include_path=str(TASK_DIR))
    results = evaluator.simple_evaluate(*args, **kwargs)
    lm = model if isinstance(model, RemediLM) else RemediLM.last
    if lm is None:
        return results
    summary = lm.summary()  # every process calls it (all_gather_object)
    if results is not None:
        results["remedi"] = summary
        print(describe(summary))
        path = run_log_path(lm, kwargs.get("evaluation_tracker"))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            task_results = {k: v for k, v in (results.get("results") or {}).items()}
            path.write_text(json.dumps({**summary, "results": task_results, "lm_eval_config": results.get("config")},
                                       indent=2, default=str, ensure_ascii=False))
            log.info("remedi run log: %s", path)
        else:
            log.info("remedi run log (no --output_path): %s", json.dumps(summary, default=str))
    return results


HELP = f"""
remedi: python -m remedi.harness is lm-eval's command line (every lm-eval flag below works) with the model
`remedi` registered and used by default (--model remedi), the embedded tasks remedi_arith and remedi_arith_mc
registered (no --include_path), and a speed summary + run log added.

  python -m remedi.harness --model remedi --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,preset=fast_dllm_gsm8k \\
      --tasks gsm8k --num_fewshot 5 --output_path runs/lm_eval
  python -m remedi.harness --model_args strategy=tps_prob,batch_size=16 --tasks remedi_arith --limit 50

--model_args for remedi (k=v,k=v; unknown keys and bad values stop the run with one error line):
  pretrained      hub id or local folder (default: the embedded model); ups_head, lora_path, mask_id, seed
  preset          published protocol: {", ".join(PRESET_NAMES)}
  strategy        sampler strategy (default llada_low_confidence; ups, tps_prob, margin, entropy, random, ...)
  sampler fields  {", ".join(sorted(set(SAMPLING_FIELDS) | set(SAMPLER_EXTRAS)))}
  batch_size      prompts per sampler call (wins over --batch_size); mc_num, mc_batch_size: loglikelihood's
                  Monte-Carlo ELBO samples and rows per forward; cfg_scale also guides loglikelihood
  chat, seed_key, dtype (auto|bf16|fp16|fp32), device, default_ups, run_log
"""


def _help_requested(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _apply_launcher_defaults(args: Any) -> None:
    """Defaults of the remedi launcher over lm-eval's (only for what the user did not set): model remedi, the
    device this machine has, lm-eval's --batch_size shown as model_args' batch_size, the shipped tasks."""
    from remedi.lm_eval_tasks import TASK_DIR

    if getattr(args, "model", None) is None and not getattr(args, "config", None):
        args.model = "remedi"
    if args.model != "remedi":
        return
    margs = getattr(args, "model_args", None) or {}
    if getattr(args, "device", None) is None:  # lm-eval's own default is cuda:0, also on a CPU-only machine
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if not hasattr(args, "batch_size") and isinstance(margs, dict) and margs.get("batch_size") is not None:
        args.batch_size = str(margs["batch_size"])  # lm-eval's summary line then shows the size in use
    inc = getattr(args, "include_path", None)
    if hasattr(args, "include_path"):
        args.include_path = [str(TASK_DIR)] + ([inc] if inc else [])


def check_model_args(model_args: Any) -> None:
    """The adapter's checks that need no weights, for the launcher (raises the user error)."""
    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string

        model_args = simple_parse_args_string(model_args)
    RemediLM.check_args(dict(model_args or {}))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """lm-eval's command line with the ``remedi`` model registered (and default), the shipped tasks indexed,
    the model_args checked before anything loads (``error: ...``, exit 2) and the summary added."""
    import sys

    import lm_eval
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from remedi.arguments import USER_ERRORS

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["remedi.harness", *argv]
    if _help_requested(argv):
        print(HELP)
    setup_logging()
    parser = HarnessCLI()
    for sub in getattr(parser, "_subparsers").choices.values():  # run --help: say which model is the default
        for action in sub._actions:
            if "--model" in action.option_strings:
                action.help = "Model name (default here: remedi; see the remedi section of --help)"
    args = parser.parse_args()
    if hasattr(args, "model_args"):  # the run command (not ls / validate)
        _apply_launcher_defaults(args)
        if getattr(args, "model", None) == "remedi":
            try:
                check_model_args(getattr(args, "model_args", None))
            except USER_ERRORS as e:
                msg = str(e).removeprefix("remedi model_args: ").removeprefix("model_args ")
                print(f"error: --model_args: {msg}", file=sys.stderr)
                return 2
    lm_eval.simple_evaluate = simple_evaluate  # the CLI imports it from the package at call time
    parser.execute(args)
    return 0
