"""Reward models: a decoder with a scalar `score` head (ModelConfig.num_labels = 1) trained with the Bradley-Terry
loss -log sigma(r(x, y_w) - r(x, y_l)) on preference pairs, and the scoring of sequences with it.

A sequence's reward is the head's output at its last token (as Hugging Face's *ForSequenceClassification pools).
Batches are the preference pipeline's (polm_jax.data.preference): unit u of a row holds the chosen sequence in
segment 2u-1 and the rejected one in 2u, so one forward pass scores both.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from polm_jax.algorithms.preference import masked_sum, max_units, unit_sums
from polm_jax.config import PreferenceSection
from polm_jax.models.config import ModelConfig
from polm_jax.models.transformer import forward


def last_tokens(segment_ids):
    """[B, T] bool: each non-padding segment's last token."""
    following = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    return (segment_ids > 0) & (segment_ids != following)


def token_scores(config: ModelConfig, params: dict, batch: dict, rng=None):
    """The score head's output [B, T] (f32) at every token of `batch` (tokens, positions, segment_ids)."""
    scores = forward(config, params, batch["tokens"], batch["positions"], batch["segment_ids"], dropout_rng=rng)
    return scores[..., 0]


def sequence_scores(config: ModelConfig, params: dict, batch: dict, rng=None):
    """Rewards of each unit's (chosen, rejected) sequences [R, U], and whether the unit is there [R, U]."""
    last = last_tokens(batch["segment_ids"])
    scores = jnp.where(last, token_scores(config, params, batch, rng), 0.0)
    units = max_units(batch)
    chosen, rejected = unit_sums(scores, batch["segment_ids"], units)
    has_chosen, has_rejected = unit_sums(last.astype(jnp.float32), batch["segment_ids"], units)
    return chosen, rejected, (has_chosen > 0) & (has_rejected > 0)


def bradley_terry(chosen, rejected):
    """Per-pair loss -log sigma(r_chosen - r_rejected)."""
    return -jax.nn.log_sigmoid(chosen - rejected)


def reward_model_loss(config: ModelConfig, model_params: Callable[[dict, dict], dict], options: PreferenceSection):
    """The loss_fn for make_train_step: (Bradley-Terry sum over pairs, pairs, metrics), plus TRL's optional
    center_rewards_coefficient * (r_chosen + r_rejected)^2 that keeps rewards centred on 0."""

    def loss_fn(params, frozen, batch, rng):
        chosen, rejected, valid = sequence_scores(config, model_params(params, frozen), batch, rng)
        losses = bradley_terry(chosen, rejected) + options.center_rewards_coefficient * (chosen + rejected) ** 2
        n = valid.sum().astype(jnp.float32)
        per_pair = {"accuracy": (chosen > rejected).astype(jnp.float32), "rewards/chosen": chosen,
                    "rewards/rejected": rejected, "rewards/margins": chosen - rejected}
        return masked_sum(losses, valid), n, {k: (masked_sum(v, valid), n) for k, v in per_pair.items()}

    return loss_fn
