"""The RL rollout tests' special ids, prompts, generators and config (shared with the RL loss tests)."""
import torch

from remedi.model.loading import SpecialIds
from remedi.rl.rollout import RolloutConfig


IDS = SpecialIds(mask=96, eos=95, pad=95)


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13], [14]]


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def cfg(**kw):
    base = dict(gen_length=16, block_length=8, steps=8, temperature=1.0, ups_temperature=1.0)
    return RolloutConfig(**{**base, **kw})


def residual_for(m, seed: int = 0, g: str = "linear"):
    """A non-zero residual UPS (every feature, a hidden projection) for the tiny model, attached to it."""
    from remedi.model.features import FEATURES
    from remedi.model.residual import ResidualUPS, attach_policy

    V = m.config.vocab_size
    types = torch.randint(0, 5, (V,), generator=torch.Generator().manual_seed(seed))
    policy = ResidualUPS(m.config.d_model, types, features=FEATURES, hidden_rank=2, g=g, seed=seed)
    policy.set_linear_weights(torch.randn(policy.weight.numel() + 1, generator=torch.Generator().manual_seed(seed)))
    if g == "attention":
        with torch.no_grad():
            policy.out.copy_(torch.randn(policy.attn_dim, generator=torch.Generator().manual_seed(seed + 1)))
    attach_policy(m, policy)
    return policy
