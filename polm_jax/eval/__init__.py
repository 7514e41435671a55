"""Evaluation: final-answer extraction and matching (also RL reward functions), exact match / pass@k / maj@k, and
the `polm eval` runner (run.py)."""

from polm_jax.eval.answers import (
    answers_match,
    extract_answer,
    gold_answer,
    normalize_number,
)
from polm_jax.eval.metrics import majority_vote, pass_at_k

__all__ = ["answers_match", "extract_answer", "gold_answer", "majority_vote", "normalize_number", "pass_at_k"]
