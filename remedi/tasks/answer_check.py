"""Answer extraction and checking for GSM8K and MATH evaluations.

Kept separate from the eval script so a better checker can rescore old
completions without loading a model, and so it can be tested on the real
gold solutions.  Importing this module is cheap: ``math_verify`` (and with it
sympy) is imported only when a MATH answer is actually checked.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

__all__ = [
    "Verdict",
    "check",
    "extract_boxed",
    "extract_gsm8k",
    "extract_math",
    "gold_gsm8k",
    "normalize_math_string",
    "FORMATS",
]

FORMATS = ("gsm8k", "math")

_log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """Outcome of checking one completion; ``note`` says why when it is not obvious."""

    correct: bool
    extracted: str | None
    string_match: bool | None
    note: str = ""


# ---------------------------------------------------------------------------
# \boxed{...} extraction
# ---------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, start: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``start``; None if unclosed.

    Backslash escapes (``\\{``, ``\\}``, ``\\\\``) are skipped so set braces
    inside a box do not end it early.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _box_content(text: str, end_of_cmd: int) -> str | None:
    """Content of one ``\\boxed`` whose command name ends at ``end_of_cmd``."""
    i = end_of_cmd
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        close = _braced(text, i)
        if close is None:
            return None
        content = text[i + 1 : close - 1].strip()
    else:
        # "\boxed 5" / "\boxed5" style: the argument is the next run of non-space characters.
        m = re.match(r"[^\s$]+", text[i:])
        if not m:
            return None
        content = m.group(0).rstrip(".,;")
    return content or None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{}`` / ``\\fbox{}``.

    The last box is the model's final answer; a box cut off by the generation
    length (unclosed) is skipped in favour of the previous complete one.
    """
    if not text:
        return None
    for m in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, m.end())
        if content is not None:
            return content
    return None


# ---------------------------------------------------------------------------
# Numbers (GSM8K)
# ---------------------------------------------------------------------------

# A number in free text.  The sign only counts when not glued to a preceding
# word or digit, so "10-3" yields 10 and 3, not 10 and -3.
_NUM_RE = re.compile(
    r"""
    (?<![\w.])
    (?P<sign>[-\u2212\u2013](?=(?:\\?\$)?\.?\d))?
    (?:\\?\$\s?)?
    (?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
    (?:\s?/\s?(?P<den>\d+(?:\.\d+)?)(?![\d,]))?
    """,
    re.VERBOSE,
)


def _num_to_fraction(m: re.Match) -> Fraction | None:
    try:
        val = Fraction(m.group("num").replace(",", ""))
        if m.group("den") is not None:
            den = Fraction(m.group("den"))
            if den == 0:
                return None
            val = val / den
    except (ValueError, ZeroDivisionError):
        return None
    return -val if m.group("sign") else val


def _canonical(val: Fraction) -> str:
    """Canonical string for a number: "18", "0.75", "-3", "1/3"."""
    if val.denominator == 1:
        return str(val.numerator)
    d = val.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:  # terminating decimal
        digits = 0
        while (val * 10**digits).denominator != 1:
            digits += 1
        s = f"{abs(val.numerator) * 10**digits // val.denominator:0{digits + 1}d}"
        s = s[:-digits] + "." + s[-digits:]
        return ("-" if val < 0 else "") + s
    return f"{val.numerator}/{val.denominator}"


_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_MIXED_RE = re.compile(r"^(-?)\s*(\d+)\s*\\[dt]?frac\s*\{(\d+)\}\s*\{(\d+)\}$")
_UNIT_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\s*\{[^{}]*\}")


def _latex_to_plain_number_text(s: str) -> str:
    """Strip the LaTeX a boxed GSM8K answer tends to carry (\\$, \\text units, \\frac)."""
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\%", "%").replace("\\$", "$").replace("\\left", "").replace("\\right", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "")
    s = _UNIT_TEXT_RE.sub(" ", s)
    s = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", s)
    s = _LATEX_FRAC_SHORT_RE.sub(r"\1/\2", s)
    # "(3)/(4)" -> "3/4" and "-(3)/(4)" -> "-3/4" so the number regex sees one fraction.
    s = re.sub(r"\((-?\s*[\d.,]+)\)/\(([\d.,]+)\)", r"\1/\2", s)
    return s


def _number_from_box(content: str) -> Fraction | None:
    """Numeric value of a box's content; the last number if it holds several (``x = 5``)."""
    m = _MIXED_RE.match(content.strip())
    if m:  # 1\frac{1}{2}
        whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
        if den:
            val = whole + Fraction(num, den)
            return -val if m.group(1) else val
    nums = list(_NUM_RE.finditer(_latex_to_plain_number_text(content)))
    for nm in reversed(nums):
        val = _num_to_fraction(nm)
        if val is not None:
            return val
    return None


