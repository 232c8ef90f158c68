"""Rows to eval items and items to prompt text: what each task module reads from a row and how it is asked.

One home for evaluation, RL and anything else that turns benchmark rows into prompts: the question, final
answer and worked solution come from the task modules (:mod:`remedi.tasks.gsm8k`, :mod:`~remedi.tasks.math500`
field maps and gold readers, :mod:`remedi.tasks.code` for HumanEval/MBPP rows, :mod:`remedi.tasks.arith`
for the arithmetic task's bare-question prompt); the styles are ``plain`` (few-shot "Question:/Answer:" text,
Base models), ``chat`` (the task instruction in a user turn, Instruct models), ``arith`` / ``arith_chat``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from remedi.tasks import arith, code, gsm8k, math500

ARITH = "arith"
TASKS = {gsm8k.FORMAT: gsm8k, math500.FORMAT: math500}
CODE_FORMATS = code.FORMATS  # ("humaneval", "mbpp"): scored by sandboxed execution


def is_code(fmt: Optional[str]) -> bool:
    return fmt in CODE_FORMATS


@dataclass(frozen=True)
class Item:
    """One eval problem. ``gold`` is the final answer only; ``solution`` the worked answer (few-shot)."""

    id: str
    question: str
    gold: str
    solution: Optional[str] = None
    extra: dict = field(default_factory=dict, compare=False)
    problem: Optional[dict] = field(default=None, compare=False)  # code formats: the row the tests come from


def code_rows_to_items(rows: Sequence[dict], fmt: str, source: str) -> list[Item]:
    """Items of a code task: id = task_id, question = the model prompt, problem = the (checked) row."""
    items, seen = [], set()
    for i, r in enumerate(rows):
        iid = str(r["task_id"])
        if iid in seen:
            raise ValueError(f"{source}: duplicate task_id {iid!r} (row {i + 1}); ids must be unique")
        seen.add(iid)
        keep = ("task_id", "prompt", "test", "entry_point") if fmt == "humaneval" else \
            ("task_id", "prompt", "test_list", "test_imports")
        problem = {k: r[k] for k in keep if k in r}
        gold = r.get("canonical_solution") if fmt == "humaneval" else r.get("code")
        items.append(Item(iid, code.build_prompt(r, fmt), str(gold or ""), None, {}, problem))
    return items


def rows_to_items(rows: Sequence[dict], fmt: str, split: str, source: str) -> list[Item]:
    """Map raw rows to Items for ``fmt``; raises naming the fields found when the needed ones are absent."""
    if not rows:
        raise ValueError(f"{source} has no rows")
    if is_code(fmt):
        return code_rows_to_items(rows, fmt, source)
    found = sorted(rows[0].keys())
    task = TASKS[fmt]
    qkey = next((k for k in task.QUESTION_FIELDS if k in rows[0]), None)
    akey = task.answer_field(rows[0])
    if qkey is None or akey is None:
        need = "question + answer" if fmt == "gsm8k" else "problem + answer (or solution)"
        raise ValueError(f"{source} lacks the fields --format {fmt} needs ({need}); fields found: {found}")
    items, seen = [], set()
    for i, r in enumerate(rows):
        iid = str(r.get("id", r.get("unique_id", f"{split}-{i:05d}")))
        if iid in seen:
            raise ValueError(f"{source}: duplicate item id {iid!r} (row {i}); ids must be unique")
        seen.add(iid)
        missing = [k for k in (qkey, akey) if k not in r]
        if missing:
            raise ValueError(f"{source}: row {i + 1} lacks the field(s) {missing}; every row needs {qkey!r} and "
                             f"{akey!r}")
        if r[akey] is None or not str(r[qkey]).strip():
            raise ValueError(f"{source}: row {i + 1} has an empty {qkey if not str(r[qkey]).strip() else akey!r}; "
                             "fix or remove that row")
        gold, solution = task.gold_and_solution(r, akey)
        extra = {k: v for k, v in r.items() if k in ("n_ops", "level", "subject", "type")}
        items.append(Item(iid, str(r[qkey]), gold, solution, extra))
    return items


CODE_CHAT_INSTRUCTION = ("Complete the following Python function. Answer with the complete function in a "
                         "```python code block.")


def build_prompt(question: str, fmt: str, style: str, exemplars: Sequence[Item] = ()) -> str:
    """The text given to the tokenizer (for chat: the user message, before the chat template)."""
    if is_code(fmt):
        if exemplars:
            raise ValueError(f"--format {fmt}: few-shot prompts are not supported")
        if fmt == "humaneval" and style == "chat":
            return f"{CODE_CHAT_INSTRUCTION}\n\n```python\n{question}```"
        return question
    shots = "".join(f"Question: {ex.question}\nAnswer: {ex.solution}\n\n" for ex in exemplars)
    if style == ARITH:
        return "".join(arith.prompt(ex.question) + f"{ex.solution}\n\n" for ex in exemplars) + arith.prompt(question)
    if style == "arith_chat":
        return "".join(arith.prompt(ex.question) + f"{ex.solution}\n\n" for ex in exemplars) + question
    if style == "chat":
        return f"{shots}{question}\n{TASKS[fmt].INSTRUCTION}"
    if style == "plain":
        return f"{shots}Question: {question}\nAnswer:"
    raise ValueError(f"unknown prompt style {style!r}")
