"""Reward functions for RL and the set that scores a batch with them: weighted, each call under a timeout.

A reward function follows TRL's convention, `fn(prompts, completions, **kwargs) -> list[float | None]`: kwargs are
the dataset's other columns (each a list with one entry per completion, e.g. `answer=[...]`) plus `completion_ids`
(token-id lists) and `truncated` (bools); None means "not applicable to this completion". A function must accept
**kwargs. Model text is only ever matched by regular expressions, never evaluated.

    rewards = RewardSet([("math", math_answer, 1.0), ("format", format_reward(), 0.2)], timeout_s=10.0)
    scores = rewards.score(prompts, completions, answer=golds, completion_ids=ids, truncated=cut)
    scores.total                  # np.float32 [n]: the weighted sum, None and failures counting 0
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from polm_jax.errors import ConfigError, DataError
from polm_jax.eval.answers import answers_match, extract_answer, gold_answer

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]

THINK_ANSWER = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


def math_answer(prompts: list, completions: list[str], answer: list, **_) -> list[float | None]:
    """1.0 where the completion's final answer (`####`, `\\boxed{}`, else its last number) equals the gold `answer`
    (numerically when both are numbers), else 0.0; None where the record has no gold answer. [n] -> [n]."""
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        if gold is None or not str(gold).strip():
            scores.append(None)
        else:
            scores.append(float(answers_match(extract_answer(completion), gold_answer(str(gold)))))
    return scores


def format_reward(pattern: str = THINK_ANSWER) -> RewardFn:
    """A reward fn scoring 1.0 where the whole completion matches `pattern` (re.fullmatch, DOTALL), else 0.0; the
    default is `<think>...</think>` then `<answer>...</answer>`, whitespace around them allowed."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"format reward: pattern {pattern!r} is not a valid regular expression: {e}") from None

    def format_match(prompts: list, completions: list[str], **_) -> list[float]:
        return [float(compiled.fullmatch(completion) is not None) for completion in completions]

    return format_match


def soft_overlong(max_completion_length: int, cache_length: int) -> RewardFn:
    """DAPO's soft overlong punishment in tokens, L = len(completion_ids[i]): 0 if L <= Lmax - Lcache, then
    ((Lmax - Lcache) - L) / Lcache falling linearly to -1 at Lmax, -1 beyond. [n] -> [n]."""
    if not 0 < cache_length <= max_completion_length:
        raise ConfigError(f"soft overlong reward: needs 0 < cache_length <= max_completion_length, got "
                          f"cache_length={cache_length}, max_completion_length={max_completion_length}")
    free = max_completion_length - cache_length

    def overlong_penalty(prompts: list, completions: list[str], completion_ids: list, **_) -> list[float]:
        lengths = [len(ids) for ids in completion_ids]
        return [0.0 if n <= free else -1.0 if n > max_completion_length else (free - n) / cache_length
                for n in lengths]

    return overlong_penalty


def _math(**_options) -> RewardFn:
    return math_answer


def _format(*, format_pattern: str = THINK_ANSWER, **_options) -> RewardFn:
    return format_reward(format_pattern)


def _overlong(*, max_completion_length: int | None = None, overlong_cache_length: int | None = None,
              **_options) -> RewardFn:
    if max_completion_length is None or overlong_cache_length is None:
        raise ConfigError("reward 'overlong': needs the options max_completion_length and overlong_cache_length "
                          f"(got max_completion_length={max_completion_length}, "
                          f"overlong_cache_length={overlong_cache_length})")
    return soft_overlong(max_completion_length, overlong_cache_length)


REWARDS: dict[str, Callable[..., RewardFn]] = {"math": _math, "format": _format, "overlong": _overlong}


def resolve_reward(spec: str, **options) -> RewardFn:
    """The reward fn named by `spec`: a REWARDS name (each reads the options it needs from `options` and ignores the
    rest), "reward_model" (a trained RM, checkpoint path in options["reward_model"]), or "package.module:function"
    (that function itself, imported)."""
    if spec in REWARDS:
        return REWARDS[spec](**options)
    if spec == "reward_model":
        if not options.get("reward_model"):
            raise ConfigError("reward 'reward_model': needs the option reward_model, the reward model checkpoint path")
        from polm_jax.recipes.rm import reward_function
        return reward_function(options["reward_model"])
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"reward {spec!r}: unknown; use one of {', '.join([*REWARDS, 'reward_model'])} or "
                          "'package.module:function'")
    return _imported(spec, module_name, attribute)


def _imported(spec: str, module_name: str, attribute: str) -> RewardFn:
    """The callable `attribute` of `module_name`, checked to accept **kwargs; ConfigError naming `spec` if not."""
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                          "is it on the Python path?") from e
    fn = getattr(module, attribute, None)
    if fn is None:
        raise ConfigError(f"reward {spec!r}: module {module_name!r} ({module.__file__}) has no {attribute!r}")
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {attribute!r} is not callable (type {type(fn).__name__})")
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return fn
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise ConfigError(f"reward {spec!r}: must accept **kwargs (dataset columns, completion_ids, truncated), "
                          f"as in def {attribute}(prompts, completions, **kwargs)")
    return fn


class RewardScores(NamedTuple):
    """One batch's rewards: `total` f32 [n] (weighted sum, None/failed = 0), `per_function` {name: f32 [n], NaN
    where None or failed}, `failures` {name: reason} for the functions that failed on this batch."""

    total: np.ndarray
    per_function: dict[str, np.ndarray]
    failures: dict[str, str]