def _first_number(text: str) -> Fraction | None:
    for nm in _NUM_RE.finditer(text):
        val = _num_to_fraction(nm)
        if val is not None:
            return val
    return None


def _last_number(text: str) -> Fraction | None:
    for nm in reversed(list(_NUM_RE.finditer(text))):
        val = _num_to_fraction(nm)
        if val is not None:
            return val
    return None


_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*", re.IGNORECASE)


def _gsm8k_value(text: str) -> tuple[Fraction | None, str]:
    """Value and the rule that found it; the rules follow the issue's order."""
    if not text:
        return None, "empty"
    # 1. "#### N": the first marker with a number after it.  Base models often go
    #    on to invent the next few-shot question, so the first answer counts.
    parts = text.split("####")
    for part in parts[1:]:
        head = part.lstrip().split("\n", 1)[0]
        val = _first_number(_latex_to_plain_number_text(head))
        if val is not None:
            return val, "####"
    # 2. The last \boxed{}.  A non-numeric box is a committed wrong answer, so
    #    we do not fall back to an intermediate number from the working.
    box = extract_boxed(text)
    if box is not None:
        return _number_from_box(box), "boxed"
    # 3. "The answer is N" (last such phrase).
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        head = text[m.end() : m.end() + 80].split("\n", 1)[0]
        val = _first_number(_latex_to_plain_number_text(head))
        if val is not None:
            return val, "answer is"
    # 4. The last number anywhere.
    return _last_number(_latex_to_plain_number_text(text)), "last number"


def extract_gsm8k(text: str) -> str | None:
    """Canonical numeric answer of a GSM8K completion ("1,000.00" -> "1000"), or None.

    Order: number after ``####``, else the last ``\\boxed{}``, else the number
    after "answer is", else the last number in the text.
    """
    val, _ = _gsm8k_value(text)
    return None if val is None else _canonical(val)


def gold_gsm8k(answer_field: str) -> str:
    """The gold number of a GSM8K ``answer`` field (text after ``####``), canonicalised."""
    raw = answer_field.split("####")[-1].strip()
    val = _first_number(raw.replace("$", ""))
    return raw if val is None else _canonical(val)


def _parse_numeric(s: str) -> Fraction | None:
    """A gold or extracted answer string as a number (plain or LaTeX)."""
    s = s.strip()
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        pass
    return _number_from_box(s)


# ---------------------------------------------------------------------------
# MATH
# ---------------------------------------------------------------------------

_FINAL_ANSWER_RES = (
    # Minerva style "Final Answer: The final answer is $x$."
    re.compile(r"final answer is\s*\$+([^$]+?)\$+", re.IGNORECASE),
    re.compile(r"answer is\s*:?\s*\$+([^$]+?)\$+", re.IGNORECASE),
    re.compile(r"answer is\s*:?\s*([^\s$][^\n$]*?)\.?\s*(?:\n|$)", re.IGNORECASE),
)


def extract_math(text: str) -> str | None:
    """Final answer of a MATH completion: the last ``\\boxed{}``.

    Without a box, falls back to "The final answer is $x$" (the Minerva few-shot
    format used with Base models) and then "The answer is x".
    """
    box = extract_boxed(text)
    if box is not None:
        return box
    if not text:
        return None
    for rx in _FINAL_ANSWER_RES:
        found = list(rx.finditer(text))
        if found:
            ans = found[-1].group(1).strip()
            if ans:
                return ans
    return None


