"""GSM8K (``openai/gsm8k``, config ``main``): grade-school word problems, answer after ``####``."""
from __future__ import annotations

from remedi.tasks.answer_check import gold_gsm8k

FORMAT = "gsm8k"
HUB_ID, HUB_SUBSET = "openai/gsm8k", "main"
QUESTION_FIELDS = ("question", "problem")
INSTRUCTION = ("Solve the problem step by step. At the end, write the final answer as a number after '####', "
               "for example '#### 42'.")


def answer_field(row: dict) -> str | None:
    return "answer" if "answer" in row else None


def gold_and_solution(row: dict, answer_key: str) -> tuple[str, str]:
    """(final answer, worked solution) of a row: the number after ``####`` and the whole answer text."""
    text = str(row[answer_key])
    return gold_gsm8k(text), text