class RewardSet:
    """Weighted reward functions, each called in its own daemon thread and awaited at most `timeout_s`.

    A function that raises, runs past the timeout or returns a malformed list scores 0 for the whole batch (NaN in
    per_function), is logged and counted in `failure_counts`, and the run goes on. A Python thread cannot be killed:
    a hung call keeps running in the background (sharing the GIL) until it returns, and while it does its function
    is not called again (each later batch counts a failure at once), so hung calls never pile up. Functions run one
    after another, so a batch takes at most len(functions) * timeout_s.
    """

    def __init__(self, functions: Sequence[tuple[str, RewardFn, float]], *, timeout_s: float = 60.0):
        names = [name for name, _, _ in functions]
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards: names must be unique, got {names}")
        for name, fn, weight in functions:
            if not callable(fn):
                raise ConfigError(f"rewards: {name!r} is not callable (type {type(fn).__name__})")
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ConfigError(f"rewards: {name!r} has weight {weight!r}; a weight must be a finite number")
        if not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < math.inf:
            raise ConfigError(f"rewards: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.functions = list(functions)
        self.timeout_s = float(timeout_s)
        self.failure_counts = dict.fromkeys(names, 0)
        self._hung: dict[str, threading.Thread] = {}

    def score(self, prompts: Sequence, completions: Sequence[str], **kwargs) -> RewardScores:
        """Every function's rewards for n completions and their weighted sum; kwargs (columns, completion_ids,
        truncated) are passed on to each function and must each have one entry per completion."""
        n = len(completions)
        for column, values in {"prompts": prompts, **kwargs}.items():
            if not hasattr(values, "__len__") or len(values) != n:
                got = f"{len(values)} entries" if hasattr(values, "__len__") else f"a {type(values).__name__}"
                raise DataError(f"rewards: {column!r} must have one entry per completion ({n}), got {got}")
        total = np.zeros(n, np.float64)
        per_function, failures = {}, {}
        for name, fn, weight in self.functions:
            values, failure = self._call(name, fn, prompts, completions, kwargs)
            if failure is not None:
                failures[name] = failure
                self.failure_counts[name] += 1
                values = np.full(n, np.nan)
            per_function[name] = values.astype(np.float32)
            total += weight * np.nan_to_num(values, nan=0.0)
        return RewardScores(total.astype(np.float32), per_function, failures)

    def _call(self, name: str, fn: RewardFn, prompts, completions, kwargs) -> tuple[np.ndarray | None, str | None]:
        """fn's rewards as f64 [n] (NaN for None) and None, or None and why it failed (already logged)."""
        earlier = self._hung.get(name)
        if earlier is not None and earlier.is_alive():
            return None, self._failed(name, len(completions), "still running from an earlier call that timed out")
        outcome = {}

        def run():
            try:
                outcome["values"] = fn(prompts, completions, **kwargs)
            except BaseException as e:  # noqa: BLE001 (whatever user code raises, sys.exit too, scores 0)
                outcome["error"] = e

        thread = threading.Thread(target=run, name=f"reward-{name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            self._hung[name] = thread
            return None, self._failed(name, len(completions), f"timed out after {self.timeout_s:g}s")
        if "error" in outcome:
            error = outcome["error"]
            reason = f"raised: {type(error).__name__}: {error}"
            return None, self._failed(name, len(completions), reason, error)
        values, problem = _checked(outcome["values"], len(completions))
        return (values, None) if problem is None else (None, self._failed(name, len(completions), problem))

    @staticmethod
    def _failed(name: str, n: int, reason: str, error: BaseException | None = None) -> str:
        log.warning("reward function %r scores 0 on this batch of %d completions: %s", name, n, reason,
                    exc_info=error)
        return reason


def _checked(values, n: int) -> tuple[np.ndarray | None, str | None]:
    """A reward fn's output as f64 [n] (None -> NaN), or None and what is wrong with it."""
    if not isinstance(values, list | tuple | np.ndarray) or getattr(values, "ndim", 1) == 0:
        return None, f"returned a value of type {type(values).__name__}, not a list of {n} values"
    if len(values) != n:
        return None, f"returned {len(values)} values for {n} completions"
    out = np.full(n, np.nan)
    for i, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, numbers.Real | np.bool_):
            return None, f"returned a non-number at index {i}: {type(value).__name__} {str(value)[:50]!r}"
        try:
            out[i] = float(value)
        except OverflowError:  # an int beyond float range
            out[i] = math.inf
        if not math.isfinite(out[i]):
            return None, f"returned a non-finite value at index {i}: {out[i]}"
    return out, None


def metrics(scores: RewardScores) -> dict[str, float]:
    """Figures to log for one batch: rewards/<name>/mean and /std over non-None rewards (NaN if none), reward/mean,
    reward/std of the total, and reward_failures/<name> (1.0 if that function failed on this batch, else 0.0)."""
    out = {}
    for name, values in scores.per_function.items():
        present = values[~np.isnan(values)]
        out[f"rewards/{name}/mean"] = float(present.mean()) if present.size else math.nan
        out[f"rewards/{name}/std"] = float(present.std()) if present.size else math.nan
    out["reward/mean"] = float(scores.total.mean()) if scores.total.size else math.nan
    out["reward/std"] = float(scores.total.std()) if scores.total.size else math.nan
    for name in scores.per_function:
        out[f"reward_failures/{name}"] = float(name in scores.failures)
    return out
