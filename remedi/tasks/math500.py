"""MATH-500 (``HuggingFaceH4/MATH-500``, split ``test``): competition problems, answer in ``\\boxed{}``."""
from __future__ import annotations

from remedi.tasks.answer_check import extract_boxed

FORMAT = "math"
HUB_ID, HUB_SUBSET = "HuggingFaceH4/MATH-500", None
QUESTION_FIELDS = ("problem", "question")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def answer_field(row: dict) -> str | None:
    return "answer" if "answer" in row else ("solution" if "solution" in row else None)


def gold_and_solution(row: dict, answer_key: str) -> tuple[str, str | None]:
    """(final answer, worked solution): the ``answer`` field, else the solution's last ``\\boxed{}``."""
    solution = row.get("solution")
    gold = str(row["answer"]) if "answer" in row else (extract_boxed(str(solution)) or str(solution))
    return gold, (str(solution) if solution is not None else None)