def _strip_text_cmds(s: str) -> str:
    """Drop unit-like ``\\text{ cm}`` (leading space) and unwrap other ``\\text{x}``."""
    s = re.sub(r"\\(?:text|mbox|textrm)\s*\{\s[^{}]*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|textrm|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    return s


def normalize_math_string(s: str) -> str:
    """Plain normalisation of a MATH answer for the string second opinion.

    Removes presentation-only differences (spacing, \\left/\\right, \\dfrac,
    degrees, dollars, units in \\text, "x =" prefixes) so that two answers
    written the same way compare equal without any symbolic maths.
    """
    s = s.strip()
    s = s.replace("\n", "")
    for a, b in (
        ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("~", ""),
        ("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
        ("\\displaystyle", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\u00b0", ""),
        ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("{,}", ","),
    ):
        s = s.replace(a, b)
    s = _strip_text_cmds(s)
    s = s.rstrip(".").strip()
    # "x = 5" -> "5" (a short variable name on the left only).
    m = re.match(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(.+)$", s)
    if m:
        s = m.group(1)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)
    # Integer fractions: "\\frac{1}{2}" == "1/2" == "0.5".
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}|(-?\d+)/(\d+)", s)
    if m:
        if m.group(2) is not None:
            num, den = int(m.group(2)), int(m.group(3))
            num = -num if m.group(1) else num
        else:
            num, den = int(m.group(4)), int(m.group(5))
        if den:
            return _canonical(Fraction(num, den))
    # Pure numbers: "18.00" == "18", "1,000" == "1000", ".5" == "0.5".
    if re.fullmatch(r"-?(\d{1,3}(,\d{3})+|\d*)(\.\d*)?", s) and re.search(r"\d", s):
        try:
            return _canonical(Fraction(s.replace(",", "")))
        except ValueError:
            pass
    return s


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


_MV_TIMEOUT_S = 5
_MV_MAX_CHARS = 1000


@lru_cache(maxsize=8192)
def _mv_parse(expr: str, with_timeout: bool):
    """math_verify.parse of one boxed answer; cached because golds repeat across sources."""
    from math_verify import parse  # lazy: pulls in sympy

    # signal.alarm timeouts only work in the main thread; elsewhere run without.
    timeout = _MV_TIMEOUT_S if with_timeout else None
    return parse("\\boxed{" + expr + "}", parsing_timeout=timeout)


def _math_verify(gold: str, pred: str) -> tuple[bool | None, str]:
    """math_verify verdict, or None with a reason when it cannot judge."""
    if len(gold) > _MV_MAX_CHARS or len(pred) > _MV_MAX_CHARS:
        # Real answers are short; sympy on a runaway box can hang where no
        # timeout is available (worker threads), so do not try.
        return None, f"answer longer than {_MV_MAX_CHARS} characters, math_verify skipped"
    with_timeout = _in_main_thread()
    try:
        from math_verify import verify

        g = _mv_parse(gold, with_timeout)
        p = _mv_parse(pred, with_timeout)
        if not g:
            return None, "math_verify could not parse the gold"
        if not p:
            return None, "math_verify could not parse the answer"
        timeout = _MV_TIMEOUT_S if with_timeout else None
        return bool(verify(g, p, timeout_seconds=timeout)), ""
    except ImportError as e:
        return None, f"math_verify unavailable ({e})"
    except BaseException as e:  # noqa: BLE001 - includes its TimeoutException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        _log.debug("math_verify failed", exc_info=True)
        return None, f"math_verify error: {type(e).__name__}: {e}"[:200]


def _check_math(completion: str, gold: str) -> Verdict:
    if "\\boxed" in gold or "\\fbox" in gold:  # a whole solution given as gold
        gold = extract_boxed(gold) or gold
    extracted = extract_math(completion)
    if extracted is None:
        return Verdict(False, None, False, "no answer found")
    norm_gold = normalize_math_string(gold)
    s_match = bool(norm_gold) and normalize_math_string(extracted) == norm_gold
    mv, why = _math_verify(gold, extracted)
    if mv is None:
        return Verdict(s_match, extracted, s_match, f"{why}; used string comparison")
    note = ""
    if mv != s_match:
        note = f"math_verify={mv} disagrees with string comparison={s_match}"
    return Verdict(mv, extracted, s_match, note)


def _check_gsm8k(completion: str, gold: str) -> Verdict:
    gold_s = gold_gsm8k(gold) if "####" in gold else gold
    gval = _parse_numeric(gold_s)
    val, rule = _gsm8k_value(completion)
    extracted = None if val is None else _canonical(val)
    if gval is None:
        return Verdict(False, extracted, None, f"gold is not numeric: {gold_s!r}")
    if val is None:
        note = "boxed answer is not numeric" if rule == "boxed" else "no answer found"
        return Verdict(False, None, None, note)
    return Verdict(val == gval, extracted, None, f"via {rule}")


def check(completion: str, gold: str, fmt: str) -> Verdict:
    """Judge one completion against its gold answer.

    ``fmt="gsm8k"`` compares numbers exactly (gold may be the number or the whole
    answer field); ``fmt="math"`` compares the last boxed answer with math_verify,
    keeping a normalised string comparison as a second opinion in ``string_match``.
    """
    if fmt == "gsm8k":
        return _check_gsm8k(completion or "", gold)
    if fmt == "math":
        return _check_math(completion or "", gold)
    raise ValueError(f"unknown answer format {fmt!r}; allowed formats: {', '.join(FORMATS)}")
