"""From a rollout to a train batch, and the RL loss over it.

A train batch holds R = B * G rows, each a left-padded prompt [P] followed by its completion [N]:

    tokens [R, P + N], positions, segment_ids (1 on real tokens, 0 on padding)   the model's input
    completion_mask [R, N]      the completion's tokens (the stopping EOS included) that the loss covers
    advantages [R]              one advantage per completion (GRPO family), the same for each of its tokens
    old_logprobs [R, N]         the policy's log-probs before this batch's updates (num_iterations > 1, or PPO)
    old_values, returns [R, N]  PPO: the value head's estimates before the updates and the GAE returns; its
                                advantages are then per token [R, N]

The loss scores only the completion columns: hidden states P-1 .. P+N-2 predict tokens P .. P+N-1.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from polm_jax.algorithms.rl.policy_loss import policy_loss, value_loss
from polm_jax.config import RLSection
from polm_jax.models.config import ModelConfig
from polm_jax.models.transformer import forward, lm_head
from polm_jax.ops.logprob import token_logprobs
from polm_jax.sampling.engine import Rollout
from polm_jax.train.session import VALUE_HEAD


def train_rows(prompts, prompt_lengths, rollout: Rollout, group_size: int, completion_mask) -> dict:
    """The model-input part of a train batch: prompts [B, P] left-padded with lengths [B], the rollout's R = B * G
    completions [R, N] and which of their tokens count [R, N]."""
    prompts, prompt_lengths = jnp.repeat(prompts, group_size, axis=0), jnp.repeat(prompt_lengths, group_size)
    width = prompts.shape[1]
    prompt_seg = jnp.arange(width)[None] >= (width - prompt_lengths)[:, None]
    generated = jnp.arange(rollout.tokens.shape[1])[None] < rollout.lengths[:, None]
    segment_ids = jnp.concatenate([prompt_seg, generated], axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
    return {"tokens": jnp.concatenate([prompts, rollout.tokens], axis=1), "positions": positions,
            "segment_ids": segment_ids, "completion_mask": completion_mask.astype(jnp.int32)}


def completion_outputs(config: ModelConfig, params: dict, batch: dict, prompt_width: int, temperature: float,
                       rng=None, value_head=None):
    """(log-probs, entropies, values or None) [R, N] of each completion token under the policy at the sampling
    temperature; values (PPO) are value_head [D] on the hidden state before each token."""
    hidden = forward(config, params, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True,
                     dropout_rng=rng)[:, prompt_width - 1:-1]
    logp, entropy = token_logprobs(hidden, lm_head(config, params), batch["tokens"][:, prompt_width:],
                                   softcap=config.final_softcap, temperature=temperature, impl=config.logprob_impl,
                                   return_entropy=True)
    values = None if value_head is None else jnp.einsum("rnd,d->rn", hidden.astype(jnp.float32), value_head)
    return logp, entropy, values


def rl_loss(config: ModelConfig, model_params: Callable[[dict, dict], dict], options: RLSection, *,
            prompt_width: int, temperature: float):
    """The loss_fn for make_train_step over train batches (module doc): the clipped policy loss of
    polm_jax.algorithms.rl.policy_loss, with the KL to the reference (the `frozen` params: the LoRA base or a
    frozen copy) when options.beta > 0. Without old_logprobs in the batch (num_iterations = 1) the ratio is taken
    against the log-probs themselves, detached: exactly 1, so the gradient is REINFORCE with the baseline.
    With a value head in the params (PPO), plus vf_coef times the clipped value loss, each term its own mean."""

    def loss_fn(params, frozen, batch, rng):
        logp, entropy, values = completion_outputs(config, model_params(params, frozen), batch, prompt_width,
                                                   temperature, rng, params.get(VALUE_HEAD))
        old = batch["old_logprobs"] if "old_logprobs" in batch else jax.lax.stop_gradient(logp)
        ref = None
        if options.beta > 0:
            ref = jax.lax.stop_gradient(completion_outputs(config, frozen, batch, prompt_width, temperature)[0])
        total, count, metrics = policy_loss(logp, old, batch["advantages"], batch["completion_mask"], options,
                                            ref_logp=ref, entropy=jax.lax.stop_gradient(entropy))
        if values is None:
            return total, count, metrics
        v_total, v_count, v_metrics = value_loss(values, batch["old_values"], batch["returns"],
                                                 batch["completion_mask"], options.cliprange_value)
        scale = options.vf_coef * count / jnp.maximum(v_count, 1.0)  # the value loss's mean, in the policy's units
        return total + scale * v_total, count, {**metrics, **v_metrics, "value_loss": (v_total, v_count)}

    return loss_fn
