"""Synthetic GSM8K-style arithmetic word problems and the tiny tokenizer trained on them.

Why this exists: the embedded default LLaDA model must train and run on a laptop CPU, so it needs a
task that has GSM8K's *format* (a ``question`` plus an ``answer`` made of reasoning lines ending in
``#### <n>``) but is small enough for a ~5M-parameter model with sequences of at most 192 tokens.

Design choices:

* Every problem is a short dependency graph of 1 to 4 integer operations. Each operation shows up in
  the solution as exactly one ``a op b = c`` equation (``op`` in ``+ - * /``), in the order it is
  computed, and every intermediate result feeds a later equation, so the final answer depends on every
  step. ``n_ops`` (= number of equations) is stored on the item so results can be broken down by it.
* All values are integers in ``0..999``; subtraction never goes below zero and division is exact.
* Three story families (a single owner's inventory/money chain, comparisons between people, a shopping
  bill) with several phrasings per sentence give hundreds of distinct question shapes.
* Generation is a pure function of a ``random.Random``; splits use their own string-derived seeds and
  are de-duplicated against each other on the question text.

Nothing here prints or does work at import time; ``scripts/make_arith_data.py`` is the CLI.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = [
    "SPECIAL_TOKENS",
    "MASK_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "SPLIT_NAMES",
    "NAMES",
    "OBJECTS",
    "CONTAINERS",
    "EQUATION_RE",
    "FINAL_RE",
    "generate_problem",
    "generate_split",
    "make_splits",
    "item_text",
    "train_tokenizer",
    "save_tokenizer",
]

# --------------------------------------------------------------------------------------------------
# Special tokens and chat template (LLaDA's ids come first so id 0 is the mask, as in the model code).
# --------------------------------------------------------------------------------------------------

MASK_TOKEN = "<|mdm_mask|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN  # LLaDA pads with EOS; the SFT loss relies on trailing EOS being learnable.
BOS_TOKEN = "<|startoftext|>"
SPECIAL_TOKENS: list[str] = [
    MASK_TOKEN,  # 0
    EOS_TOKEN,  # 1
    BOS_TOKEN,  # 2
    "<|start_header_id|>",  # 3
    "<|end_header_id|>",  # 4
    "<|eot_id|>",  # 5
]

# LLaMA-3 style, as used by LLaDA-8B-Instruct: BOS only before the first message, each message's
# content trimmed, and an optional assistant header as the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

SPLIT_NAMES = ("train", "validation", "test")

# Parsing helpers shared with tests/evaluation: one equation per reasoning line, final "#### n".
EQUATION_RE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
FINAL_RE = re.compile(r"^#### (\d+)$", re.MULTILINE)

# --------------------------------------------------------------------------------------------------
# Vocabulary of the stories.
# --------------------------------------------------------------------------------------------------

NAMES: tuple[str, ...] = (
    "Tom", "Mia", "Sam", "Anna", "Ben", "Lily", "Max", "Emma", "Leo", "Zoe", "Jack", "Ella",
    "Noah", "Ava", "Liam", "Chloe", "Ryan", "Grace", "Owen", "Ruby", "Eli", "Nora", "Luke", "Ivy",
    "Adam", "Sara", "Jake", "Lucy", "Dan", "Amy", "Paul", "Kate", "Mark", "Rosa", "Omar", "Nina",
    "Carl", "Tina", "Hugo", "Jane", "Finn", "Maya", "Kai", "Lena", "Ali", "Beth", "Ivan", "Dora",
)

# (singular, plural) countable things that make sense to own, buy, give and pack.
OBJECTS: tuple[tuple[str, str], ...] = (
    ("apple", "apples"), ("pencil", "pencils"), ("sticker", "stickers"), ("marble", "marbles"),
    ("cookie", "cookies"), ("book", "books"), ("card", "cards"), ("shell", "shells"),
    ("stamp", "stamps"), ("toy car", "toy cars"), ("balloon", "balloons"), ("egg", "eggs"),
    ("orange", "oranges"), ("crayon", "crayons"), ("bead", "beads"), ("flower", "flowers"),
    ("rock", "rocks"), ("candy", "candies"), ("cupcake", "cupcakes"), ("muffin", "muffins"),
    ("ribbon", "ribbons"), ("button", "buttons"), ("block", "blocks"), ("peach", "peaches"),
    ("lemon", "lemons"), ("pen", "pens"), ("notebook", "notebooks"), ("toy", "toys"),
)

CONTAINERS: tuple[tuple[str, str], ...] = (
    ("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"),
    ("pack", "packs"), ("crate", "crates"), ("tray", "trays"), ("carton", "cartons"),
)

_RELATIVES = ("mom", "dad", "grandma", "grandpa", "aunt", "uncle", "brother", "sister", "teacher")
_SPEND_ON = ("lunch", "a book", "a toy", "a ticket", "snacks", "a gift", "a hat", "paint")
_EARN_BY = ("doing chores", "walking dogs", "selling lemonade", "washing cars", "helping a neighbor")

_MAX_VALUE = 999

# op_div, per kind of running value: (halving texts, their solutions, the largest divisor, dividing texts, their
# solutions, what the value counts after dividing).
_DIVISIONS: dict[str, tuple] = {
    "items": (("{n} gives half of the {objs} to {f}.", "{n} sells half of the {objs}."),
              ("{n} keeps {eq} {objs}.", "{n} has {eq} {objs} left."),
              10,
              ("{n} puts the {objs} into {conts} of {b}.", "{n} packs the {objs} into {conts}, {b} in each {cont}."),
              ("{n} fills {eq} {conts}.", "That makes {eq} {conts}."),
              "containers"),
    "money": (("{n} puts half of the money in a bank.", "{n} spends half of the money."),
              ("{n} has {eq} dollars left.", "{n} keeps {eq} dollars."),
              12,
              ("{n} spends all the money on {objs} that cost {b} dollars each.",
               "{n} uses all the money to buy {objs} at {b} dollars each."),
              ("{n} buys {eq} {objs}.", "{n} gets {eq} {objs}."),
              "items"),
}


def _cap(s: str) -> str:
    """Capitalize the first letter only (``str.capitalize`` would lowercase names inside)."""
    return s[:1].upper() + s[1:]


def _times_word(b: int) -> str:
    return "twice" if b == 2 else f"{b} times"


_FRACTION_WORD = {2: "half", 3: "a third", 4: "a quarter"}


class _Reject(Exception):
    """A draw that breaks a constraint; ``generate_problem`` retries with the same rng."""


class _Story:
    """Accumulates question sentences, solution lines and the equation values of one problem."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sentences: list[str] = []
        self.lines: list[str] = []
        self.n_eq = 0

    def say(self, template: str, **kw: object) -> None:
        self.sentences.append(_cap(template.format(**kw)))

    def solve(self, templates: Sequence[str], x: int, op: str, y: int, **kw: object) -> int:
        """Compute ``x op y``, check the value range, and add one reasoning line containing it.

        Results must lie in 2..999: integers small enough for a tiny model, and never 0 or 1 so
        that plural nouns ("1 apples") never appear.
        """
        a, b = x, y
        if op == "+":
            c = a + b
        elif op == "-":
            c = a - b
        elif op == "*":
            c = a * b
        elif op == "/":
            if b == 0 or a % b:
                raise AssertionError("inexact division")
            c = a // b
        else:
            raise ValueError(op)
        if not 2 <= c <= _MAX_VALUE:
            raise _Reject(f"value out of range: {a} {op} {b} = {c}")
        eq = f"{a} {op} {b} = {c}"
        self.lines.append(_cap(self.rng.choice(templates).format(eq=eq, **kw)))
        self.n_eq += 1
        return c

    def finish(self, question: str, answer: int, **kw: object) -> dict:
        self.sentences.append(_cap(question.format(**kw)))
        return {
            "question": " ".join(self.sentences),
            "answer": "\n".join(self.lines + [f"#### {answer}"]),
            "n_ops": self.n_eq,
        }


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return a, b


