"""RL reward functions (math answer, format, soft overlong), their resolution by name, and RewardSet: weights,
None, and functions that raise, hang past the timeout or return malformed lists."""

import logging
import math
import threading
import time

import numpy as np
import pytest

from polm_jax.algorithms.rl.rewards import (
    RewardSet,
    format_reward,
    math_answer,
    metrics,
    resolve_reward,
    soft_overlong,
)
from polm_jax.errors import ConfigError, DataError


@pytest.mark.parametrize("completion, gold, expected", [
    ("She has 5 + 7 = 12 apples.\n#### 12", "12", 1.0),
    ("She has 5 + 7 = 13 apples.\n#### 13", "12", 0.0),
    ("I cannot tell.", "12", 0.0),  # no answer at all
    ("The total is\n#### 1,000", "1000", 1.0),
    ("#### 1000", "Natalia sold 500 + 500 = 1,000 clips.\n#### 1,000", 1.0),  # a GSM8K gold rationale
    ("so x = \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("the answer is 0.5", "1/2", 1.0),
    ("the answer is \\boxed{0.25}", "1/2", 0.0),
    ("the answer is \\boxed{\\text{blue}}", "\\boxed{\\text{blue}}", 1.0),  # non-numeric: compared as text
    ("#### 7", 7, 1.0),  # a numeric gold column
    ("#### 7", None, None),  # no gold answer: not applicable
    ("#### 7", "  ", None),
])
def test_math_answer(completion, gold, expected):
    assert math_answer(["q"], [completion], answer=[gold], completion_ids=[[1, 2]], truncated=[False]) == [expected]


@pytest.mark.parametrize("completion, expected", [
    ("<think>2 + 2 = 4</think><answer>4</answer>", 1.0),
    ("  <think>line one\nline two</think>\n\n<answer>\n4\n</answer>\n", 1.0),  # multi-line, whitespace around
    ("<think>no answer tag</think> 4", 0.0),
    ("<answer>4</answer><think>late</think>", 0.0),
    ("<think>x</think><answer>4</answer> and then more text", 0.0),
    ("4", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward()(["q"], [completion]) == [expected]


def test_format_reward_takes_a_pattern():
    boxed_only = format_reward(r".*\\boxed\{.+\}\.?")
    assert boxed_only(["q", "q"], ["so \\boxed{3}.", "so 3."]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"pattern '<think>\(' is not a valid regular expression"):
        format_reward("<think>(")


def test_soft_overlong_at_the_boundaries():
    penalty = soft_overlong(max_completion_length=10, cache_length=4)  # free up to 6 tokens, -1 from 10
    lengths = [0, 6, 7, 8, 9, 10, 11, 50]
    ids = [list(range(n)) for n in lengths]
    got = penalty(["q"] * len(ids), ["c"] * len(ids), completion_ids=ids, truncated=[False] * len(ids))
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    for cache in (0, 11):
        with pytest.raises(ConfigError, match="0 < cache_length <= max_completion_length"):
            soft_overlong(max_completion_length=10, cache_length=cache)


def _constant(value):
    def reward(prompts, completions, **_):
        return [value] * len(completions)
    return reward


def test_weights_combine_and_columns_reach_the_functions():
    rewards = RewardSet([("math", math_answer, 1.0), ("format", format_reward(), 0.5),
                         ("overlong", soft_overlong(8, 4), 2.0)], timeout_s=5.0)
    completions = ["<think>a</think><answer>#### 3</answer>", "#### 3", "<think>b</think><answer>4</answer>"]
    scores = rewards.score(["p"] * 3, completions, answer=["3", "3", "3"],
                           completion_ids=[[0] * 4, [0] * 6, [0] * 9], truncated=[False, False, True])
    assert scores.failures == {}
    np.testing.assert_array_equal(scores.per_function["math"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(scores.per_function["format"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(scores.per_function["overlong"], [0.0, -0.5, -1.0])
    assert scores.total.dtype == np.float32
    np.testing.assert_allclose(scores.total, [1.5, 0.0, -1.5])
    figures = metrics(scores)
    assert figures["rewards/math/mean"] == pytest.approx(2 / 3)
    assert figures["rewards/overlong/std"] == pytest.approx(np.std([0.0, -0.5, -1.0]))
    assert figures["reward/mean"] == pytest.approx(0.0)
    assert figures["reward/std"] == pytest.approx(np.std([1.5, 0.0, -1.5]))
    assert figures["reward_failures/format"] == 0.0


def test_none_scores_nan_per_function_and_zero_in_total():
    rewards = RewardSet([("math", math_answer, 1.0), ("one", _constant(1.0), 1.0)])
    scores = rewards.score(["p"] * 3, ["#### 2", "#### 2", "#### 5"], answer=["2", None, "2"])
    np.testing.assert_array_equal(scores.per_function["math"], [1.0, np.nan, 0.0])
    np.testing.assert_array_equal(scores.total, [2.0, 1.0, 1.0])
    assert scores.failures == {}
    figures = metrics(scores)
    assert figures["rewards/math/mean"] == pytest.approx(0.5)  # over the two applicable rows
    assert figures["rewards/math/std"] == pytest.approx(0.5)


def test_a_function_that_raises_scores_zero_is_counted_and_logged(caplog):
    def broken(prompts, completions, **_):
        raise ValueError("bad regex in user code")

    rewards = RewardSet([("broken", broken, 1.0), ("one", _constant(1.0), 0.5)])
    with caplog.at_level(logging.WARNING, logger="polm_jax.algorithms.rl.rewards"):
        scores = rewards.score(["p", "p"], ["a", "b"])
    assert scores.failures == {"broken": "raised: ValueError: bad regex in user code"}
    assert np.isnan(scores.per_function["broken"]).all()
    np.testing.assert_array_equal(scores.per_function["one"], [1.0, 1.0])
    np.testing.assert_array_equal(scores.total, [0.5, 0.5])
    assert "'broken'" in caplog.text and "bad regex in user code" in caplog.text
    rewards.score(["p"], ["a"])
    assert rewards.failure_counts == {"broken": 2, "one": 0}
    figures = metrics(scores)
    assert figures["reward_failures/broken"] == 1.0 and math.isnan(figures["rewards/broken/mean"])


def test_a_function_that_hangs_times_out_and_is_not_called_again_while_hung():
    release, calls = threading.Event(), []

    def hangs_once(prompts, completions, **_):
        calls.append(len(completions))
        if len(calls) == 1:
            release.wait(5.0)  # as good as sleeping 5 s, but the test can end it early
        return [2.0] * len(completions)

    rewards = RewardSet([("slow", hangs_once, 1.0), ("one", _constant(1.0), 1.0)], timeout_s=0.2)
    try:
        start = time.perf_counter()
        scores = rewards.score(["p", "p"], ["a", "b"])
        assert time.perf_counter() - start < 2.0
        assert scores.failures == {"slow": "timed out after 0.2s"}
        np.testing.assert_array_equal(scores.total, [1.0, 1.0])  # the others still scored
        again = rewards.score(["p"], ["a"])  # the first call still runs: not called a second time
        assert again.failures == {"slow": "still running from an earlier call that timed out"}
        assert calls == [2] and rewards.failure_counts["slow"] == 2
    finally:
        release.set()
    deadline = time.perf_counter() + 5.0
    while rewards.score(["p"], ["a"]).failures and time.perf_counter() < deadline:
        time.sleep(0.01)  # the hung call returns; then the function is called again
    assert rewards.score(["p"], ["a"]).per_function["slow"].tolist() == [2.0]


@pytest.mark.parametrize("output, reason", [
    ([1.0], "returned 1 values for 3 completions"),
    ([1.0, float("nan"), 0.0], "returned a non-finite value at index 1: nan"),
    ([1.0, 0.0, float("inf")], "returned a non-finite value at index 2: inf"),
    ([1.0, "1.0", 0.0], "returned a non-number at index 1: str '1.0'"),
    (1.0, "returned a value of type float, not a list of 3 values"),
    (np.array(1.0), "returned a value of type ndarray, not a list of 3 values"),
    ([1.0, 10**400, 0.0], "returned a non-finite value at index 1: inf"),
])
def test_malformed_outputs_are_failures(output, reason):
    rewards = RewardSet([("bad", lambda prompts, completions, **_: output, 1.0), ("one", _constant(1.0), 1.0)])
    scores = rewards.score(["p"] * 3, ["a", "b", "c"])
    assert scores.failures == {"bad": reason}
    assert np.isnan(scores.per_function["bad"]).all()
    np.testing.assert_array_equal(scores.total, [1.0, 1.0, 1.0])
    assert rewards.failure_counts["bad"] == 1


def test_numpy_and_bool_outputs_are_numbers():
    rewards = RewardSet([("np", _constant(np.float64(0.5)), 1.0), ("bool", _constant(True), 1.0),
                         ("array", lambda prompts, completions, **_: np.arange(len(completions)), 1.0)])
    scores = rewards.score(["p", "p"], ["a", "b"])
    assert scores.failures == {}
    np.testing.assert_array_equal(scores.total, [1.5, 2.5])


def test_reward_set_rejects_bad_setup_and_misaligned_columns():
    with pytest.raises(ConfigError, match="names must be unique"):
        RewardSet([("a", math_answer, 1.0), ("a", math_answer, 1.0)])
    with pytest.raises(ConfigError, match="'a' has weight nan"):
        RewardSet([("a", math_answer, float("nan"))])
    with pytest.raises(ConfigError, match=r"'a' is not callable \(type str\)"):
        RewardSet([("a", "math", 1.0)])
    with pytest.raises(ConfigError, match="timeout_s must be a positive number"):
        RewardSet([("a", math_answer, 1.0)], timeout_s=0)
    with pytest.raises(DataError, match=r"'answer' must have one entry per completion \(2\), got 1 entries"):
        RewardSet([("a", math_answer, 1.0)]).score(["p", "p"], ["a", "b"], answer=["1"])


def test_resolve_builtins_by_name():
    assert resolve_reward("math", max_completion_length=9) is math_answer  # options it does not use are ignored
    assert resolve_reward("format", format_pattern="x+")(["q", "q"], ["xx", "y"]) == [1.0, 0.0]
    overlong = resolve_reward("overlong", max_completion_length=4, overlong_cache_length=2)
    assert overlong(["q"], ["c"], completion_ids=[[0, 0, 0]]) == [-0.5]
    with pytest.raises(ConfigError, match="reward 'overlong': needs the options max_completion_length"):
        resolve_reward("overlong", max_completion_length=4)
    with pytest.raises(ConfigError, match="reward 'reward_model': needs the option reward_model"):
        resolve_reward("reward_model")


CUSTOM = '''
LIMIT = 3

def short(prompts, completions, **kwargs):
    return [float(len(c) <= LIMIT) for c in completions]

def no_kwargs(prompts, completions):
    return [0.0] * len(completions)
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "polm_test_custom_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "polm_test_custom_rewards"


def test_resolve_a_module_function(custom_module):
    short = resolve_reward(f"{custom_module}:short")
    scores = RewardSet([("short", short, 1.0)]).score(["p", "p"], ["abc", "abcd"], answer=["1", "2"])
    np.testing.assert_array_equal(scores.total, [1.0, 0.0])


@pytest.mark.parametrize("spec, message", [
    ("maths", r"reward 'maths': unknown; use one of math, format, overlong, reward_model or 'package.module:f"),
    (":short", r"reward ':short': unknown"),
    ("{module}:", r"reward '{module}:': unknown"),
    ("polm_no_such_module_xyz:short", r"cannot import module 'polm_no_such_module_xyz' \(ModuleNotFoundError"),
    ("{module}:missing", r"reward '{module}:missing': module '{module}' \(.*\) has no 'missing'"),
    ("{module}:LIMIT", r"reward '{module}:LIMIT': 'LIMIT' is not callable \(type int\)"),
    ("{module}:no_kwargs", r"reward '{module}:no_kwargs': must accept \*\*kwargs"),
])
def test_resolve_rejects_bad_specs(custom_module, spec, message):
    with pytest.raises(ConfigError, match=message.format(module=custom_module)):
        resolve_reward(spec.format(module=custom_module))
