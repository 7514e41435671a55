"""Evaluation metrics over sampled answers: exact match, the unbiased pass@k estimator, majority vote (maj@k).

    pass_at_k(n=16, c=3, k=8)                      # P(at least one of 8 drawn from the 16 samples is correct)
    majority_vote(["12", "12.0", "13", None])      # "12" (votes are counted on normalised answers)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from polm_jax.errors import ConfigError
from polm_jax.eval.answers import answer_key, answers_match

_METRIC = re.compile(r"exact_match|(pass|maj)@([1-9]\d*)")


def parse_metric(metric: str) -> tuple[str, int]:
    """"exact_match" -> ("exact_match", 1); "pass@8" -> ("pass", 8); "maj@16" -> ("maj", 16); else ConfigError."""
    match = _METRIC.fullmatch(metric)
    if not match:
        raise ConfigError(f"metric: expected exact_match, pass@K or maj@K (K >= 1), e.g. pass@8; got {metric!r}")
    return (match[1], int(match[2])) if match[1] else ("exact_match", 1)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as a running product (no large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (compared normalised, see answers.answer_key); ties go to the one seen first;
    None answers do not vote. Returns the first answer of the winning group, or None if none voted."""
    keys = [answer_key(a) for a in answers]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return None
    winner = votes.most_common(1)[0][0]
    return answers[keys.index(winner)]


def prompt_metrics(answers: Sequence[str | None], gold: str, k: int) -> dict[str, float]:
    """One prompt's figures from its n sampled answers: exact_match (mean over samples), pass@k (k <= n) and maj@k
    (the vote of the first k samples)."""
    correct = [answers_match(a, gold) for a in answers]
    return {"exact_match": sum(correct) / len(correct), f"pass@{k}": pass_at_k(len(correct), sum(correct), k),
            f"maj@{k}": float(answers_match(majority_vote(answers[:k]), gold))}


def mean_metrics(per_prompt: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each figure over prompts."""
    if not per_prompt:
        return {}
    return {name: sum(m[name] for m in per_prompt) / len(per_prompt) for name in per_prompt[0]}
