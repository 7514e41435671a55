"""RL advantages, policy and value losses against independent f64 numpy computations, and their gradients."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polm_jax.algorithms.rl.advantages import (
    gae,
    group_advantages,
    group_is_informative,
    whiten,
)
from polm_jax.algorithms.rl.policy_loss import kl_penalty, policy_loss, value_loss

RTOL, ATOL = 1e-5, 1e-5
R, T = 8, 7


def f32(x):
    """x rounded to f32 and back to f64: the jax input, and the exact numbers the f64 reference sees."""
    return np.asarray(x, np.float32).astype(np.float64)


def options(**changes):
    fields = {"epsilon": 0.2, "epsilon_high": None, "dual_clip": None, "importance_sampling_level": "token",
              "loss_type": "grpo", "max_completion_length": T, "beta": 0.0, "kl_estimator": "k3"}
    return types.SimpleNamespace(**(fields | changes))


# ----------------------------------------------------------------------------- advantages


def numpy_group_advantages(rewards, g, kind, scale_rewards, ddof, eps=1e-4):
    """Group by group, element by element, in f64."""
    out = np.empty_like(rewards)
    for start in range(0, len(rewards), g):
        group = rewards[start:start + g]
        for i in range(g):
            if kind == "rloo":
                out[start + i] = group[i] - np.delete(group, i).mean()
            else:
                out[start + i] = group[i] - group.mean()
        if kind == "grpo" and scale_rewards == "group":
            out[start:start + g] /= np.sqrt(((group - group.mean()) ** 2).sum() / (g - ddof)) + eps
    if kind == "grpo" and scale_rewards == "batch":
        out /= np.sqrt(((rewards - rewards.mean()) ** 2).sum() / (len(rewards) - ddof)) + eps
    if kind == "reinforce++":
        out = (out - out.mean()) / (np.sqrt(((out - out.mean()) ** 2).sum() / (len(out) - ddof)) + eps)
    return out


CASES = [("grpo", scale) for scale in ("group", "batch", "none")] + [("dr_grpo", "group"), ("rloo", "group"),
                                                                      ("reinforce++", "group")]


@pytest.mark.parametrize("group_size", [2, 3, 8])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize(("kind", "scale_rewards"), CASES)
def test_group_advantages_equal_numpy(kind, scale_rewards, group_size, ddof):
    rng = np.random.default_rng(group_size)
    n = 4 * group_size
    for rewards in (f32(rng.normal(size=n) * 3), f32(rng.integers(0, 2, n))):  # dense, and binary with equal groups
        got = group_advantages(jnp.asarray(rewards, jnp.float32), group_size, kind, scale_rewards=scale_rewards,
                               ddof=ddof)
        want = numpy_group_advantages(rewards, group_size, kind, scale_rewards, ddof)
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_grpo_uses_bessel_std_and_trl_eps_by_default():
    rewards = jnp.array([0.0, 1.0, 1.0, 1.0])  # mean 0.75, std (ddof 1) 0.5
    got = group_advantages(rewards, 4, "grpo")
    np.testing.assert_allclose(np.asarray(got), np.array([-0.75, 0.25, 0.25, 0.25]) / (0.5 + 1e-4), rtol=RTOL)


def test_group_advantages_run_under_jit():
    rewards = jnp.arange(12.0) % 5
    jitted = jax.jit(group_advantages, static_argnums=(1, 2))
    np.testing.assert_allclose(jitted(rewards, 4, "grpo"), group_advantages(rewards, 4, "grpo"), rtol=RTOL)


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((np.zeros(8), 4, "ppo"), {}, "unknown kind 'ppo'"),
    ((np.zeros(10), 4, "grpo"), {}, "10 rewards do not split into groups of group_size=4"),
    ((np.zeros((2, 4)), 4, "grpo"), {}, "flat array"),
    ((np.zeros(8), 1, "rloo"), {}, "group_size >= 2"),
    ((np.zeros(8), 4, "grpo"), {"scale_rewards": "global"}, "unknown scale_rewards 'global'"),
    ((np.zeros(8), 1, "grpo"), {}, "needs more than ddof=1 rewards"),
])
def test_group_advantages_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(*args, **kwargs)


def test_group_is_informative():
    rewards = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.5])
    np.testing.assert_array_equal(group_is_informative(rewards, 3), [False, True, False, True])
    with pytest.raises(ValueError, match="group_is_informative: 12 rewards"):
        group_is_informative(rewards, 5)


def python_gae(rewards, values, mask, gamma, lam):
    """GAE row by row over the masked positions only, with V = 0 after the last one."""
    advantages = np.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        positions = np.flatnonzero(mask[row])
        next_value = next_advantage = 0.0
        for t in positions[::-1]:
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[row, t]
            advantages[row, t] = next_advantage
    return advantages, np.where(mask > 0, advantages + values, 0.0)


def masks():
    """[R, T] masks: a prompt prefix, padding after, a gap, a full row and an empty row."""
    mask = np.zeros((R, T))
    for row, (start, stop) in enumerate([(0, T), (2, 6), (1, 2), (0, 0), (3, T), (0, 4), (5, 6), (1, T)]):
        mask[row, start:stop] = 1
    mask[7, 3] = 0
    return mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_equals_python_loop(gamma, lam):
    rng = np.random.default_rng(1)
    rewards, values, mask = f32(rng.normal(size=(R, T))), f32(rng.normal(size=(R, T))), masks()
    got_adv, got_ret = gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask),
                           gamma, lam)
    want_adv, want_ret = python_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(got_adv), want_adv, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got_ret), want_ret, rtol=RTOL, atol=ATOL)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values = np.array([[0.0, 0.0, 1.0, 9.0]]), np.array([[0.5, 0.2, 0.7, 9.0]])
    mask = np.array([[1, 1, 1, 0]])
    advantages, returns = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(advantages), [[0.5, 0.8, 0.3, 0.0]], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(returns), [[1.0, 1.0, 1.0, 0.0]], rtol=RTOL)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean):
    rng = np.random.default_rng(2)
    x, mask = f32(rng.normal(3.0, 2.0, size=(R, T))), masks()
    got = np.asarray(whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask), shift_mean))
    kept = x[mask > 0]
    want = (x - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-8) + (0.0 if shift_mean else kept.mean())
    np.testing.assert_allclose(got, np.where(mask > 0, want, 0.0), rtol=RTOL, atol=ATOL)
    assert np.all(got[mask == 0] == 0)
    np.testing.assert_allclose(got[mask > 0].std(ddof=1), 1.0, rtol=1e-4)


# ----------------------------------------------------------------------------- policy loss


def numpy_kl(logp, ref, kind):
    """Per-token KL estimates in f64 numpy."""
    return {"k1": logp - ref, "k2": (logp - ref) ** 2 / 2, "k3": np.exp(ref - logp) - (ref - logp) - 1}[kind]


def numpy_policy_loss(logp, old, adv, mask, o, ref=None, entropy=None):
    """(sum, count, metrics) written out token by token in f64."""
    rows, length = logp.shape
    high = o.epsilon if o.epsilon_high is None else o.epsilon_high
    lengths = mask.sum(axis=1)
    per_token, clipped, dual, ratios = (np.zeros((rows, length)) for _ in range(4))
    for i in range(rows):
        seq_ratio = np.exp(sum(logp[i, t] - old[i, t] for t in range(length) if mask[i, t]) / max(lengths[i], 1))
        for t in range(length):
            if not mask[i, t]:
                continue
            a = adv[i] if adv.ndim == 1 else adv[i, t]
            ratio = seq_ratio if o.importance_sampling_level == "sequence" else np.exp(logp[i, t] - old[i, t])
            loss = -min(ratio * a, min(max(ratio, 1 - o.epsilon), 1 + high) * a)
            clipped[i, t] = (ratio > 1 + high and a > 0) or (ratio < 1 - o.epsilon and a < 0)
            if o.dual_clip is not None and a < 0 and loss > -o.dual_clip * a:
                loss, dual[i, t] = -o.dual_clip * a, 1
            if o.beta > 0:
                loss += o.beta * numpy_kl(logp[i, t], ref[i, t], o.kl_estimator)
            per_token[i, t], ratios[i, t] = loss, ratio
    if o.loss_type == "grpo":
        total, count = sum(per_token[i].sum() / lengths[i] for i in range(rows) if lengths[i]), (lengths > 0).sum()
    elif o.loss_type == "dr_grpo":
        total, count = per_token.sum(), rows * o.max_completion_length
    else:
        total, count = per_token.sum(), lengths.sum()
    n = mask.sum()
    metrics = {"clip_fraction": (clipped.sum(), n), "ratio_mean": (ratios.sum(), n)}
    if o.dual_clip is not None:
        metrics["dual_clip_fraction"] = (dual.sum(), n)
    if ref is not None:
        metrics["kl"] = ((numpy_kl(logp, ref, o.kl_estimator) * mask).sum(), n)
    if entropy is not None:
        metrics["entropy"] = ((entropy * mask).sum(), n)
    return total, count, metrics


def random_rollout(seed, per_token_advantages=False):
    """logp, old_logp, ref_logp, entropy, advantages, mask: old_logp far enough from logp that clips happen."""
    rng = np.random.default_rng(seed)
    logp = f32(-rng.uniform(0.05, 4.0, size=(R, T)))
    old = f32(logp + rng.normal(0.0, 1.0, size=(R, T)) + rng.normal(0.0, 1.0, size=(R, 1)))
    ref = f32(logp + rng.normal(0.0, 0.5, size=(R, T)))
    entropy = f32(rng.uniform(0.0, 3.0, size=(R, T)))
    adv = f32(rng.normal(size=(R, T) if per_token_advantages else R))
    return logp, old, ref, entropy, adv, masks()


SETTINGS = [  # (options, whether advantages are per token [R, T] rather than per row [R])
    ({}, False),
    ({"epsilon_high": 0.28}, True),
    ({"dual_clip": 3.0, "epsilon_high": 0.28}, False),
    ({"beta": 0.04}, True),
    ({"beta": 0.1, "kl_estimator": "k2", "epsilon": 0.1}, False),
    ({"importance_sampling_level": "sequence", "beta": 0.2, "kl_estimator": "k1"}, False),
    ({"importance_sampling_level": "sequence", "dual_clip": 2.0, "beta": 0.1}, True),
]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_policy_loss_equals_numpy(loss_type, setting):
    changes, per_token_advantages = SETTINGS[setting]
    o = options(loss_type=loss_type, max_completion_length=T + 3, **changes)
    logp, old, ref, entropy, adv, mask = random_rollout(setting, per_token_advantages)
    total, count, metrics = policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv)), jnp.asarray(mask),
                                        o, ref_logp=jnp.asarray(ref, jnp.float32),
                                        entropy=jnp.asarray(entropy, jnp.float32))
    want_total, want_count, want_metrics = numpy_policy_loss(logp, old, adv, mask, o, ref, entropy)
    np.testing.assert_allclose(float(total), want_total, rtol=RTOL, atol=ATOL)
    assert float(count) == want_count
    assert want_metrics["clip_fraction"][0] > 0  # the clip is exercised
    if o.dual_clip is not None:
        assert want_metrics["dual_clip_fraction"][0] > 0
    assert metrics.keys() == want_metrics.keys()
    for name, (value, weight) in want_metrics.items():
        np.testing.assert_allclose(float(metrics[name][0]), value, rtol=RTOL, atol=ATOL, err_msg=name)
        assert float(metrics[name][1]) == weight, name


# (ratio, advantage, epsilon_high, dual_clip) -> per-token loss and whether the clip is active, by hand
CLIP_CASES = [
    (1.1, 1.0, None, None, -1.1, False),
    (2.0, 1.0, None, None, -1.2, True),
    (2.0, 1.0, 0.28, None, -1.28, True),
    (0.5, 1.0, None, None, -0.5, False),  # below the range with A > 0: not clipped
    (0.5, -1.0, None, None, 0.8, True),
    (5.0, -1.0, None, None, 5.0, False),  # above the range with A < 0: not clipped, unbounded ...
    (5.0, -1.0, None, 3.0, 3.0, False),  # ... until the dual clip bounds it at -c A
    (2.0, -1.0, None, 3.0, 2.0, False),
]


@pytest.mark.parametrize(("ratio", "adv", "epsilon_high", "dual_clip", "loss", "clipped"), CLIP_CASES)
def test_clip_and_dual_clip_by_hand(ratio, adv, epsilon_high, dual_clip, loss, clipped):
    o = options(loss_type="dapo", epsilon_high=epsilon_high, dual_clip=dual_clip)
    total, count, metrics = policy_loss(jnp.array([[np.log(ratio)]]), jnp.zeros((1, 1)), jnp.array([adv]),
                                        jnp.ones((1, 1)), o)
    np.testing.assert_allclose(float(total / count), loss, rtol=RTOL)
    assert float(metrics["clip_fraction"][0]) == float(clipped)


def test_gspo_ratio_is_the_sequence_geometric_mean():
    """Token log-ratios +1 and -1: per token both clip, the sequence ratio is exp(0) = 1 and nothing clips."""
    logp, old, adv, mask = jnp.array([[1.0, -1.0, 7.0]]), jnp.zeros((1, 3)), jnp.array([2.0]), jnp.array([[1, 1, 0]])
    token = policy_loss(logp, old, adv, mask, options(loss_type="dapo"))
    sequence = policy_loss(logp, old, adv, mask, options(loss_type="dapo", importance_sampling_level="sequence"))
    np.testing.assert_allclose(float(sequence[0]), -2.0 * 2, rtol=RTOL)
    np.testing.assert_allclose(float(sequence[2]["ratio_mean"][0]), 2.0, rtol=RTOL)
    np.testing.assert_allclose(float(token[0]), -2.0 * (np.exp(-1.0) + 1.2), rtol=RTOL)
    assert float(sequence[2]["clip_fraction"][0]) == 0 and float(token[2]["clip_fraction"][0]) == 1


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_gradient_is_reinforce_with_group_baseline(loss_type, level):
    """With old_logp == logp (one update per rollout) the ratio is 1 and d loss / d logp_t = -A_i / normaliser;
    the k3 penalty at ref_logp == logp adds nothing to it."""
    logp, _, _, _, _, mask = random_rollout(3)
    adv = np.asarray(group_advantages(jnp.asarray(np.random.default_rng(4).normal(size=R), jnp.float32), 4, "grpo"),
                     np.float64)
    o = options(loss_type=loss_type, importance_sampling_level=level, max_completion_length=T + 3, beta=0.04)
    logp32, mask32 = jnp.asarray(logp, jnp.float32), jnp.asarray(mask)

    def mean_loss(lp):
        total, count, _ = policy_loss(lp, logp32, jnp.asarray(adv, jnp.float32), mask32, o, ref_logp=logp32)
        return total / count

    lengths = mask.sum(axis=1, keepdims=True)
    normaliser = {"grpo": lengths * (lengths > 0).sum(), "dapo": mask.sum(), "dr_grpo": R * (T + 3)}[loss_type]
    want = np.where(mask > 0, -adv[:, None] / np.maximum(normaliser, 1), 0.0)
    np.testing.assert_allclose(np.asarray(jax.grad(mean_loss)(logp32)), want, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_microbatches_sum_to_the_full_batch(loss_type):
    """(sum, count) over two halves of the rows, added, is the full batch's: the loop's division is exact."""
    logp, old, ref, _, adv, mask = (jnp.asarray(x, jnp.float32) for x in random_rollout(5))
    o = options(loss_type=loss_type, beta=0.04)
    full = policy_loss(logp, old, adv, mask, o, ref_logp=ref)
    halves = [policy_loss(logp[s], old[s], adv[s], mask[s], o, ref_logp=ref[s]) for s in (slice(0, 3), slice(3, R))]
    np.testing.assert_allclose(float(halves[0][0] + halves[1][0]), float(full[0]), rtol=RTOL)
    assert float(halves[0][1] + halves[1][1]) == float(full[1])


def test_masked_out_garbage_reaches_neither_loss_nor_gradient():
    logp, old, ref, _, adv, mask = random_rollout(6, per_token_advantages=True)
    garbage = np.where(mask > 0, 0.0, np.nan)
    o = options(beta=0.04, importance_sampling_level="sequence", dual_clip=3.0)
    args = [jnp.asarray(x + garbage, jnp.float32) for x in (logp, old, adv)]

    def mean_loss(lp):
        total, count, _ = policy_loss(lp, *args[1:], jnp.asarray(mask), o, ref_logp=jnp.asarray(ref - garbage))
        return total / count

    value, grad = jax.value_and_grad(mean_loss)(args[0])
    clean = policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv)), jnp.asarray(mask), o,
                        ref_logp=jnp.asarray(ref, jnp.float32))
    np.testing.assert_allclose(float(value), float(clean[0] / clean[1]), rtol=RTOL)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[mask == 0] == 0)


@pytest.mark.parametrize(("changes", "overrides", "message"), [
    ({"beta": 0.04}, {}, "beta=0.04 > 0 adds a KL penalty to the reference, but no ref_logp"),
    ({"loss_type": "sum"}, {}, "unknown loss_type 'sum'"),
    ({"importance_sampling_level": "batch"}, {}, "unknown importance_sampling_level 'batch'"),
    ({"dual_clip": 1.0}, {}, "dual_clip must be > 1"),
    ({"kl_estimator": "k4"}, {"ref_logp": jnp.zeros((2, 3))}, "unknown estimator 'k4'"),
    ({}, {"advantages": jnp.zeros(3)}, r"advantages must be \[R\] or \[R, T\] = \(2, 3\), got \(3,\)"),
])
def test_policy_loss_errors(changes, overrides, message):
    args = {"logp": jnp.zeros((2, 3)), "old_logp": jnp.zeros((2, 3)), "advantages": jnp.zeros(2),
            "mask": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=message):
        policy_loss(**(args | overrides), options=options(**changes))


# ----------------------------------------------------------------------------- KL and value loss


def test_kl_estimators():
    rng = np.random.default_rng(7)
    logp, ref = f32(-rng.uniform(0.0, 6.0, size=(R, T))), f32(-rng.uniform(0.0, 6.0, size=(R, T)))
    lp, rf = jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32)
    for kind in ("k1", "k2", "k3"):
        np.testing.assert_allclose(np.asarray(kl_penalty(lp, rf, kind)), numpy_kl(logp, ref, kind), rtol=RTOL,
                                   atol=ATOL, err_msg=kind)
    k3 = np.asarray(kl_penalty(lp, rf, "k3"))
    assert np.all(k3 >= 0) and k3.max() > 0
    assert np.all(np.asarray(kl_penalty(lp, lp, "k3")) == 0)


def test_value_loss_equals_numpy():
    rng = np.random.default_rng(8)
    values, old, returns = (f32(rng.normal(size=(R, T))) for _ in range(3))
    mask, clip_range = masks(), 0.2
    total, count, metrics = value_loss(*(jnp.asarray(x, jnp.float32) for x in (values, old, returns)),
                                       jnp.asarray(mask), clip_range)
    unclipped = (values - returns) ** 2
    clipped = (old + np.clip(values - old, -clip_range, clip_range) - returns) ** 2
    np.testing.assert_allclose(float(total), (0.5 * np.maximum(unclipped, clipped) * mask).sum(), rtol=RTOL)
    assert float(count) == mask.sum()
    want_clipped = ((clipped > unclipped) * mask).sum()
    assert 0 < want_clipped < mask.sum() and float(metrics["value_clip_fraction"][0]) == want_clipped
