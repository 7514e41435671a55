"""Synthetic tasks: small, learnable and verifiable records made on the spot (no files, no network).

    arithmetic(3)        # [{"prompt": "What is 37 + 5?", "completion": "42", "answer": "42"}, ...]
    arithmetic_pairs(3)  # [{"prompt": "What is 37 + 5?", "chosen": "42", "rejected": "43", "answer": "42"}, ...]
    arithmetic_kto(3)    # [{"prompt": ..., "completion": "42" or a wrong result, "label": True or False}, ...]
    parity_pairs(3)      # [{"prompt": "Is 4817 even or odd? Its last digit is 7: ", "chosen": "odd", ...}, ...]

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


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong result: off by 1 to 9 either way (so its last digit differs), never negative."""
    value = int(answer)
    return str(value + rng.choice([d for d in range(-9, 10) if d and value + d >= 0]))


def arithmetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` preference records: the arithmetic problems with the right result chosen and a wrong one rejected."""
    rng = random.Random(seed + 1_000_003)
    return [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": wrong_answer(r["answer"], rng),
             "answer": r["answer"]} for r in arithmetic(n, seed)]


def arithmetic_kto(n: int, seed: int = 0) -> list[dict]:
    """`n` unpaired (KTO) records: each problem with the right result (label true) or a wrong one (false)."""
    rng = random.Random(seed + 2_000_003)
    out = []
    for r in arithmetic(n, seed):
        good = rng.random() < 0.5
        out.append({"prompt": r["prompt"], "completion": r["answer"] if good else wrong_answer(r["answer"], rng),
                    "label": good, "answer": r["answer"]})
    return out


def parity_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` preference records: say whether a number (its last digit given) is even or odd, the right word chosen.
    Small models learn it in a few hundred steps (a reward model or DPO sanity task)."""
    rng = random.Random(seed + 3_000_017)
    out = []
    for _ in range(n):
        x = rng.randint(0, 9999)
        right, wrong = ("even", "odd") if x % 2 == 0 else ("odd", "even")
        out.append({"prompt": f"Is {x} even or odd? Its last digit is {x % 10}: ", "chosen": right,
                    "rejected": wrong, "answer": right})
    return out
