"""The clipped policy-gradient loss of the GRPO family and PPO (GRPO, DAPO, Dr. GRPO, GSPO), KL penalties to the
reference, and PPO's clipped value loss.

Like every loss here they return (sum, count, metrics), metrics mapping name -> (sum, weight): the training loop
divides the summed sums by the summed counts once, so microbatching gives exactly the full batch's loss. Inputs are
per completion token, [R, T] (R completions, T completion positions), with `mask` marking the real tokens.
Exact objectives: ../shared/ALGORITHMS.md ("Policy gradient").
"""

from __future__ import annotations

from typing import Protocol

import jax.numpy as jnp

LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
MAX_LOG_RATIO = 20.0  # ratios are exp(clip(logp - old_logp, -20, 20))


class PolicyLossOptions(Protocol):
    """What policy_loss reads from its options (the RL config section has these fields, TRL's names)."""

    epsilon: float  # clip range below 1 (and above, when epsilon_high is None); 0.2
    epsilon_high: float | None  # clip range above 1; DAPO's clip-higher uses 0.28
    dual_clip: float | None  # c > 1: for A < 0 the loss is at most -c A (None: off)
    importance_sampling_level: str  # "token" (GRPO, PPO) or "sequence" (GSPO)
    loss_type: str  # aggregation: "grpo", "dapo" / "bnpo" (token-level) or "dr_grpo"
    max_completion_length: int  # Dr. GRPO's constant normaliser is R * max_completion_length
    beta: float  # weight of the KL penalty to the reference (0: no reference needed)
    kl_estimator: str  # "k1", "k2" or "k3"


