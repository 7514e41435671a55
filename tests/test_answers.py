"""Final-answer extraction, numeric normalisation and matching, and the eval metrics (pass@k, maj@k)."""

import itertools
import math
from fractions import Fraction

import pytest

from polm_jax.errors import ConfigError
from polm_jax.eval.answers import (
    answers_match,
    extract_answer,
    gold_answer,
    normalize_number,
)
from polm_jax.eval.metrics import majority_vote, parse_metric, pass_at_k, prompt_metrics


@pytest.mark.parametrize("text, expected", [
    ("She has 5 + 7 = 12 apples.\n#### 12", "12"),
    ("#### 1,000\nand then more text", "1,000"),
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}} is the height", "\\dfrac{\\sqrt{3}}{2}"),  # nested braces
    ("first \\boxed{1}, finally \\boxed{2}", "2"),  # the last box
    ("#### 5 and also \\boxed{6}", "5"),  # the GSM8K marker first, the number starting its line
    ("#### $1,000.50. Done", "1,000.50"),
    ("#### 1,00 apples", "1,00 apples"),  # not a well-formed number: the whole line
    ("#### \\frac{1}{2}", "\\frac{1}{2}"),
    ("cut off: \\boxed{12", "12"),  # an unbalanced box: the last number
    ("I think it is 3.5, or maybe -4.", "-4"),
    ("it costs $1,234.50 in total", "1,234.50"),
    ("use 1 / 2 cup", "1/2"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_number_fallback_can_be_turned_off():
    assert extract_answer("the answer is 7", last_number=False) is None
    assert extract_answer("#### 7", last_number=False) == "7"


def test_gold_answer_takes_the_marker_or_the_whole_field():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gold_answer(" 42 ") == "42"
    assert gold_answer("\\boxed{x^2}") == "x^2"


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"), ("3.50", "3.5"), ("-0", "0"), ("-0.0", "0"), ("007", "7"), ("+5", "5"), (".5", "0.5"),
    ("\\frac{1}{2}", "0.5"), ("1/2", "0.5"), ("\\dfrac{2}{6}", "1/3"), ("2/6", "1/3"), ("-\\frac{3}{4}", "-0.75"),
    ("\\frac12", "0.5"), ("-1/3", "-1/3"), ("$42", "42"), ("\\$42.", "42"), ("50\\%", "50"), ("5\\text{ cm}", "5"),
    ("1 000", "1000"), ("{12}", "12"), ("12,345,678.90", "12345678.9"),
    ("1,00", None), ("1/0", None), ("\\frac{1}{0}", None), ("1e5", None), ("abc", None), ("x = 5", None),
    ("1" * 500, None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("12", "12.0", True), ("0.5", "\\frac{1}{2}", True), ("1,000", "1000", True), ("Paris", "paris.", True),
    ("13", "12", False), (None, "12", False), ("12", None, False), ("1/3", "0.33", False), ("x^2", "x^2", True),
])
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample():
    for n in range(1, 7):
        for c in range(n + 1):
            flags = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(flags, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_many_samples():
    exact = 1 - Fraction(math.comb(197, 100), math.comb(200, 100))
    assert pass_at_k(200, 3, 100) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def test_majority_vote_counts_normalised_answers():
    assert majority_vote(["13", "12", "12.0", None, None]) == "12"
    assert majority_vote(["a", "b"]) == "a"  # a tie goes to the first seen
    assert majority_vote([None, None]) is None


def test_prompt_metrics():
    answers = ["1", "2", "2.0", "3"]
    assert prompt_metrics(answers, "2", 4) == {"exact_match": 0.5, "pass@4": 1.0, "maj@4": 1.0}
    assert prompt_metrics(answers, "2", 1)["maj@1"] == 0.0  # the first sample alone is wrong
    assert prompt_metrics(answers, "2", 2)["pass@2"] == pytest.approx(1 - 1 / 6)


def test_parse_metric():
    assert parse_metric("exact_match") == ("exact_match", 1)
    assert parse_metric("pass@8") == ("pass", 8)
    assert parse_metric("maj@16") == ("maj", 16)
    for bad in ("pass@0", "pass@", "accuracy", "maj@-1"):
        with pytest.raises(ConfigError, match="expected exact_match, pass@K or maj@K"):
            parse_metric(bad)
