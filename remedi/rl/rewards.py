"""Reward functions for Remask RL, by name (``--reward``).

A reward function maps a batch of finished rollouts to one scalar per rollout:

    fn(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult

``items[b]`` is the problem rollout b answered (a group repeats its item). Register new ones with
:func:`register_reward`. Built in:

* ``math_verify``: 1 if the answer is right, else 0 (RemeDi's verifiable reward). The completion is the
  generated text up to the first EOS (special tokens dropped), judged by the project's checker
  :func:`remedi.tasks.answer_check.check` in the item's format: ``gsm8k`` (and the embedded model's
  arithmetic task) compares the final number exactly, ``math`` compares the last boxed answer with
  math-verify.
* ``toy_remasks`` / ``toy_no_remasks`` (tests, diagnostics): the number of remasks per block over the
  block length, or one minus it. Only the position policy decides remasks, so a UPS learns either in a
  few updates (rank masked positions above visible ones, or the reverse); the pair is the loop's sign test.
* ``toy_even_tokens``: the fraction of generated positions holding an even token id. The UPS cannot see a
  masked position's candidate, so this is learned by the token policy (``--train ups_lora``).
* ``toy_left_to_right``: the fraction of adjacent pairs (p, p+1) inside a block where p was unmasked for
  good no later than p+1 (1 for strictly left-to-right decoding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from remedi.decoding.sampler import cut_at_eos
from remedi.model.loading import SpecialIds
from remedi.rl.rollout import RolloutBatch


@dataclass(frozen=True)
class RLItem:
    """One training problem: id, prompt token ids, gold answer and its answer format."""

    id: str
    prompt_ids: tuple
    gold: str = ""
    fmt: str = "gsm8k"


@dataclass
class RewardContext:
    tokenizer: object
    ids: SpecialIds


@dataclass
class RewardResult:
    reward: torch.Tensor  # (N,) float32
    correct: torch.Tensor  # (N,) bool: the answer counts as right (accuracy)
    texts: Optional[list] = None  # decoded completions, when the reward decoded them


RewardFn = Callable[[RolloutBatch, Sequence[RLItem], RewardContext], RewardResult]
REWARDS: Dict[str, RewardFn] = {}


def register_reward(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn
    return deco


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"--reward {name!r}: choose one of {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def completions(batch: RolloutBatch, ctx: RewardContext) -> list[str]:
    """The generated text of every rollout: tokens up to the first EOS, special tokens dropped."""
    return [ctx.tokenizer.decode(cut_at_eos(row, ctx.ids.eos), skip_special_tokens=True)
            for row in batch.final.tolist()]


@register_reward("math_verify")
def math_verify_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    from remedi.tasks.answer_check import check

    texts = completions(batch, ctx)
    ok = [bool(check(t, it.gold, it.fmt).correct) for t, it in zip(texts, items)]
    correct = torch.tensor(ok, dtype=torch.bool)
    return RewardResult(correct.float(), correct, texts)


@register_reward("toy_remasks")
def remasks_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    r = (batch.remasks.float().mean(1) / batch.states.shape[-1]).cpu()  # (N,)
    return RewardResult(r, r > 0)


@register_reward("toy_no_remasks")
def no_remasks_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    r = 1 - (batch.remasks.float().mean(1) / batch.states.shape[-1]).cpu()  # (N,)
    return RewardResult(r, r >= 1.0)


@register_reward("toy_even_tokens")
def even_tokens_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    r = (batch.final % 2 == 0).float().mean(1).cpu()  # (N,)
    return RewardResult(r, r >= 1.0)


@register_reward("toy_left_to_right")
def left_to_right_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    N, nb, S, Lb = batch.states.shape
    when = batch.commit_steps().view(N, nb, Lb)  # (N, nb, Lb)
    r = (when[..., :-1] <= when[..., 1:]).float().mean((1, 2)).cpu()  # (N,)
    return RewardResult(r, r >= 1.0)
