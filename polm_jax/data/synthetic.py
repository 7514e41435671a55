"""Synthetic tasks: small, learnable and verifiable records made on the spot (no files, no network).

    arithmetic(3)  # [{"prompt": "What is 37 + 5?", "completion": "42", "answer": "42"}, ...]

`answer` is the ground truth a reward function checks (RL); `completion` is the SFT target.
"""

from __future__ import annotations

import random

OPERATIONS = ("+", "-", "*")
ADD_MAX = 99  # operands of + and - are in [0, ADD_MAX]
MUL_MAX = 12  # operands of * are in [0, MUL_MAX]


def arithmetic(n: int, seed: int = 0) -> list[dict]:
    """`n` records {"prompt": "What is A op B?", "completion": str(result), "answer": str(result)}.

    op is +, - or * (equally likely); subtraction puts the larger operand first, so every answer is
    a non-negative integer of at most 3 digits. Deterministic in (n, seed), and the first k records
    are the same for every n >= k. Prompt and completion together are at most 19 bytes.
    """
    if n < 0:
        raise ValueError(f"arithmetic: n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


def _problem(rng: random.Random) -> dict:
    op = rng.choice(OPERATIONS)
    top = MUL_MAX if op == "*" else ADD_MAX
    a, b = rng.randint(0, top), rng.randint(0, top)
    if op == "-" and a < b:
        a, b = b, a
    result = str(a + b if op == "+" else a - b if op == "-" else a * b)
    return {"prompt": f"What is {a} {op} {b}?", "completion": result, "answer": result}
