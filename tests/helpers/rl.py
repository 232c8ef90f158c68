"""The RL rollout tests' special ids, prompts, generators and config (shared with the RL loss tests)."""
import pytest
import torch

from remedi.model.loading import SpecialIds
from remedi.rl.policy import plackett_luce_logprob, token_logprob
from remedi.rl.rollout import GrowingKVCache, RolloutConfig, policy_logits, rollout


IDS = SpecialIds(mask=96, eos=95, pad=95)


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13], [14]]


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def cfg(**kw):
    base = dict(gen_length=16, block_length=8, steps=8, temperature=1.0, ups_temperature=1.0)
    return RolloutConfig(**{**base, **kw})
