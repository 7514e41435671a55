"""Final answers: extraction from model text and gold fields, numeric normalisation, matching. Pure and fast (these
are also RL reward functions); model text is only ever matched by regular expressions, never evaluated.

    extract_answer("... so she has 7 + 5 = 12 apples.\\n#### 12")   # "12"   (GSM8K marker)
    extract_answer("the area is \\\\boxed{\\\\frac{1}{2}}")           # "\\\\frac{1}{2}"
    normalize_number("1,000.50")                                    # "1000.5"
    answers_match("\\\\frac{1}{2}", "0.5")                            # True
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_ANSWER_CHARS = 200  # longer strings are not read as numbers (keeps reward functions fast on junk)

_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"  # 1,000 thousands separators only; 3.50; .5
_LAST_NUMBER = re.compile(rf"[-+]?(?:{_NUMBER})(?:\s*/\s*(?:{_NUMBER}))?")
_LEADING_NUMBER = re.compile(rf"\\?\$?\s*({_LAST_NUMBER.pattern})(?![\d,/]|\.\d)")  # "#### $1,000 apples" -> 1,000
_PLAIN = re.compile(rf"[-+]?(?:{_NUMBER})")
_SLASH = re.compile(rf"([-+]?(?:{_NUMBER}))/((?:{_NUMBER}))")
_FRAC = re.compile(r"([-+]?)\\[dt]?frac(?:\{([-+]?[\d.]+)\}\{([-+]?[\d.]+)\}|(\d)(\d))")  # \frac{1}{2}, \dfrac12
_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}|\^\{?\\circ\}?")  # \text{ cm}, ^\circ: dropped
_DECORATION = re.compile(r"\\[$%!,;: ]|[$%\s~]")  # \$ \% LaTeX spaces, $ %, whitespace


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The final answer in model text: after the last GSM8K `####` (the number starting its line, else the line),
    else the content of the last `\\boxed{...}` (nested braces kept), else (when `last_number`) the last number in
    the text; else None."""
    marker = text.rfind("####")
    if marker >= 0:
        line = text[marker + 4:].strip().split("\n", 1)[0].strip()
        number = _LEADING_NUMBER.match(line)
        if number or line:
            return number[1].replace(" ", "") if number else line
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if last_number:
        numbers = _LAST_NUMBER.findall(text)
        return numbers[-1].replace(" ", "") if numbers else None
    return None


def gold_answer(text: str) -> str:
    """The reference answer of a gold field: its `####` or `\\boxed{}` answer when it has one, else the whole text."""
    return extract_answer(text, last_number=False) or text.strip()


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} with balanced braces, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1: i].strip()
    return None  # unbalanced: the answer was cut off


def normalize_number(text: str) -> str | None:
    """A canonical string of a number written as an integer, decimal, `a/b` or `\\frac{a}{b}` (with $, %, commas,
    units in \\text{} allowed), or None: whole numbers as integers ("-0" -> "0"), terminating fractions as
    decimals without trailing zeros ("3.50" -> "3.5", "1/2" -> "0.5"), others as reduced "p/q"."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    s = _DECORATION.sub("", _UNIT.sub("", text)).rstrip(".")
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    value = _fraction(s)
    return None if value is None else _canonical(value)


def _fraction(s: str) -> Fraction | None:
    """The exact value of a plain number, a/b or \\frac, or None."""
    try:
        if _PLAIN.fullmatch(s):
            return Fraction(s.replace(",", ""))
        if match := _SLASH.fullmatch(s):
            return Fraction(match[1].replace(",", "")) / Fraction(match[2].replace(",", ""))
        if match := _FRAC.fullmatch(s):
            sign, num, den = match[1], match[2] or match[4], match[3] or match[5]
            value = Fraction(num) / Fraction(den)
            return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _canonical(value: Fraction) -> str:
    """Integer, exact decimal (denominator of 2s and 5s only) or "p/q"."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    whole, frac = digits[:-places], digits[-places:].rstrip("0")
    return f"{'-' if value < 0 else ''}{whole}.{frac}"


def _normalize_text(text: str) -> str:
    return " ".join(text.strip().rstrip(".").lower().split())


def answer_key(answer: str | None) -> str | None:
    """The form answers are compared (and voted) in: the canonical number when it is one, else lower-cased text
    with whitespace collapsed and a final period dropped."""
    if answer is None:
        return None
    number = normalize_number(answer)
    return number if number is not None else _normalize_text(answer)


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Whether an extracted answer equals the gold one: numerically when both are numbers, else as normalised text."""
    return pred is not None and gold is not None and answer_key(pred) == answer_key(gold)
