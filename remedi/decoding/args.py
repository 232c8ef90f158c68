"""The sampling flags shared by infer_compare.py and eval_gsm_math.py (one source for their defaults).

Defaults are :class:`remedi.decoding.sampler.SamplerConfig`'s. The strategy is not a field: each script picks
its own list of sources and calls :meth:`SamplingArgs.to_sampler_config` once per source.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from remedi.arguments import arg
from remedi.decoding.sampler import CACHE_MODES, STRATEGIES, SamplerConfig

_D = SamplerConfig  # class attributes hold the dataclass defaults
log = logging.getLogger(__name__)

MODEL_DEFAULTS_FILE = "defaults.json"
"""Sampling defaults a model folder may ship (the embedded model does); flags given on the command line win."""


@dataclass
class SamplingArgs:
    steps: int = arg(_D.steps, "denoising steps over the whole generation (divisible by the number of blocks)")
    gen_length: int = arg(_D.gen_length, "tokens to generate")
    block_length: int = arg(_D.block_length, "semi-autoregressive block length (divides --gen_length)")
    temperature: float = arg(_D.temperature, "Gumbel-max temperature for the token candidates; 0 = argmax")
    cfg_scale: float = arg(_D.cfg_scale, "classifier-free guidance scale (0 = off; > 0 doubles the forwards)")
    logits_eos_inf: bool = arg(_D.logits_eos_inf, "never predict EOS (its logit is set to -inf)")
    confidence_eos_eot_inf: bool = arg(_D.confidence_eos_eot_inf,
                                       "EOS/EOT candidates get the lowest confidence (unmasked last)")
    eos_gating: bool = arg(_D.eos_gating, "stop after a block that holds EOS (the rest is not computed)")
    cache: str = arg(_D.cache, "KV cache: none (a full forward every step, exact) | prefix (the prompt's and "
                     "finished blocks' keys/values are computed at a block's first step and reused; each step "
                     "runs the block and the masked suffix) | dual (the suffix's are reused too; each step runs "
                     "only the block). prefix/dual are approximate (Fast-dLLM)")
    cache_refresh: int = arg(_D.cache_refresh, "with --cache prefix|dual: 0 = full forward only at a block's first "
                             "step; n = also every n-th step (1 = every step: equals --cache none exactly)")
    threshold: Optional[float] = arg(_D.threshold, "parallel threshold decoding: each step commits every masked "
                                     "position of the block whose confidence (the source's score; exp(-entropy) "
                                     "for entropy; a uniform draw for the random sources) is >= this, at least "
                                     "one; blocks end when unmasked, --steps is not used, NFE reports the steps")
    remask_threshold: Optional[float] = arg(_D.remask_threshold, "with --threshold, remask sources only: also "
                                            "remask tokens of the block scored below this (at most one fewer than "
                                            "the step commits, so every step progresses); unset = no remasking")
    compile: bool = arg(_D.compile, "torch.compile the transformer blocks before sampling (GPU speed-up; the "
                        "first call compiles)")

    def __post_init__(self) -> None:
        self.to_sampler_config(STRATEGIES[0]).validate()  # lengths, steps, temperature: fail at parse time

    def to_sampler_config(self, strategy: str, **overrides) -> SamplerConfig:
        return SamplerConfig(strategy=strategy, **{**dataclasses.asdict(self), **overrides})


# ------------------------------------------------------------------------------- model-shipped defaults
def model_sampling_defaults(model_dir: str | os.PathLike, field_names: Iterable[str]) -> dict:
    """Sampling defaults shipped with a model (``defaults.json`` in its folder), restricted to known keys."""
    path = Path(model_dir) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    names = set(field_names)
    unknown = sorted(set(raw) - names)
    if unknown:
        log.warning("%s: ignoring keys that are not sampling flags: %s", path, unknown)
    return {k: v for k, v in raw.items() if k in names}


def apply_model_defaults(sampling, model_dir, explicit: Iterable[str]) -> dict:
    """Overwrite the fields of ``sampling`` not given on the command line with the model's defaults."""
    names = [f.name for f in dataclasses.fields(sampling)]
    given = set(explicit)
    applied = {k: v for k, v in model_sampling_defaults(model_dir, names).items() if k not in given}
    for k, v in applied.items():
        setattr(sampling, k, v)
    if applied:
        log.info("sampling defaults from %s: %s", Path(model_dir) / MODEL_DEFAULTS_FILE, applied)
    return applied


def explicit_flags(argv: Sequence[str], names: Iterable[str]) -> set[str]:
    """Which of ``names`` appear on the command line (``--x``, ``--x=v``, ``--no_x``, or an argparse
    abbreviation such as ``--gen_len``)."""
    given = set()
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            flag = a[2:].split("=", 1)[0]
            for f in {flag, flag[3:] if flag.startswith("no_") else flag}:
                given |= {n for n in names if n == f or (f and n.startswith(f))}
    return given
