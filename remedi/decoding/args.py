"""The sampling flags shared by infer_compare.py and eval_gsm_math.py (one source for their defaults).

Library defaults are :class:`remedi.decoding.sampler.SamplerConfig`'s. Every field starts as ``None`` (not
given on the command line); :meth:`SamplingArgs.resolve` fills the rest from the model folder's
``defaults.json``, then from the library, and only then validates, so a value that is valid for the model
(``--steps 45`` with the embedded model's gen 96 / block 32) is never refused against the library's
gen 64. The strategy is not a field: each script picks its sources and calls
:meth:`SamplingArgs.to_sampler_config` once per source.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from remedi.arguments import fill_defaults, model_arg
from remedi.decoding.sampler import STRATEGIES, SamplerConfig

_D = SamplerConfig  # class attributes hold the dataclass defaults
log = logging.getLogger(__name__)

MODEL_DEFAULTS_FILE = "defaults.json"
"""Sampling defaults a model folder may ship (the embedded model does); flags given on the command line win."""


@dataclass
class SamplingArgs:
    steps: Optional[int] = model_arg(_D.steps, "denoising steps over the whole generation (divisible by the "
                                     "number of blocks)")
    gen_length: Optional[int] = model_arg(_D.gen_length, "tokens to generate")
    block_length: Optional[int] = model_arg(_D.block_length, "semi-autoregressive block length (divides "
                                            "--gen_length)")
    temperature: Optional[float] = model_arg(_D.temperature, "Gumbel-max temperature for the token candidates; "
                                             "0 = argmax")
    cfg_scale: Optional[float] = model_arg(_D.cfg_scale, "classifier-free guidance scale (0 = off; > 0 doubles "
                                           "the forwards)")
    logits_eos_inf: Optional[bool] = model_arg(_D.logits_eos_inf, "never predict EOS (its logit is set to -inf)",
                                               nargs="?", const=True)
    confidence_eos_eot_inf: Optional[bool] = model_arg(_D.confidence_eos_eot_inf, "EOS/EOT candidates get the "
                                                       "lowest confidence (unmasked last)", nargs="?", const=True)
    eos_gating: Optional[bool] = model_arg(_D.eos_gating, "stop after a block that holds EOS (the rest is not "
                                           "computed)", nargs="?", const=True)
    cache: Optional[str] = model_arg(_D.cache, "KV cache: none (a full forward every step, exact) | prefix (the "
                                     "prompt's and finished blocks' keys/values are computed at a block's first "
                                     "step and reused; each step runs the block and the masked suffix) | dual "
                                     "(the suffix's are reused too; each step runs only the block). prefix/dual "
                                     "are approximate (Fast-dLLM)")
    cache_refresh: Optional[int] = model_arg(_D.cache_refresh, "with --cache prefix|dual: 0 = full forward only at "
                                             "a block's first step; n = also every n-th step (1 = every step: "
                                             "equals --cache none exactly)")
    threshold: Optional[float] = model_arg(_D.threshold, "parallel threshold decoding: each step commits every "
                                           "masked position of the block whose confidence (the source's score; "
                                           "exp(-entropy) for entropy; a uniform draw for the random sources) is "
                                           ">= this, at least one; blocks end when unmasked, --steps is not used, "
                                           "NFE reports the steps")
    remask_threshold: Optional[float] = model_arg(_D.remask_threshold, "with --threshold, remask sources only: "
                                                  "also remask tokens of the block scored below this (at most one "
                                                  "fewer than the step commits, so every step progresses); unset = "
                                                  "no remasking")
    compile: Optional[bool] = model_arg(_D.compile, "torch.compile the transformer blocks before sampling (GPU "
                                        "speed-up; the first call compiles)", nargs="?", const=True)
    graphs: Optional[bool] = model_arg(_D.graphs, "static-buffer decoding step: fixed-size KV cache, schedule, EOS "
                                       "gate and ranking on the device, no host sync inside a block (threshold "
                                       "decoding checks once per step, --eos_gating once per block); captured as "
                                       "CUDA graphs on a GPU", nargs="?", const=True)
    graph_capture: Optional[bool] = model_arg(_D.graph_capture, "with --graphs on a GPU: capture and replay CUDA "
                                              "graphs (false: the same static step uncaptured, for debugging)",
                                              nargs="?", const=True)

    def __post_init__(self) -> None:
        self.origin: dict[str, str] = {}

    @staticmethod
    def library_defaults() -> dict:
        return {f.name: getattr(SamplerConfig, f.name) for f in dataclasses.fields(SamplingArgs)}

    @property
    def resolved(self) -> bool:
        return all(getattr(self, k) is not None or v is None for k, v in self.library_defaults().items())

    def resolve(self, model_dir: str | os.PathLike | None) -> "SamplingArgs":
        """Fill unset fields from ``model_dir/defaults.json`` then the library, and validate (in place)."""
        path = Path(model_dir) / MODEL_DEFAULTS_FILE if model_dir is not None else None
        self.origin = fill_defaults(self, model_sampling_defaults(model_dir) if path else {}, path or "",
                                    self.library_defaults())
        self.to_sampler_config(STRATEGIES[0]).validate()  # lengths, steps, temperature
        return self

    def to_sampler_config(self, strategy: str, **overrides) -> SamplerConfig:
        if not self.resolved:
            raise RuntimeError("SamplingArgs.resolve(model_dir) must run before the sampler config is built")
        return SamplerConfig(strategy=strategy, **{**dataclasses.asdict(self), **overrides})


# ------------------------------------------------------------------------------- model-shipped defaults
def model_sampling_defaults(model_dir: str | os.PathLike) -> dict:
    """Sampling defaults shipped with a model (``defaults.json`` in its folder), restricted to known keys."""
    path = Path(model_dir) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object of sampling flags, e.g. {{\"steps\": 48}}")
    names = {f.name for f in dataclasses.fields(SamplingArgs)}
    unknown = sorted(set(raw) - names)
    if unknown:
        log.warning("%s: ignoring keys that are not sampling flags: %s", path, unknown)
    return {k: v for k, v in raw.items() if k in names}
