"""Answer extraction from generated text, and grading against gold answers.

Three numeric modes, from strictest to most lenient, and one for text answers:

* ``strict``: the number after the last ``####`` marker (GSM8K's convention,
  like lm-evaluation-harness's strict-match).
* ``flexible``: the marker if present, else ``\\boxed{...}``, else
  "the answer is N", else the last number in the text (like the harness's
  flexible-extract).
* ``math``: symbolic equivalence of LaTeX answers through ``math-verify``
  (MATH-style answers such as ``\\frac{1}{2}`` vs ``0.5``).
* ``exact``: the text after the last ``####`` marker, up to the end of its
  line, equals the gold answer once runs of whitespace are made single spaces
  and the ends stripped; case and punctuation count. This grades answers that
  are words or sentences, such as the graph task's ``n12`` or ProsQA's
  ``Tom is a yumpus.`` (Coconut's own evaluation also compares the text after
  its marker with the answer verbatim, commas dropped).

Numbers are normalised before comparison: ``,`` ``$`` ``%`` and a trailing
``.`` are dropped, a leading ``+`` is dropped, trailing zeros after the
decimal point are removed and an integral value loses its point, so
``$1,000.00`` -> ``1000``, ``3.50`` -> ``3.5`` and ``-0`` -> ``0``.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Literal

from latentlib.tasks.schema import ANSWER_MARKER, RecordError, describe_location

GradeMode = Literal["strict", "flexible", "math", "exact"]
GRADE_MODES: tuple[str, ...] = ("strict", "flexible", "math", "exact")

# One number as written in text: optional sign and currency, digit groups with commas, decimals, percent.
_NUMBER = r"[-+]?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)%?"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_TAIL_RE = re.compile(r"\s*(" + _NUMBER + r")")
_ANSWER_IS_RE = re.compile(r"the (?:final )?answer is:?\s*\**\s*(" + _NUMBER + r")", re.IGNORECASE)
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def normalize_number(text: str) -> str | None:
    """Return the canonical spelling of the number in ``text``, or None if it is not one number."""
    # U+2212 is the minus sign some models emit instead of a hyphen.
    cleaned = text.strip().replace(",", "").replace("$", "").replace("%", "").replace("\u2212", "-").strip()
    if not _PLAIN_NUMBER_RE.fullmatch(cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    # format(..., "f") keeps plain notation where str() could switch to 1E-7 style.
    return format(value.normalize(), "f")


def extract_strict(text: str) -> str | None:
    """Return the normalised number right after the last ``####`` marker, or None."""
    if ANSWER_MARKER not in text:
        return None
    tail = text.rsplit(ANSWER_MARKER, 1)[1]
    match = _STRICT_TAIL_RE.match(tail)
    return normalize_number(match.group(1)) if match else None


def normalize_text(text: str) -> str:
    """Return ``text`` with every run of whitespace made one space and the ends stripped."""
    return " ".join(text.split())


def extract_exact(text: str) -> str | None:
    """Return the normalised text after the last ``####`` marker, up to the end of its line, or None.

    Whitespace right after the marker (a line break included) is skipped, so the answer line
    is the first non-blank one after it. None when there is no marker or nothing follows it.
    """
    if ANSWER_MARKER not in text:
        return None
    tail = text.rsplit(ANSWER_MARKER, 1)[1]
    line = tail.lstrip().split("\n", 1)[0]
    return normalize_text(line) or None


def _last_boxed(text: str) -> str | None:
    # \boxed{} content can nest braces (\frac{1}{2}), which a regex cannot balance.
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for position in range(begin - 1, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:position].strip()
    return None


def extract_flexible(text: str) -> str | None:
    """Return the most plausible final answer in ``text``, or None if there is none.

    Tried in order: the ``####`` marker, the last ``\\boxed{...}`` (its content,
    normalised if it is a plain number, else verbatim LaTeX), the last "the
    answer is N", and finally the last number anywhere in the text.
    """
    strict = extract_strict(text)
    if strict is not None:
        return strict
    boxed = _last_boxed(text)
    if boxed:
        return normalize_number(boxed) or boxed
    stated = _ANSWER_IS_RE.findall(text)
    if stated:
        return normalize_number(stated[-1])
    numbers = _NUMBER_RE.findall(text)
    for candidate in reversed(numbers):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def parse_gold_answer(answer: str, *, source: str = "record", index: int | None = None) -> str:
    """Normalise a ``####``-style gold answer, raising :class:`RecordError` if it is not a number."""
    value = normalize_number(answer) if isinstance(answer, str) else None
    if value is None:
        raise RecordError(
            f"answer {answer!r} of {describe_location(source, index)} cannot be parsed as a number: "
            "GSM8K-style tasks need a numeric final answer such as '72', '-3' or '1,234.5'; "
            "fix the record's answer, or grade the task with mode='math' if its answers are LaTeX"
        )
    return value


def _wrap_gold_latex(gold: str) -> str:
    # math-verify only extracts LaTeX that is delimited; a bare "\frac{1}{2}" is wrapped in $...$.
    if "$" in gold or "\\boxed" in gold or "\\(" in gold or "\\[" in gold:
        return gold
    return f"${gold}$"


def _grade_math(prediction_text: str, gold_answer: str) -> bool:
    # Imported here so the numeric modes work without math-verify's sympy start-up cost.
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which only the main thread may use and
    # which raises elsewhere; other threads (e.g. evaluation workers) run without a timeout.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_wrap_gold_latex(gold_answer), parsing_timeout=timeout)
    prediction = parse(prediction_text, parsing_timeout=timeout)
    if not gold or not prediction:
        return False
    return bool(verify(gold, prediction, timeout_seconds=timeout))


def grade(prediction_text: str, gold_answer: str, *, mode: GradeMode = "strict") -> bool:
    """Return whether ``prediction_text`` states ``gold_answer``.

    ``strict`` and ``flexible`` compare numbers by value (``72`` equals
    ``72.0``); the gold answer must then be a number. ``math`` compares LaTeX
    expressions symbolically with math-verify. ``exact`` compares the text
    after the marker with the gold answer, whitespace normalised.
    """
    if mode == "math":
        return _grade_math(prediction_text, gold_answer)
    if mode == "exact":
        gold_text = normalize_text(gold_answer) if isinstance(gold_answer, str) else ""
        if not gold_text:
            raise ValueError(
                f"gold answer {gold_answer!r} is empty, so mode='exact' has nothing to compare with: "
                "pass the record's answer text"
            )
        return extract_exact(prediction_text) == gold_text
    if mode not in GRADE_MODES:
        raise ValueError(f"unknown grading mode {mode!r}: use one of {', '.join(GRADE_MODES)}")
    gold = normalize_number(gold_answer)
    if gold is None:
        raise ValueError(
            f"gold answer {gold_answer!r} is not a number, so mode={mode!r} cannot grade against it: "
            "pass the numeric answer (e.g. '72'), or use mode='math' for LaTeX answers "
            "or mode='exact' for answers that are words"
        )
    predicted = extract_strict(prediction_text) if mode == "strict" else extract_flexible(prediction_text)
    if predicted is None:
        return False
    predicted_number = normalize_number(predicted)
    return predicted_number is not None and Decimal(predicted_number) == Decimal(gold)
