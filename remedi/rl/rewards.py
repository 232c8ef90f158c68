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
  block length, or one minus it (per-block parts: each block's share, for ``--credit block``). Only the position policy decides remasks, so a UPS learns either in a
  few updates (rank masked positions above visible ones, or the reverse); the pair is the loop's sign test.
* ``toy_even_tokens``: the fraction of generated positions holding an even token id. The UPS cannot see a
  masked position's candidate, so this is learned by the token policy (``--train ups_lora``).
* ``toy_left_to_right``: the fraction of adjacent pairs (p, p+1) inside a block where p was unmasked for
  good no later than p+1 (1 for strictly left-to-right decoding).
* ``equation_truth`` (gold-free, shaped): the share of the completion's ``a op b = c`` statements that are
  arithmetically true (:func:`find_equations`); a completion without one gets 0 and is counted in
  ``extras['no_equation']``. It is the slip detector of LEARNED_POLICY.md: most wrong answers of the
  embedded model come from a false equation.
* ``math_verify+equation_truth``: correct + lambda * equation truth, lambda = ``RewardContext.shaped_weight``
  (< 1 keeps every right answer above every wrong one).

Per-block parts: a reward may also return ``block_reward`` (N, nb), parts of the reward that add up to it
over the blocks, for per-block credit (:func:`remedi.rl.advantages.block_advantages`). An equation is
credited to the block holding the last digit of its result (where the number is completed);
``math_verify``'s 0/1 goes to the last block, so its reward-to-go is the sequence reward in every block.
"""
from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

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
    shaped_weight: float = 0.5  # lambda of the combined rewards (correct + lambda * shaped)
    block_length: Optional[int] = None  # for per-block parts; None = the rollout's block length

    def __post_init__(self) -> None:
        w = self.shaped_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 <= w < float("inf")):
            raise ValueError(f"the shaped reward weight must be a number >= 0, got {w!r}")


@dataclass
class RewardResult:
    reward: torch.Tensor  # (N,) float32
    correct: torch.Tensor  # (N,) bool: the answer counts as right (accuracy)
    texts: Optional[list] = None  # decoded completions, when the reward decoded them
    block_reward: Optional[torch.Tensor] = None  # (N, nb) float32 parts of ``reward`` per block (sum = reward)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # per-rollout (N,) or per-block (N, nb) values


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


def _num_blocks(batch: RolloutBatch, ctx: RewardContext) -> tuple[int, int]:
    """(nb, Lb): the rollout's blocks (ctx.block_length overrides the recorded states' block length)."""
    G = batch.final.shape[-1]
    Lb = ctx.block_length
    if Lb is None:
        if getattr(batch, "states", None) is None:
            raise ValueError("per-block rewards need the block length: set RewardContext.block_length")
        Lb = batch.states.shape[-1]
    if G % Lb:
        raise ValueError(f"block length {Lb} does not divide the generation length {G}")
    return G // Lb, Lb


def _last_block(values: torch.Tensor, nb: int) -> torch.Tensor:
    """(N,) -> (N, nb) with the values in the last block and 0 elsewhere."""
    out = torch.zeros(values.shape[0], nb, dtype=torch.float32)
    if nb:
        out[:, -1] = values.float()
    return out


def _math_verify(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext):
    from remedi.tasks.answer_check import check

    texts = completions(batch, ctx)
    ok = [bool(check(t, it.gold, it.fmt).correct) for t, it in zip(texts, items)]
    return texts, torch.tensor(ok, dtype=torch.bool)


@register_reward("math_verify")
def math_verify_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    texts, correct = _math_verify(batch, items, ctx)
    nb, _ = _num_blocks(batch, ctx)
    return RewardResult(correct.float(), correct, texts, block_reward=_last_block(correct, nb))


@register_reward("toy_remasks")
def remasks_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    part = (batch.remasks.float() / (batch.states.shape[-1] * batch.remasks.shape[1])).cpu()  # (N, nb)
    r = part.sum(1)  # (N,): remasks per block / Lb
    return RewardResult(r, r > 0, block_reward=part)


@register_reward("toy_no_remasks")
def no_remasks_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    nb = batch.remasks.shape[1]
    part = (1 - batch.remasks.float() / batch.states.shape[-1]).cpu() / nb  # (N, nb)
    r = part.sum(1)  # (N,)
    return RewardResult(r, r >= 1.0, block_reward=part)


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


# ------------------------------------------------------------------------------- equation truth (gold-free)

# A number: optional $; a mixed number (3 1/2), a fraction written without spaces (3/4, read as one value, so
# 1 1/2 / 1/2 = 3), or digits with optional thousands commas (1,234,567) and decimals; optional %.
_NUM = r"\$?(?:\d+ \d+/\d+(?!\d|\.\d)|\d+/\d+(?!\d|\.\d)|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)%?"
_OPS = "+-*/x×÷−–"  # noqa: RUF001 (the times, divide, minus and en-dash signs are meant)
_OP = r"[-+*/x×÷−–]"  # noqa: RUF001
_EXPR = rf"{_NUM}(?:[ \t]*{_OP}[ \t]*{_NUM})*"  # one line: spaces and tabs only
_LHS_RE = re.compile(rf"{_EXPR}[ \t]*$")  # the left side, ending right before the '='
_RHS_RE = re.compile(rf"[ \t]*([-−–]?)[ \t]*({_EXPR})")  # noqa: RUF001 (the right side, optionally negative)
_NUM_RE = re.compile(_NUM)
_LHS_WINDOW = 200  # characters searched before an '=' for its left side


class Equation(NamedTuple):
    """One ``a op b = c`` statement: character spans in the text, both sides as written, values, verdict."""

    start: int  # first character of the left side
    result_start: int  # the right side's span [result_start, result_end)
    result_end: int
    expression: str  # the left side as written
    value: Optional[Fraction]  # the left side, evaluated (None: a division by zero)
    result: Optional[Fraction]  # the right side, evaluated
    true: bool


def _number(s: str) -> Fraction:
    s = s.replace("$", "").replace(",", "")
    scale = Fraction(1, 100) if s.endswith("%") else 1
    s = s.rstrip("%")
    whole, _, frac = s.rpartition(" ")  # a mixed number "3 1/2"
    v = Fraction(frac) + (int(whole) if whole else 0)  # Fraction reads "3/4" and "12.5" exactly
    return v * scale


def _evaluate(expression: str) -> tuple[Optional[Fraction], bool]:
    """(value, plain): the expression with * and / first, left to right (None on a division by zero), and
    whether it was one plain number (no operator, fraction or percent)."""
    nums = list(_NUM_RE.finditer(expression))
    ops = [expression[a.end():b.start()].strip() for a, b in zip(nums, nums[1:])]
    plain = len(nums) == 1 and not any(c in nums[0].group() for c in "/%")
    try:
        numbers = [_number(n.group()) for n in nums]
    except ZeroDivisionError:  # a fraction literal 1/0
        return None, plain
    terms, signs = [numbers[0]], []
    for op, n in zip(ops, numbers[1:]):
        if op in ("*", "x", "×", "/", "÷"):  # noqa: RUF001
            if op in ("/", "÷") and n == 0:
                return None, plain
            terms[-1] = terms[-1] / n if op in ("/", "÷") else terms[-1] * n
        else:
            terms.append(n)
            signs.append(op)
    total = terms[0]
    for op, t in zip(signs, terms[1:]):
        total = total + t if op == "+" else total - t
    return total, plain


def _agrees(value: Fraction, result: Fraction, result_text: str) -> bool:
    """Exact, or within half a unit of the result's last decimal place when it is one number written with
    decimals (10 / 3 = 3.33 is true, 7 / 2 = 3 is not)."""
    if value == result:
        return True
    m = re.fullmatch(r"\$?[\d,]*\.(\d+)", result_text.strip())
    return m is not None and abs(value - result) <= Fraction(1, 2 * 10 ** len(m.group(1)))


def _attached_to_more(text: str, start: int) -> bool:
    """True when the left side found at ``start`` continues a longer expression the parser does not read
    (``(2 + 3) * 4 + 1 = 21``: the match ``4 + 1`` follows ``*``; ``$350 000 + 5 = ...``), or a word or
    number (``x2 + 1 = 3``)."""
    if start == 0:
        return False
    if text[start - 1].isalnum() or text[start - 1] in ".,":
        return True
    j = start - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    if j < 0:
        return False
    c = text[j]
    if c == "x":  # an operator only when it is not the end of a word (3 x 4; not "box 3 + 4")
        return j == 0 or not text[j - 1].isalpha()
    return c.isdigit() or c in _OPS or c in ")]"


def find_equations(text: str) -> List[Equation]:
    """Every ``a op b = c`` statement in ``text``, in order.

    Each side is a number or a chain of numbers and operators on one line: + - * / and x × ÷ − – (times,
    divide, minus signs); numbers may carry a $ sign, thousands commas, decimals, a % sign, or be fractions
    (3/4) or mixed numbers (3 1/2). * and / go first; the right side may be negative. Each '=' is one
    statement, so an equality chain ``30 - 8 * 3 = 30 - 24 = 6`` is two true ones, while a running total
    written as a chain (``20 - 5 = 15 - 3 = 12``) has a false first statement, as in arithmetic. Not read
    (skipped, neither true nor false): parentheses, a side glued to a longer expression, a word or another
    number (``$350 000``, ``5+3x``), ``==``, an '=' without numbers on both sides, one plain number on each
    side (``7 = 7``), and a left side of one number after a word (``10% of 150 = 75 + 15``).
    """
    out: List[Equation] = []
    for m in re.finditer("=", text):
        eq = m.start()
        if text[eq + 1:eq + 2] == "=" or text[eq - 1:eq] in ("=", "<", ">", "!"):
            continue
        rhs = _RHS_RE.match(text, eq + 1)
        # not read: "= $409 500" (a spaced number), "= 5+3x" (algebra)
        if rhs is None or re.match(r"[ \t]+\d|[A-Za-z]", text[rhs.end():rhs.end() + 2]):
            continue
        lhs = _LHS_RE.search(text, max(0, eq - _LHS_WINDOW), eq)
        if lhs is None or _attached_to_more(text, lhs.start()):
            continue
        expression = text[lhs.start():eq].rstrip()
        value, plain_l = _evaluate(expression)
        result, plain_r = _evaluate(rhs.group(2))
        if plain_l and (plain_r or re.search(r"[A-Za-z][ \t]*$", text[max(0, lhs.start() - 2):lhs.start()])):
            continue  # 7 = 7, or a word before one number ("10% of 150 = 75 + 15"): not a statement read here
        if result is not None and rhs.group(1):
            result = -result
        true = value is not None and result is not None and _agrees(value, result, rhs.group(2))
        out.append(Equation(lhs.start(), rhs.start(2), rhs.end(2), expression, value, result, true))
    return out


def block_offsets(tokens: Sequence[int], tokenizer, block_length: int, num_blocks: int) -> List[int]:
    """Character offsets in ``decode(tokens)`` where blocks 1..num_blocks-1 start (``tokens`` is the
    completion cut at EOS, so later blocks may be empty). Each offset is the length of the decoded prefix
    (its common prefix with the whole text, if decoding is not prefix-stable)."""
    full = tokenizer.decode(list(tokens), skip_special_tokens=True)
    out = []
    for j in range(1, num_blocks):
        cut = j * block_length
        if cut >= len(tokens):
            out.append(len(full))
            continue
        pre = tokenizer.decode(list(tokens[:cut]), skip_special_tokens=True)
        out.append(len(pre) if full.startswith(pre) else len(os.path.commonprefix([pre, full])))
    return out


def equation_truth_rows(rows: Sequence[Sequence[int]], tokenizer, eos: int, block_length: int,
                        num_blocks: int) -> Dict[str, object]:
    """Equation truth of generated rows (token ids, cut at the first EOS here), whole and per block.

    Returns ``texts`` (list), ``truth`` (N,) float32 share of true equations (0 without equations),
    ``equations`` / ``true_equations`` (N,) long, ``no_equation`` (N,) bool, ``block_equations`` /
    ``block_true`` (N, nb) long counts by the block of each result's last digit, and ``block_reward``
    (N, nb) float32 = block_true / equations (adds up to ``truth``).
    """
    N = len(rows)
    texts, counts, trues = [], torch.zeros(N, num_blocks, dtype=torch.long), torch.zeros(N, num_blocks,
                                                                                          dtype=torch.long)
    for i, row in enumerate(rows):
        cut = cut_at_eos(list(row), eos)
        text = tokenizer.decode(cut, skip_special_tokens=True)
        texts.append(text)
        eqs = find_equations(text)
        if not eqs:
            continue
        bounds = block_offsets(cut, tokenizer, block_length, num_blocks)
        for e in eqs:
            j = bisect.bisect_right(bounds, e.result_end - 1)
            counts[i, j] += 1
            trues[i, j] += int(e.true)
    n_eq, n_true = counts.sum(1), trues.sum(1)
    denom = n_eq.clamp(min=1).float().unsqueeze(1)  # (N, 1)
    block_reward = trues.float() / denom  # (N, nb)
    return {"texts": texts, "truth": block_reward.sum(1), "equations": n_eq, "true_equations": n_true,
            "no_equation": n_eq == 0, "block_equations": counts, "block_true": trues, "block_reward": block_reward}


def _equation_truth(batch: RolloutBatch, ctx: RewardContext) -> Dict[str, object]:
    nb, Lb = _num_blocks(batch, ctx)
    return equation_truth_rows(batch.final.tolist(), ctx.tokenizer, ctx.ids.eos, Lb, nb)


_EXTRAS = ("equations", "true_equations", "no_equation", "block_equations", "block_true")


@register_reward("equation_truth")
def equation_truth_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    """Gold-free: the share of true ``a op b = c`` statements; ``correct`` = every one is true (and some
    exist). ``extras['truth']`` repeats the reward for combined rewards' logs."""
    et = _equation_truth(batch, ctx)
    truth = et["truth"]
    correct = (et["equations"] > 0) & (et["true_equations"] == et["equations"])
    extras = {k: et[k] for k in _EXTRAS}
    extras["truth"] = truth
    return RewardResult(truth, correct, et["texts"], block_reward=et["block_reward"], extras=extras)