def kl_penalty(logp, ref_logp, kind: str):
    """Per-token estimate [R, T] of KL(pi || pi_ref) from sampled tokens' log-probs [R, T]: "k1" logp - ref,
    "k2" 0.5 (logp - ref)^2, "k3" exp(ref - logp) - (ref - logp) - 1 (non-negative, 0 when equal; GRPO's)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        return jnp.expm1(ref_logp - logp) - (ref_logp - logp)
    raise ValueError(f"kl_penalty: unknown estimator {kind!r}; choose one of {KL_ESTIMATORS}")


def _check_options(o: PolicyLossOptions, with_reference: bool) -> None:
    if o.loss_type not in LOSS_TYPES:
        raise ValueError(f"policy_loss: unknown loss_type {o.loss_type!r}; choose one of {LOSS_TYPES}")
    if o.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"policy_loss: unknown importance_sampling_level {o.importance_sampling_level!r}; choose "
                         f"one of {IMPORTANCE_SAMPLING_LEVELS}")
    if o.dual_clip is not None and o.dual_clip <= 1:
        raise ValueError(f"policy_loss: dual_clip must be > 1 (or None for off), got {o.dual_clip}")
    if o.beta > 0 and not with_reference:
        raise ValueError(f"policy_loss: beta={o.beta} > 0 adds a KL penalty to the reference, but no ref_logp was "
                         "given (pass the reference model's token log-probs, or set beta=0)")
    if o.loss_type == "dr_grpo" and o.max_completion_length < 1:
        raise ValueError(f"policy_loss: dr_grpo needs max_completion_length >= 1, got {o.max_completion_length}")


def _check_shapes(logp, old_logp, advantages, mask) -> None:
    if not logp.shape == old_logp.shape == mask.shape or logp.ndim != 2:
        raise ValueError(f"policy_loss: logp, old_logp and mask must share one shape [R, T], got "
                         f"{tuple(logp.shape)}, {tuple(old_logp.shape)} and {tuple(mask.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"policy_loss: advantages must be [R] or [R, T] = {tuple(logp.shape)}, got "
                         f"{tuple(advantages.shape)}")


def importance_ratio(log_ratio, valid, level: str):
    """Ratios [R, T] from masked log-ratios logp - old_logp [R, T] (0 where not valid): per token, or GSPO's
    sequence ratio exp(masked mean_t log_ratio) broadcast over the row, both exp(clip(., -20, 20)).

    The sequence ratio is the plain sequence-level GSPO: its gradient reaches every token through the mean
    (d s_i / d logp_t = s_i / |o_i|); the GSPO-token variant (sg[s_i] pi_t / sg[pi_t]) is not implemented.
    """
    if level == "sequence":
        lengths = valid.sum(axis=1, keepdims=True)
        log_ratio = jnp.broadcast_to(log_ratio.sum(axis=1, keepdims=True) / jnp.maximum(lengths, 1), log_ratio.shape)
    return jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))


def _aggregate(per_token, valid, o: PolicyLossOptions):
    """(sum, count) of per-token losses [R, T] (0 where not valid) by o.loss_type, named as TRL does."""
    lengths = valid.sum(axis=1).astype(jnp.float32)
    if o.loss_type == "grpo":  # sequence-mean of token-mean
        return (per_token.sum(axis=1) / jnp.maximum(lengths, 1.0)).sum(), (lengths > 0).sum().astype(jnp.float32)
    if o.loss_type == "dr_grpo":  # a constant normaliser
        return per_token.sum(), jnp.float32(per_token.shape[0] * o.max_completion_length)
    return per_token.sum(), lengths.sum()  # dapo / bnpo: token-level


def policy_loss(logp, old_logp, advantages, mask, options: PolicyLossOptions, *, ref_logp=None, entropy=None):
    """The clipped policy-gradient loss: (sum, count, metrics) from log-probs [R, T] under the policy and the
    sampling policy, advantages [R] or [R, T], mask [R, T], and optionally reference log-probs and entropies [R, T].

    Per token: -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A), for A < 0 at most -dual_clip A, plus
    beta * kl_penalty(logp, ref_logp); rho per token or per sequence (GSPO, see importance_ratio); aggregated by
    loss_type. Metrics, token-weighted: clip_fraction, dual_clip_fraction (with dual_clip), ratio_mean, kl (with
    ref_logp), entropy (with entropy). Rows whose mask is all zero contribute nothing.
    """
    advantages = jnp.asarray(advantages)
    _check_shapes(logp, old_logp, advantages, mask)
    _check_options(options, ref_logp is not None)
    valid = mask > 0
    tokens = valid.sum().astype(jnp.float32)

    def masked_sum(x):
        return jnp.where(valid, x, 0.0).sum()

    # Masked-out positions may hold anything (padding, -inf): zero them before they reach a gradient.
    ratio = importance_ratio(jnp.where(valid, logp - old_logp, 0.0), valid, options.importance_sampling_level)
    adv = jnp.where(valid, advantages[:, None] if advantages.ndim == 1 else advantages, 0.0)
    high = options.epsilon if options.epsilon_high is None else options.epsilon_high
    clipped = jnp.clip(ratio, 1 - options.epsilon, 1 + high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {"clip_fraction": (masked_sum((clipped * adv < ratio * adv).astype(jnp.float32)), tokens),
               "ratio_mean": (masked_sum(ratio), tokens)}
    if options.dual_clip is not None:
        dual = (adv < 0) & (-options.dual_clip * adv < loss)
        metrics["dual_clip_fraction"] = (masked_sum(dual.astype(jnp.float32)), tokens)
        loss = jnp.where(dual, -options.dual_clip * adv, loss)
    if ref_logp is not None:
        kl = kl_penalty(jnp.where(valid, logp, 0.0), jnp.where(valid, ref_logp, 0.0), options.kl_estimator)
        metrics["kl"] = (masked_sum(kl), tokens)
        if options.beta > 0:
            loss = loss + options.beta * kl
    if entropy is not None:
        metrics["entropy"] = (masked_sum(entropy), tokens)
    total, count = _aggregate(jnp.where(valid, loss, 0.0), valid, options)
    return total, count, metrics


def value_loss(values, old_values, returns, mask, clip_range: float):
    """PPO's clipped value loss, token-mean: (sum, count, {"value_clip_fraction"}) of 0.5 max((V - R)^2,
    (V_old + clip(V - V_old, -c, c) - R)^2) over the masked tokens of values, old values, returns and mask [R, T]."""
    if not values.shape == old_values.shape == returns.shape == mask.shape:
        raise ValueError(f"value_loss: values, old_values, returns and mask must share one shape, got "
                         f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, "
                         f"{tuple(mask.shape)}")
    valid = mask > 0
    values, old_values, returns = (jnp.where(valid, x, 0.0) for x in (values, old_values, returns))
    unclipped = (values - returns) ** 2
    clipped = (old_values + jnp.clip(values - old_values, -clip_range, clip_range) - returns) ** 2
    tokens = valid.sum().astype(jnp.float32)
    loss = jnp.where(valid, 0.5 * jnp.maximum(unclipped, clipped), 0.0).sum()
    return loss, tokens, {"value_clip_fraction": (jnp.where(valid & (clipped > unclipped), 1.0, 0.0).sum(), tokens)}
