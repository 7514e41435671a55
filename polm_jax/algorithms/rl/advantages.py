"""Advantage estimators for policy-gradient RL: group baselines (GRPO, Dr. GRPO, RLOO, REINFORCE++) and PPO's GAE.

Rewards of B prompts x G completions come as one array [B*G], grouped consecutively: rows g*G .. g*G+G-1 are the
G completions of prompt g. Exact objectives: ../shared/ALGORITHMS.md ("Policy gradient").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo", "reinforce++")
SCALE_REWARDS = ("group", "batch", "none")


def _check_groups(rewards, group_size: int, where: str) -> None:
    """Rewards must be one flat array [B*G] that splits into groups of group_size."""
    if rewards.ndim != 1:
        raise ValueError(f"{where}: rewards must be a flat array [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{where}: {rewards.shape[0]} rewards do not split into groups of group_size={group_size} "
                         "(give B*G rewards, the G completions of each prompt consecutive)")


def _std(x, ddof: int, axis=None):
    """std of x (over axis, or all of it) with ddof, keeping dims; refuses too few values for that ddof."""
    n = x.size if axis is None else x.shape[axis]
    if n <= ddof:
        scope = "a group" if axis is not None else "the batch"
        raise ValueError(f"group_advantages: the std of {scope} needs more than ddof={ddof} rewards, got {n}")
    return jnp.std(x, axis=axis, ddof=ddof, keepdims=True)


def group_advantages(rewards, group_size: int, kind: str, *, scale_rewards: str = "group", ddof: int = 1,
                     eps: float = 1e-4):
    """Advantages [B*G] of rewards [B*G] with a per-prompt baseline, the same for every token of a completion.

    kind "grpo": (r - group mean) / (std + eps), the std by `scale_rewards` ("group": the group's, "batch": the whole
    batch's, as TRL's scale_rewards="batch"; "none": no division, which is Dr. GRPO), with `ddof` explicit
    (1 = Bessel, as TRL and reference implementations; jnp.std's default is 0); eps 1e-4 is TRL's.
    "dr_grpo": r - group mean. "rloo": r_i - mean_{j != i} r_j (group_size >= 2). "reinforce++": r - group mean,
    then normalised over the batch: (x - batch mean) / (batch std + eps), the std with `ddof`.
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"group_advantages: unknown kind {kind!r}; choose one of {ADVANTAGE_KINDS}")
    rewards = jnp.asarray(rewards)
    _check_groups(rewards, group_size, "group_advantages")
    grouped = rewards.reshape(-1, group_size)  # [B, G]
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if kind == "grpo":
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"group_advantages: unknown scale_rewards {scale_rewards!r}; choose one of {SCALE_REWARDS}")
        if scale_rewards == "group":
            centred = centred / (_std(grouped, ddof, axis=1) + eps)
        elif scale_rewards == "batch":
            centred = centred / (_std(grouped, ddof) + eps)
    elif kind == "rloo":
        if group_size < 2:
            raise ValueError("group_advantages: rloo's leave-one-out baseline needs group_size >= 2, got 1")
        centred = centred * group_size / (group_size - 1)  # r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean)
    elif kind == "reinforce++":
        centred = (centred - centred.mean()) / (_std(centred, ddof) + eps)
    return centred.reshape(-1)


def gae(rewards, values, mask, gamma: float, lam: float):
    """PPO's generalised advantage estimation: (advantages, returns), each [R, T], from rewards, values, mask [R, T].

    Over each row's masked tokens (the completion; unmasked positions are skipped): delta_t = r_t + gamma V_next -
    V_t, with V_next the value at the row's next masked token (0 after its last), A_t = delta_t + gamma lam A_next
    (a reverse scan over T); returns = A + V. Unmasked positions give 0 in both.
    """
    if not rewards.shape == values.shape == mask.shape or rewards.ndim != 2:
        raise ValueError(f"gae: rewards, values and mask must share one shape [R, T], got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)} and {tuple(mask.shape)}")
    valid = mask > 0

    def step(carry, column):
        next_value, next_advantage = carry
        reward, value, keep = column  # each [R]
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = (jnp.where(keep, value, next_value), jnp.where(keep, advantage, next_advantage))
        return carry, jnp.where(keep, advantage, 0.0)

    dtype = jnp.result_type(rewards, values)
    zeros = jnp.zeros(rewards.shape[0], dtype)
    columns = (rewards.T.astype(dtype), values.T.astype(dtype), valid.T)
    _, advantages = jax.lax.scan(step, (zeros, zeros), columns, reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(valid, advantages + values, 0.0)


def whiten(x, mask, shift_mean: bool = True, *, ddof: int = 1, eps: float = 1e-8):
    """x [...] normalised by the mean and std (ddof 1, as TRL) of its masked entries: (x - mean) / sqrt(var + eps),
    the mean added back when not shift_mean; masked-out entries (mask, x's shape) give 0."""
    valid = mask > 0
    n = valid.sum()
    mean = jnp.where(valid, x, 0.0).sum() / jnp.maximum(n, 1)
    var = jnp.where(valid, (x - mean) ** 2, 0.0).sum() / jnp.maximum(n - ddof, 1)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(valid, out, 0.0)


def group_is_informative(rewards, group_size: int) -> np.ndarray:
    """bool [B]: whether each group of rewards [B*G] holds different rewards (DAPO's dynamic sampling keeps only
    these: a group whose rewards are all equal has zero advantage everywhere)."""
    rewards = np.asarray(rewards)
    _check_groups(rewards, group_size, "group_is_informative")
    grouped = rewards.reshape(-1, group_size)
    return grouped.max(axis=1) > grouped.min(axis=1)
