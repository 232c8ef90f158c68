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