@register_reward("math_verify+equation_truth")
def verify_and_truth_reward(batch: RolloutBatch, items: Sequence[RLItem], ctx: RewardContext) -> RewardResult:
    """correct + lambda * equation truth (lambda = ctx.shaped_weight); ``correct`` is math-verify's. The
    block parts: lambda * each block's true equations / all equations, plus the 0/1 in the last block."""
    texts, correct = _math_verify(batch, items, ctx)
    et = _equation_truth(batch, ctx)
    w = float(ctx.shaped_weight)
    nb = et["block_reward"].shape[1]
    reward = correct.float() + w * et["truth"]
    block = w * et["block_reward"] + _last_block(correct, nb)
    extras = {k: et[k] for k in _EXTRAS}
    extras["truth"] = et["truth"]
    return RewardResult(reward, correct, texts, block_reward=block, extras=extras)


def reward_stats(res: RewardResult) -> Dict[str, float]:
    """Floats for the metrics log from a reward's extras: ``equation_truth`` (mean share of true equations),
    ``equations_per_rollout`` and ``no_equation_share`` (rollouts without any equation, which get 0); {} for
    rewards without equations."""
    ex = res.extras
    if "equations" not in ex:
        return {}
    n = max(int(ex["equations"].numel()), 1)
    return {"equation_truth": float(ex["truth"].float().mean()) if "truth" in ex else float("nan"),
            "equations_per_rollout": float(ex["equations"].float().sum()) / n,
            "no_equation_share": float(ex["no_equation"].float().sum()) / n}
