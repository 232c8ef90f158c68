"""Remask-RL advantages (baselines, per-block credit) and the statistics of the decisions they credit.

N rollouts come in G consecutive groups of ``group_size`` rollouts of one item (rows g*n .. (g+1)*n - 1,
n = group_size). A reward is (N,) per rollout, or (N, nb) per block for per-block credit. Baselines:

* ``group`` (:func:`group_advantages`, GRPO, the authors' code): A_i = (R_i - mean_g) / (std_g + eps).
* ``loo`` (:func:`loo_advantages`, RLOO): A_i = R_i - mean of the *other* n - 1 rollouts of the group
  = n / (n - 1) * (R_i - mean_g). Unbiased (the baseline does not depend on rollout i), not rescaled, so a
  group whose rewards differ by a small shaped amount gets a small advantage instead of a +-1 one.
* ``greedy`` (:func:`greedy_advantages`): A_i = R_i - R_greedy(item), the reward of the item's greedy
  (deterministic) rollout, which is the policy that is evaluated. A group whose rollouts all equal each
  other still learns when they differ from greedy.

Per-block credit (:func:`block_advantages`): from per-block rewards r (N, nb), either the reward-to-go
G_j = sum_{k >= j} r_k (block j's decisions shape blocks j..nb-1, which are decoded after it), or the
block's own reward (``credit='own'``, e.g. the share of true equations whose result lies in the block),
then the chosen baseline per block column. The result (N, nb) is what ``grpo_loss`` broadcasts over a
step's (N, nb, Lb) token terms and (N, nb) position terms.

Statistics (:func:`decision_stats`, :func:`zero_advantage_share`): remasks per block, the share of remasked
positions that get the same token back when they are committed again, and the share of groups whose
advantages are all zero (they carry no gradient).
"""
from __future__ import annotations

from typing import Dict, Literal, Optional

import torch

__all__ = [
    "BASELINES", "CREDITS", "group_advantages", "loo_advantages", "greedy_advantages", "reward_to_go",
    "block_advantages", "advantages", "zero_advantage_share", "kept_from_orders", "decision_stats",
]

BASELINES = ("group", "loo", "greedy")
CREDITS = ("sequence", "block")