# --------------------------------------------------------------------------------------------------
# Family 1: one owner's inventory / money chain, with unit changes (items <-> boxes <-> dollars).
# --------------------------------------------------------------------------------------------------

_ITEM_TOTAL_Q = (
    "How many {objs} does {n} have now?",
    "How many {objs} does {n} have in the end?",
    "How many {objs} does {n} end up with?",
)
_CONT_TOTAL_Q = ("How many {conts} does {n} have now?", "How many {conts} does {n} end up with?")
_MONEY_TOTAL_Q = (
    "How many dollars does {n} have now?",
    "How much money does {n} have in the end?",
    "How many dollars does {n} end up with?",
)


class _Chain:
    """Mutable state of a family-1 story; ``kind`` is what ``value`` counts."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.st = _Story(rng)
        self.n, self.f = _two_names(rng)
        self.obj, self.objs = rng.choice(OBJECTS)
        self.cont, self.conts = rng.choice(CONTAINERS)
        self.kind = "items"
        self.value = 0
        self.packed = False  # after packing, "each box holds b" would contradict the story

    @property
    def kw(self) -> dict:
        return dict(n=self.n, f=self.f, obj=self.obj, objs=self.objs, cont=self.cont, conts=self.conts,
                    rel=self.rng.choice(_RELATIVES))

    # ---- starts ------------------------------------------------------------------------------
    def start_plain(self) -> None:
        rng, kind = self.rng, self.rng.choice(("items", "items", "containers", "money"))
        self.kind = kind
        if kind == "items":
            self.value = rng.randint(3, 60)
            t = rng.choice((
                "{n} has {a} {objs}.", "{n} starts with {a} {objs}.", "{n} collects {a} {objs}.",
                "There are {a} {objs} in {n}'s room.", "At first, {n} has {a} {objs}.",
                "{n} owns {a} {objs}.",
            ))
        elif kind == "containers":
            self.value = rng.randint(2, 15)
            t = rng.choice(("{n} has {a} {conts} of {objs}.", "{n} buys {a} {conts} of {objs}."))
        else:
            self.value = rng.randint(5, 120)
            t = rng.choice(("{n} has {a} dollars.", "{n} saves {a} dollars.",
                            "{n} has {a} dollars in a piggy bank.", "{n} starts with {a} dollars."))
        self.st.say(t, a=self.value, **self.kw)

    def start_rate(self) -> None:
        """A start sentence that already contains one multiplication (counts as an operation)."""
        rng = self.rng
        a, b = rng.randint(2, 15), rng.randint(2, 9)
        kind = rng.choice(("items", "boxes", "money"))
        if kind == "items":
            t = rng.choice(("{n} collects {a} {objs} every day for {b} days.",
                            "For {b} days, {n} gets {a} {objs} each day."))
            sol = ("{n} collects {eq} {objs}.", "In {b} days {n} gets {eq} {objs}.")
            self.kind = "items"
        elif kind == "boxes":
            t = rng.choice(("{n} buys {a} {conts} with {b} {objs} in each.",
                            "{n} has {a} {conts}, and each {cont} holds {b} {objs}."))
            sol = ("{n} has {eq} {objs}.", "There are {eq} {objs} in the {conts}.")
            self.kind = "items"
        else:
            t = rng.choice(("{n} earns {a} dollars a day for {b} days.",
                            "{n} saves {a} dollars every week for {b} weeks."))
            sol = ("{n} has {eq} dollars.", "That is {eq} dollars.")
            self.kind = "money"
        self.st.say(t, a=a, b=b, **self.kw)
        self.value = self.st.solve(sol, a, "*", b, b=b, **self.kw)

    # ---- operations; each returns False when infeasible for the current value ---------------
    def op_add(self) -> bool:
        rng, a = self.rng, self.value
        if self.kind == "money":
            b = rng.randint(2, 60)
            t = rng.choice(("{n} earns {b} more dollars.", "{f} gives {n} {b} dollars.",
                            "{n} gets {b} dollars for " + rng.choice(_EARN_BY) + ".",
                            "{n}'s {rel} gives {n} {b} dollars."))
            sol = ("{n} has {eq} dollars now.", "Now {n} has {eq} dollars.")
        elif self.kind == "containers":
            b = rng.randint(2, 10)
            t = rng.choice(("{n} buys {b} more {conts}.", "{f} gives {n} {b} more {conts}."))
            sol = ("{n} has {eq} {conts} now.", "Now there are {eq} {conts}.")
        else:
            b = rng.randint(2, 40)
            t = rng.choice(("{n} buys {b} more {objs}.", "{f} gives {n} {b} more {objs}.",
                            "{n} finds {b} more {objs}.", "Then {n} gets {b} more {objs} from {f}.",
                            "The next day, {n} collects {b} more {objs}.",
                            "{n}'s {rel} gives {n} {b} {objs}."))
            sol = ("{n} now has {eq} {objs}.", "After that, {n} has {eq} {objs}.",
                   "That makes {eq} {objs}.")
        if a + b > _MAX_VALUE:
            return False
        self.st.say(t, b=b, **self.kw)
        self.value = self.st.solve(sol, a, "+", b, **self.kw)
        return True

    def op_sub(self) -> bool:
        rng, a = self.rng, self.value
        if a < 4:
            return False
        b = rng.randint(2, min(a - 2, 60))
        if self.kind == "money":
            t = rng.choice(("{n} spends {b} dollars on " + rng.choice(_SPEND_ON) + ".",
                            "{n} pays {b} dollars for " + rng.choice(_SPEND_ON) + ".",
                            "{n} gives {b} dollars to {f}.", "{n} loses {b} dollars."))
            sol = ("{n} has {eq} dollars left.", "After that, {n} has {eq} dollars.")
        elif self.kind == "containers":
            t = rng.choice(("{n} gives {b} {conts} to {f}.", "{n} sells {b} of the {conts}."))
            sol = ("{n} has {eq} {conts} left.", "That leaves {eq} {conts}.")
        else:
            t = rng.choice(("{n} gives {b} {objs} to {f}.", "{n} loses {b} of the {objs}.",
                            "{n} sells {b} {objs}.", "Then {n} gives {b} {objs} away.",
                            "{n} uses {b} {objs} for a project.", "{f} takes {b} of {n}'s {objs}."))
            sol = ("{n} has {eq} {objs} left.", "After that, {n} has {eq} {objs}.",
                   "That leaves {eq} {objs}.")
        self.st.say(t, b=b, **self.kw)
        self.value = self.st.solve(sol, a, "-", b, **self.kw)
        return True

    def op_mul(self) -> bool:
        rng, a = self.rng, self.value
        if self.kind == "items":
            if rng.random() < 0.5:  # scale the collection
                b = rng.randint(2, 4)
                word = {2: "doubles", 3: "triples"}.get(b)
                if word and rng.random() < 0.6:
                    t = rng.choice(("Then {n} " + word + " the number of {objs}.",
                                    "The number of {objs} {n} has " + word + "."))
                else:
                    t = rng.choice(("A year later, {n} has {b} times as many {objs}.",
                                    "{n}'s collection of {objs} grows to {b} times its size."))
                sol = ("{n} has {eq} {objs} now.", "Now {n} has {eq} {objs}.")
                new_kind = "items"
            else:  # sell for money
                b = rng.randint(2, 9)
                t = rng.choice(("{n} sells all the {objs} for {b} dollars each.",
                                "{n} sells every {obj} for {b} dollars."))
                sol = ("{n} gets {eq} dollars.", "That is {eq} dollars.")
                new_kind = "money"
        elif self.kind == "containers":
            if not self.packed and rng.random() < 0.6:
                b = rng.randint(2, 12)
                t = rng.choice(("Each {cont} holds {b} {objs}.", "There are {b} {objs} in each {cont}."))
                sol = ("{n} has {eq} {objs}.", "That is {eq} {objs}.")
                new_kind = "items"
            else:
                b = rng.randint(2, 9)
                t = rng.choice(("{n} sells each {cont} for {b} dollars.",
                                "{n} sells the {conts} for {b} dollars each."))
                sol = ("{n} gets {eq} dollars.", "That is {eq} dollars.")
                new_kind = "money"
        else:
            return False  # "the money doubles" reads unnaturally; money only grows by + here
        if a * b > _MAX_VALUE:
            return False
        self.st.say(t, b=b, **self.kw)
        self.value = self.st.solve(sol, a, "*", b, **self.kw)
        self.become(new_kind)
        return True

    def become(self, kind: str) -> None:
        """The running value now counts ``kind``. Containers reached by packing items already say how many go in
        each, so a later "each box holds b" is not offered."""
        if kind != self.kind:
            self.kind, self.packed = kind, (kind == "containers")

    def op_div(self) -> bool:
        rng, a = self.rng, self.value
        if self.kind not in _DIVISIONS:
            return False
        halve, halve_sol, top, split, split_sol, split_kind = _DIVISIONS[self.kind]
        if rng.random() < 0.4:
            if a % 2 or a < 4:
                return False
            b, t, sol, new_kind = 2, rng.choice(halve), halve_sol, self.kind
        else:
            divs = [d for d in range(2, top + 1) if a % d == 0 and a // d >= 2]
            if not divs:
                return False
            b = rng.choice(divs)
            t, sol, new_kind = rng.choice(split), split_sol, split_kind
        self.st.say(t, b=b, **self.kw)
        self.value = self.st.solve(sol, a, "/", b, **self.kw)
        self.become(new_kind)
        return True

    def finish_share(self) -> dict | None:
        """Terminal division: split equally among friends and ask for one share."""
        rng, a = self.rng, self.value
        if self.kind == "containers":
            return None
        divs = [d for d in range(2, 11) if a % d == 0 and a // d >= 2]
        if not divs:
            return None
        b = rng.choice(divs)
        unit = "dollars" if self.kind == "money" else self.objs
        what = "the money" if self.kind == "money" else "the {objs}"
        self.st.say(rng.choice(("{n} shares " + what + " equally among {b} friends.",
                                "{n} splits " + what + " equally between {b} friends.")), b=b, **self.kw)
        c = self.st.solve(("Each friend gets {eq} " + unit + ".",), a, "/", b, **self.kw)
        return self.st.finish("How many " + unit + " does each friend get?", c, **self.kw)

    def finish_total(self) -> dict:
        q = {"items": _ITEM_TOTAL_Q, "containers": _CONT_TOTAL_Q, "money": _MONEY_TOTAL_Q}[self.kind]
        return self.st.finish(self.rng.choice(q), self.value, **self.kw)


def _chain_problem(rng: random.Random, n_ops: int) -> dict | None:
    ch = _Chain(rng)
    remaining = n_ops
    if rng.random() < 0.3:
        ch.start_rate()
        remaining -= 1
    else:
        ch.start_plain()
    share_last = remaining >= 1 and rng.random() < 0.2
    for _ in range(remaining - (1 if share_last else 0)):
        ops = [ch.op_add, ch.op_sub, ch.op_mul, ch.op_div]
        rng.shuffle(ops)  # first feasible op in random order; add or sub is always feasible
        if not any(op() for op in ops):
            return None
    if share_last:
        return ch.finish_share()
    return ch.finish_total()


# --------------------------------------------------------------------------------------------------
# Family 2: comparisons along a chain of people ("Mia has 3 more than Tom ..."), optional total.
# --------------------------------------------------------------------------------------------------

_VERBS = (("has", "have"), ("collects", "collect"), ("owns", "own"), ("finds", "find"), ("buys", "buy"))


def _compare_problem(rng: random.Random, n_ops: int) -> dict | None:
    st = _Story(rng)
    obj, objs = rng.choice(OBJECTS)
    v3, v = rng.choice(_VERBS)
    together = n_ops >= 2 and rng.random() < 0.4
    n_rel = n_ops - (1 if together else 0)
    people = rng.sample(NAMES, n_rel + 1)
    value = rng.randint(4, 60)
    st.say("{p} {v3} {a} {objs}.", p=people[0], v3=v3, a=value, objs=objs)
    values = [value]
    for i in range(n_rel):
        p0, p1, a = people[i], people[i + 1], values[-1]
        kw = dict(p0=p0, p1=p1, v3=v3, objs=objs)
        choices = ["+", "-", "*", "/"]
        rng.shuffle(choices)
        for op in choices:
            if op == "+":
                b = rng.randint(2, 40)
                if a + b > _MAX_VALUE:
                    continue
                t = rng.choice(("{p1} {v3} {b} more {objs} than {p0}.",
                                "{p1} {v3} {b} {objs} more than {p0}."))
            elif op == "-":
                if a < 4:
                    continue
                b = rng.randint(2, min(a - 2, 40))
                t = rng.choice(("{p1} {v3} {b} fewer {objs} than {p0}.",
                                "{p1} {v3} {b} {objs} less than {p0}."))
            elif op == "*":
                b = rng.randint(2, 6)
                if a * b > _MAX_VALUE:
                    continue
                t = "{p1} {v3} " + _times_word(b) + " as many {objs} as {p0}."
            else:
                divs = [d for d in (2, 3, 4) if a % d == 0 and a // d >= 2]
                if not divs:
                    continue
                b = rng.choice(divs)
                t = "{p1} {v3} " + _FRACTION_WORD[b] + " as many {objs} as {p0}."
            st.say(t, b=b, **kw)
            values.append(st.solve(("{p1} {v3} {eq} {objs}.", "So {p1} {v3} {eq} {objs}."), a, op, b, **kw))
            break
        else:
            return None
    if together:
        x, y = values[-2], values[-1]
        if x + y > _MAX_VALUE:
            return None
        pa, pb = people[-2], people[-1]
        total = st.solve(("Together they {v} {eq} {objs}.", "In total, {pa} and {pb} {v} {eq} {objs}."),
                         x, "+", y, v=v, pa=pa, pb=pb, objs=objs)
        q = rng.choice(("How many {objs} do {pa} and {pb} {v} together?",
                        "How many {objs} do {pa} and {pb} {v} in total?"))
        return st.finish(q, total, objs=objs, pa=pa, pb=pb, v=v)
    q = rng.choice(("How many {objs} does {p} {v}?", "How many {objs} does {p} {v} in all?"))
    return st.finish(q, values[-1], objs=objs, p=people[-1], v=v)


# --------------------------------------------------------------------------------------------------
# Family 3: a shopping bill: products of (quantity * price), their sum, coupon, change or split.
# --------------------------------------------------------------------------------------------------

# (n_products, coupon, ending) with ending in {None, "change", "split"}; n_ops = 2*k - 1 + extras.
_SHOP_PLANS: dict[int, list[tuple[int, bool, str | None]]] = {}
for _k in (1, 2):
    for _coupon in (False, True):
        for _end in (None, "change", "split"):
            _SHOP_PLANS.setdefault(2 * _k - 1 + _coupon + (_end is not None), []).append((_k, _coupon, _end))
del _k, _coupon, _end


def _shop_problem(rng: random.Random, n_ops: int) -> dict | None:
    plans = _SHOP_PLANS.get(n_ops)
    if not plans:
        return None
    k, coupon, end = rng.choice(plans)
    st = _Story(rng)
    n = rng.choice(NAMES)
    goods = rng.sample(OBJECTS, k)
    subtotals = []
    for obj, objs in goods:
        q, p = rng.randint(2, 9), rng.randint(2, 15)
        st.say(rng.choice(("{n} buys {q} {objs} for {p} dollars each.",
                           "{n} buys {q} {objs} that cost {p} dollars each.",
                           "{n} gets {q} {objs} at {p} dollars each.",
                           "Each {obj} costs {p} dollars, and {n} buys {q} of them.")),
               n=n, q=q, p=p, obj=obj, objs=objs)
        subtotals.append(st.solve(("The {objs} cost {eq} dollars.", "{n} pays {eq} dollars for the {objs}."),
                                  q, "*", p, n=n, objs=objs))
    total = subtotals[0]
    if k == 2:
        total = st.solve(("In total, {n} spends {eq} dollars.", "Together that is {eq} dollars."),
                         subtotals[0], "+", subtotals[1], n=n)
    if coupon:
        if total < 4:
            return None
        d = rng.randint(2, min(total - 2, 20))
        st.say(rng.choice(("{n} has a coupon for {d} dollars off.", "The shop gives {n} {d} dollars off.")),
               n=n, d=d)
        total = st.solve(("With the discount, {n} pays {eq} dollars.", "So {n} pays {eq} dollars."),
                         total, "-", d, n=n)
    if end == "change":
        bills = [b for b in (10, 20, 50, 100, 200, 500) if b >= total + 2]
        if not bills:
            return None
        b = rng.choice(bills[:2])
        if rng.random() < 0.5:
            st.say("{n} pays with a {b} dollar bill.", n=n, b=b)
            c = st.solve(("{n} gets {eq} dollars in change.", "The change is {eq} dollars."), b, "-", total, n=n)
            return st.finish("How much change does {n} get?", c, n=n)
        st.say("{n} had {b} dollars before shopping.", n=n, b=b)
        c = st.solve(("{n} has {eq} dollars left.", "Now {n} has {eq} dollars."), b, "-", total, n=n)
        return st.finish(rng.choice(("How many dollars does {n} have left?",
                                     "How much money does {n} have left?")), c, n=n)
    if end == "split":
        divs = [m for m in range(2, 7) if total % m == 0]
        if not divs:
            return None
        m = rng.choice(divs)
        st.say(rng.choice(("{n} splits the cost equally among {m} people.",
                           "The {m} friends share the cost equally.")), n=n, m=m)
        c = st.solve(("Each person pays {eq} dollars.",), total, "/", m)
        return st.finish(rng.choice(("How many dollars does each person pay?",
                                     "How much does each person pay?")), c)
    return st.finish(rng.choice(("How many dollars does {n} spend?", "How much does {n} pay in total?",
                                 "How much money does {n} spend in all?")), total, n=n)


_FAMILIES: tuple[tuple[Callable[[random.Random, int], dict | None], float], ...] = (
    (_chain_problem, 0.5),
    (_compare_problem, 0.25),
    (_shop_problem, 0.25),
)


def generate_problem(rng: random.Random, n_ops: int) -> dict:
    """One problem with exactly ``n_ops`` equations: ``{"question", "answer", "n_ops"}``.

    Deterministic given the state of ``rng``. Infeasible draws (e.g. an exact division that has no
    divisor) are retried with the same rng, so the result is still a function of the rng state.
    """
    if not 1 <= n_ops <= 4:
        raise ValueError(f"n_ops must be in 1..4, got {n_ops}")
    fams = [f for f, _ in _FAMILIES]
    weights = [w for _, w in _FAMILIES]
    for _ in range(1000):
        fam = rng.choices(fams, weights)[0]
        try:
            item = fam(rng, n_ops)
        except _Reject:
            continue
        if item is not None and item["n_ops"] == n_ops:
            return item
    raise RuntimeError("could not generate a problem")  # pragma: no cover - practically unreachable


def generate_split(
    name: str,
    n: int,
    seed: int,
    exclude: Iterable[str] = (),
    n_ops_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> list[dict]:
    """``n`` unique items (by question text) with ids ``arith-{name}-{i:05d}``, skipping ``exclude``.

    The rng is seeded from the string ``"arith:{name}:{seed}"`` so each split has its own stream and the
    first ``k`` items do not depend on ``n`` (ids stay stable when a split is regenerated larger).
    """
    rng = random.Random(f"arith:{name}:{seed}")
    banned = set(exclude)
    seen: set[str] = set()
    items: list[dict] = []
    misses = 0
    ops = (1, 2, 3, 4)
    while len(items) < n:
        n_ops = rng.choices(ops, n_ops_weights)[0]
        item = generate_problem(rng, n_ops)
        q = item["question"]
        if q in seen or q in banned:
            misses += 1
            if misses > 100 * (n + 100):
                raise RuntimeError(f"question space exhausted for split {name!r}")
            continue
        seen.add(q)
        items.append({"id": f"arith-{name}-{len(items):05d}", **item})
    return items


def make_splits(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """Train/validation/test with pairwise-disjoint question texts.

    Test is generated first and is never filtered by the others, so it is identical for any train
    size; validation excludes test, and train excludes both.
    """
    test = generate_split("test", n_test, seed)
    val = generate_split("validation", n_val, seed, exclude=(x["question"] for x in test))
    held_out = {x["question"] for x in test} | {x["question"] for x in val}
    train = generate_split("train", n_train, seed, exclude=held_out)
    return {"train": train, "validation": val, "test": test}


def item_text(item: dict) -> str:
    """Question and answer as one string (tokenizer training corpus / length statistics)."""
    return item["question"] + "\n" + item["answer"]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    * Special tokens get ids 0..5 in ``SPECIAL_TOKENS`` order (the trainer assigns them first).
    * Digits are pre-split one per token (``Digits(individual_digits=True)``), so numbers are
      spelled digit by digit and arithmetic does not hinge on arbitrary multi-digit merges; the space
      before a number stays its own token, as in LLaMA's tokenizer.
    * Byte-level pre-tokenizer + decoder make ``decode(encode(s)) == s`` for any text.
    * No post-processor: ``encode`` never adds BOS/EOS. LLaDA prompts get BOS only via the chat
      template (or explicitly), so the training code, not the tokenizer, decides where EOS goes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat template's role names never occur in the corpus; without them "assistant" would cost
    # ~9 byte tokens of every prompt's budget.
    roles = ["user\n\n", "assistant\n\n", "system\n\n"] * 100
    tok.train_from_iterator(itertools.chain(texts, roles), trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise AssertionError(f"special token ids are {ids}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        mask_token=MASK_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        extra_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> list[str]:
    """Save as tokenizer.json + tokenizer_config.json + special_tokens_map.json, atomically per file.

    transformers 5 no longer writes special_tokens_map.json and puts the chat template in a separate
    .jinja file; we keep the classic three-file layout (template inside tokenizer_config.json, class
    ``PreTrainedTokenizerFast``) so the directory loads with older transformers too.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tok-tmp-") as tmp:
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        cfg_path = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg["chat_template"] = tokenizer.chat_template
        cfg["clean_up_tokenization_spaces"] = False
        cfg.pop("model_max_length", None)  # the model config owns the context length
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        stm = {
            "mask_token": MASK_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "bos_token": BOS_TOKEN,
            "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        }
        (Path(tmp) / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n", encoding="utf-8")
        written = []
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            os.replace(Path(tmp) / name, out / name)
            written.append(str(out / name))
    return written


def prompt(question: str) -> str:
    """The prompt the embedded arithmetic model is trained on: the bare question.

    Training (remedi.training.data, plain format) encodes the question and the answer separately and
    concatenates the ids, so the answer's first token follows the question's last one directly.
    """
    return question
