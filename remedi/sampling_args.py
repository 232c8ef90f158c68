"""The sampling flags shared by infer_compare.py and eval_gsm_math.py (one source for their defaults).

Defaults are :class:`remedi.sampler.SamplerConfig`'s. The strategy is not a field: each script picks
its own list of sources and calls :meth:`SamplingArgs.to_sampler_config` once per source.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .cli import arg
from .sampler import CACHE_MODES, STRATEGIES, SamplerConfig

_D = SamplerConfig  # class attributes hold the dataclass defaults


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
    cache: str = arg(_D.cache, f"KV cache mode: {' | '.join(CACHE_MODES)}")
    threshold: Optional[float] = arg(_D.threshold, "parallel threshold decoding (issue 7)")

    def __post_init__(self) -> None:
        self.to_sampler_config(STRATEGIES[0]).validate()  # lengths, steps, temperature: fail at parse time

    def to_sampler_config(self, strategy: str, **overrides) -> SamplerConfig:
        return SamplerConfig(strategy=strategy, **{**dataclasses.asdict(self), **overrides})