def _float(t: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; every other dtype (bool, ints, bf16, fp32) computes in float32."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _groups(rewards: torch.Tensor, group_size: int, name: str = "rewards") -> torch.Tensor:
    """(N, ...) -> (G, group_size, ...) after checking the shapes."""
    if rewards.dim() not in (1, 2):
        raise ValueError(f"{name} must be (N,) or (N, num_blocks), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    N = rewards.shape[0]
    if N % group_size:
        raise ValueError(f"the number of rewards ({N}) must be a multiple of group_size ({group_size})")
    return _float(rewards).reshape(N // group_size, group_size, *rewards.shape[1:])


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     std: Literal["group", "batch", "none"] = "group") -> torch.Tensor:
    """GRPO advantages A = (R - mean_group) / (std + eps) for consecutive groups of ``group_size`` rollouts.

    The std is the *sample* (unbiased, n - 1) standard deviation, torch's default ``.std()`` as in the authors'
    code. ``std='group'``: per group (a group of one has std 0, so A = 0); ``'batch'``: one std over all N
    rewards; ``'none'``: mean-centring only (no division, as in Dr. GRPO). Equal rewards give A = 0, not NaN.

    Args:
        rewards: (N,) rewards of N = G * group_size rollouts, group g = rows g*group_size .. (g+1)*group_size-1.

    Returns:
        (N,) float32 advantages (float64 kept).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got shape {tuple(rewards.shape)}")
    if std not in ("group", "batch", "none"):
        raise ValueError(f"std must be 'group', 'batch' or 'none', got {std!r}")
    g = _groups(rewards, group_size)  # (G, group_size)
    N = rewards.shape[0]
    r = g.reshape(N)  # (N,)
    centred = g - g.mean(dim=1, keepdim=True)  # (G, group_size)
    if std == "none":
        return centred.reshape(N)
    if std == "group":
        s = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])  # (G, 1)
    else:
        s = r.std() if N > 1 else r.new_zeros(())
    return (centred / (s + eps)).reshape(N)


def loo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: A_i = R_i - (sum_group R - R_i) / (group_size - 1), per column for (N, nb) rewards.

    Returns a float tensor shaped like ``rewards`` (float64 kept). A group needs at least two rollouts.
    """
    g = _groups(rewards, group_size)  # (G, n, ...)
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs group_size >= 2 (a rollout's baseline is the mean of "
                         "the others in its group)")
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)  # (G, n, ...)
    return (g - others).reshape(rewards.shape)


def greedy_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = R_i - R_greedy(item of i). ``greedy_rewards`` has one row per group (item): (G,) for (N,)
    rewards, (G, nb) for per-block rewards (N, nb). Returns a float tensor shaped like ``rewards``."""
    g = _groups(rewards, group_size)  # (G, n, ...)
    want = (g.shape[0],) + tuple(g.shape[2:])
    if tuple(greedy_rewards.shape) != want:
        raise ValueError(f"greedy_rewards must have one row per group, shape {want}, got "
                         f"{tuple(greedy_rewards.shape)}")
    base = _float(greedy_rewards).to(device=g.device, dtype=g.dtype).unsqueeze(1)  # (G, 1, ...)
    return (g - base).reshape(rewards.shape)


def reward_to_go(block_rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_j = sum_{k >= j} gamma^(k - j) r_k over the block axis of (N, nb) per-block rewards."""
    if block_rewards.dim() != 2:
        raise ValueError(f"block rewards must be (N, num_blocks), got shape {tuple(block_rewards.shape)}")
    if not (0 <= gamma <= 1):
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    r = _float(block_rewards)
    out = torch.empty_like(r)
    acc = r.new_zeros(r.shape[0])
    for j in range(r.shape[1] - 1, -1, -1):
        acc = r[:, j] + gamma * acc
        out[:, j] = acc
    return out


def _baseline(rewards: torch.Tensor, group_size: int, baseline: str, greedy: Optional[torch.Tensor],
              eps: float, std: str) -> torch.Tensor:
    if baseline not in BASELINES:
        raise ValueError(f"--advantage {baseline!r}: choose one of {', '.join(BASELINES)}")
    if baseline != "greedy" and greedy is not None:
        raise ValueError(f"greedy rewards were given but the baseline is {baseline!r}: use baseline='greedy'")
    if baseline == "loo":
        return loo_advantages(rewards, group_size)
    if baseline == "greedy":
        if greedy is None:
            raise ValueError("the greedy baseline needs the reward of each item's greedy rollout (greedy=...)")
        return greedy_advantages(rewards, greedy, group_size)
    if rewards.dim() == 1:
        return group_advantages(rewards, group_size, eps=eps, std=std)
    cols = [group_advantages(rewards[:, j], group_size, eps=eps, std=std) for j in range(rewards.shape[1])]
    return torch.stack(cols, dim=1) if cols else _float(rewards).clone()


def block_advantages(block_rewards: torch.Tensor, group_size: int, baseline: str = "group",
                     credit: Literal["to_go", "own"] = "to_go", greedy: Optional[torch.Tensor] = None,
                     gamma: float = 1.0, eps: float = 1e-4,
                     std: Literal["group", "batch", "none"] = "group") -> torch.Tensor:
    """Per-block advantages (N, nb): the baseline applied per block column to the reward-to-go of
    ``block_rewards`` (``credit='to_go'``) or to the block rewards themselves (``credit='own'``).

    greedy: (G, nb) per-block rewards of each item's greedy rollout, processed the same way (its reward-to-go
    for ``to_go``), for ``baseline='greedy'``.
    """
    if credit not in ("to_go", "own"):
        raise ValueError(f"credit must be 'to_go' or 'own', got {credit!r}")
    if block_rewards.dim() != 2:
        raise ValueError(f"block rewards must be (N, num_blocks), got shape {tuple(block_rewards.shape)}")
    if credit == "to_go":
        block_rewards = reward_to_go(block_rewards, gamma)
        if greedy is not None:
            greedy = reward_to_go(greedy, gamma)
    return _baseline(block_rewards, group_size, baseline, greedy, eps, std)


def advantages(rewards: torch.Tensor, group_size: int, baseline: str = "group", credit: str = "sequence",
               block_rewards: Optional[torch.Tensor] = None, greedy: Optional[torch.Tensor] = None,
               block_credit: Literal["to_go", "own"] = "to_go", eps: float = 1e-4,
               std: Literal["group", "batch", "none"] = "group") -> torch.Tensor:
    """The trainer's one entry point (``--advantage {group,loo,greedy}``, ``--credit {sequence,block}``).

    credit 'sequence': (N,) advantages of ``rewards`` (N,); ``greedy`` is (G,).
    credit 'block': (N, nb) advantages of ``block_rewards`` (N, nb) (see :func:`block_advantages`);
    ``greedy`` is (G, nb) per-block greedy rewards. ``rewards`` is then only checked against their sum
    when ``block_credit='to_go'`` (the block parts must add up to the reward).
    """
    if credit not in CREDITS:
        raise ValueError(f"--credit {credit!r}: choose one of {', '.join(CREDITS)}")
    if credit == "sequence":
        if rewards.dim() != 1:
            raise ValueError(f"rewards must be (N,) for sequence credit, got shape {tuple(rewards.shape)}")
        return _baseline(rewards, group_size, baseline, greedy, eps, std)
    if block_rewards is None:
        raise ValueError("--credit block needs per-block rewards: use a reward that returns block_reward "
                         "(equation_truth, math_verify+equation_truth, math_verify)")
    if block_rewards.shape[0] != rewards.shape[0]:
        raise ValueError(f"block_rewards has {block_rewards.shape[0]} rows for {rewards.shape[0]} rewards")
    if block_credit == "to_go" and not torch.allclose(_float(block_rewards).sum(1), _float(rewards).to(
            block_rewards.device), atol=1e-5):
        raise ValueError("block_rewards do not add up to the rewards: reward-to-go credit needs block parts of "
                         "the sequence reward")
    return block_advantages(block_rewards, group_size, baseline, block_credit, greedy, eps=eps, std=std)


# ------------------------------------------------------------------------------------------- statistics


def zero_advantage_share(adv: torch.Tensor, group_size: int, tol: float = 1e-8) -> float:
    """Share of groups whose advantages are all |A| <= tol (no gradient from them); (N,) or (N, nb)."""
    g = _groups(adv, group_size, "advantages")  # (G, n, ...)
    if g.shape[0] == 0:
        return float("nan")
    zero = (g.abs() <= tol).reshape(g.shape[0], -1).all(dim=1)  # (G,)
    return float(zero.float().mean())


def kept_from_orders(orders: torch.Tensor) -> torch.Tensor:
    """(..., S, Lb) PL orders (-1 padded) -> (..., S, Lb) bool: the positions kept after each step."""
    Lb = orders.shape[-1]
    kept = torch.zeros(orders.shape[:-1] + (Lb + 1,), dtype=torch.bool, device=orders.device)
    kept.scatter_(-1, torch.where(orders >= 0, orders, torch.full_like(orders, Lb)), True)
    return kept[..., :Lb]


def decision_stats(kept: torch.Tensor, tokens: torch.Tensor) -> Dict[str, float]:
    """Remask statistics of block-wise rollouts whose blocks start fully masked.

    Args:
        kept: (N, nb, S, Lb) bool, the positions holding a token after step s (the PL draw's set).
        tokens: (N, nb, S, Lb) long, the token each position holds after step s where ``kept`` (x_hat).

    A remask at step s is a position kept after step s - 1 and not after step s; it held
    ``tokens[s - 1]``. Its re-commit is the next step at which it is kept again, with ``tokens`` there.

    Returns floats: ``remasks_per_block`` (remask events per block, mean over rollouts and blocks),
    ``remasks`` (total events), ``recommits`` (events followed by a re-commit), ``same_token_recommit_share``
    (of those, the share that got the token they held back; NaN when none) and ``blocks``.
    """
    if kept.shape != tokens.shape or kept.dim() != 4:
        raise ValueError(f"kept and tokens must both be (N, nb, S, Lb), got {tuple(kept.shape)} and "
                         f"{tuple(tokens.shape)}")
    kept = kept.to(torch.bool)
    N, nb, S, Lb = kept.shape
    prev_kept = torch.zeros((N, nb, Lb), dtype=torch.bool, device=kept.device)
    prev_tok = torch.zeros((N, nb, Lb), dtype=tokens.dtype, device=tokens.device)
    pending = torch.zeros_like(prev_kept)  # remasked and not yet committed again
    held = torch.zeros_like(prev_tok)  # the token a pending position held before its remask
    remasks = recommits = same = 0
    for s in range(S):
        k, t = kept[:, :, s], tokens[:, :, s]
        back = pending & k
        recommits += int(back.sum())
        same += int((back & (t == held)).sum())
        pending = pending & ~back
        gone = prev_kept & ~k
        remasks += int(gone.sum())
        held = torch.where(gone, prev_tok, held)
        pending = pending | gone
        prev_kept, prev_tok = k, t
    blocks = N * nb
    return {"remasks_per_block": remasks / blocks if blocks else float("nan"), "remasks": float(remasks),
            "recommits": float(recommits),
            "same_token_recommit_share": same / recommits if recommits else float("nan"), "blocks": float(blocks)}
