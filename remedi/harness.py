"""lm-evaluation-harness adapter: the project's sampler as lm-eval model ``remedi`` (lm-eval 0.4.13).

    python -m remedi.harness --model remedi --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,preset=fast_dllm_gsm8k \
        --tasks gsm8k --num_fewshot 5 --output_path runs/lm_eval
    accelerate launch -m remedi.harness --model remedi --model_args pretrained=...,preset=... --tasks gsm8k ...

``python -m remedi.harness ARGS`` registers the model and hands ARGS to lm-eval's own command line
(``lm_eval.__main__.cli_evaluate``: every lm-eval flag works). The launcher also wraps lm-eval's
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
  of the continuation (L tokens) given the context: ``mc_num`` samples, sample j masks l_j of the L
  continuation positions (uniformly chosen positions; the l_j are spread evenly over {1..L} from one
  uniform random offset, so each l_j is uniform on {1..L} and together they stratify it: LLaDA's
  lower-variance variant), loss_j = (L / l_j) * sum of -log p(token) over the masked positions; the
  returned log-likelihood is -mean_j loss_j (a lower bound on log p(continuation | context); exact when
  L = 1). Cost: ``mc_num`` forward rows of length len(context) + L per request (in forwards of up to
  ``mc_batch_size`` rows of equal shape), i.e. about mc_num / mc_batch_size forwards per request: 128
  samples on LLaDA-8B make multiple-choice tasks slow; lower ``mc_num`` for a rough pass. ``is_greedy`` is
  true when, with the whole continuation masked, the argmax at every position is the continuation (a
  one-step check, not LLaDA's iterative greedy decode; read from a sample with l = L, which the
  stratification provides whenever mc_num >= L, else from one extra row). Deterministic per request.
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
from remedi.evaluation.presets import get_preset, preset_sampling
from remedi.model.loading import EMBEDDED_MODEL, encode_prompt
from remedi.session import Session, item_generator, open_session, parse_sources

log = logging.getLogger("remedi.harness")

SAMPLING_FIELDS = {f.name: f for f in dataclasses.fields(SamplingArgs)}
SAMPLER_EXTRAS = {"graphs": bool, "graph_capture": bool}  # SamplerConfig fields without a command-line flag
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


def mc_mask_counts(L: int, n: int, gen: torch.Generator) -> list[int]:
    """n mask counts in {1..L}: each uniform, together spread evenly over {1..L} from one random offset."""
    k = int(torch.randint(0, L, (1,), generator=gen))
    return [(k + (j * L) // n) % L + 1 for j in range(n)]


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

        self.session: Session = open_session(
            str(pretrained or EMBEDDED_MODEL), SamplingArgs(**merged), ups_head=ups_head or None,
            lora_path=lora_path or None, chat=self.chat, seed=_coerce("seed", seed, int) or 0,
            mask_id=_coerce("mask_id", mask_id, int), default_ups=bool(_coerce("default_ups", default_ups, bool)))
        parse_sources(self.strategy, self.session.has_ups, [])  # unknown strategy, ups without a UPS
        self.session.sampler_config(self.strategy, **self.extras).validate(self.session.cfg.max_sequence_length, 1,
                                                                           self.session.has_ups)
        self.tokenizer = self.session.tokenizer

        dev = self._setup_processes(device)
        self.session.load("cpu" if dev.type == "cpu" else str(dev), self.dtype_arg)
        self._device = self.session.device
        self._stats = {"generate_until": {"requests": 0, "gen_tokens": 0, "nfe": 0, "remasks": 0, "seconds": 0.0},
                       "loglikelihood": {"requests": 0, "rows": 0, "forwards": 0, "tokens": 0, "seconds": 0.0}}
        self._warned: set = set()
        self.run_info = self._run_info()
        log.info("remedi adapter: %s", json.dumps(self.run_info["settings"]))
        RemediLM.last = self

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
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args[:2]) for req in requests]
        ids = self._item_ids(requests)
        results = self.mc_loglikelihood([(c, t) for c, t in pairs], [i for i, _ in ids], disable_tqdm)
        st = self._stats["loglikelihood"]
        st["requests"] += sum(not pad for _, pad in ids)
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return results

    @torch.no_grad()
    def mc_loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]], item_ids: Sequence[str],
                         disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(log-likelihood estimate, is_greedy) per (context ids, continuation ids); see the module docstring."""
        from tqdm.auto import tqdm

        model, mask_id = self.session.model, self.session.ids.mask
        n = self.mc_num
        buckets: dict[tuple[int, int], list] = {}  # (len(ctx), L) -> rows (request, positions, l, greedy check)
        prepared = []
        for r, ((ctx, cont), iid) in enumerate(zip(pairs, item_ids)):
            if not cont:
                raise ValueError(f"loglikelihood request {iid}: empty continuation")
            ctx = self._fit(list(ctx), len(cont), "loglikelihood")
            prepared.append((ctx, list(cont)))
            L, g = len(cont), item_generator(self.session.seed, f"ll:{iid}")
            rows = buckets.setdefault((len(ctx), L), [])
            counts = mc_mask_counts(L, n, g)
            for j, l in enumerate(counts):  # the first all-masked sample doubles as the greedy check
                rows.append((r, torch.randperm(L, generator=g)[:l], l, l == L and L not in counts[:j]))
            if L not in counts:
                rows.append((r, torch.arange(L), None, True))  # an extra all-masked row for the greedy check
        loss = [0.0] * len(prepared)
        greedy = [False] * len(prepared)
        st = self._stats["loglikelihood"]
        t0 = time.perf_counter()
        total = sum(len(v) for v in buckets.values())
        bar = tqdm(total=total, desc="remedi loglikelihood", disable=disable_tqdm or self.rank != 0)
        dev = self._device
        for (lc, L), rows in buckets.items():
            for a in range(0, len(rows), self.mc_batch_size):
                chunk = rows[a:a + self.mc_batch_size]
                x = torch.tensor([prepared[r][0] + prepared[r][1] for r, *_ in chunk], device=dev)
                target = x[:, lc:].clone()
                masked = torch.zeros(len(chunk), L, dtype=torch.bool)
                for k, (_, pos, *_) in enumerate(chunk):
                    masked[k, pos] = True
                masked = masked.to(dev)
                x[:, lc:][masked] = mask_id
                logits = model(x, out_slice=slice(lc, lc + L)).logits  # (B, L, V)
                sel = logits[masked].float()  # (M, V): only masked positions
                nll = torch.logsumexp(sel, -1) - sel.gather(-1, target[masked][:, None]).squeeze(-1)
                per_row = torch.zeros(len(chunk), L, device=dev, dtype=torch.float64)
                per_row[masked] = nll.double()
                per_row = per_row.sum(-1).cpu().tolist()
                arg_ok = (logits.argmax(-1) == target).all(-1).cpu().tolist()
                for k, (r, _, l, check) in enumerate(chunk):
                    if check:
                        greedy[r] = bool(arg_ok[k])
                    if l is not None:
                        loss[r] += (L / l) * per_row[k] / n
                st["forwards"] += 1
                st["rows"] += len(chunk)
                st["tokens"] += int(x.numel())
                bar.update(len(chunk))
        bar.close()
        st["seconds"] += time.perf_counter() - t0
        return [(-loss[r], greedy[r]) for r in range(len(prepared))]

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """lm-eval's command line with the ``remedi`` model registered and the summary added."""
    import sys

    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["remedi.harness", *argv]
    lm_eval.simple_evaluate = simple_evaluate  # the CLI imports it from the package at call time
    cli_evaluate()
    return 0
