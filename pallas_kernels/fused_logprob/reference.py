"""The plain definition, for tests: materialise the [N, V] logits in f32 and let JAX differentiate them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fused_logprob_reference(hidden, lm_head, targets, *, temperature: float, softcap: float | None,
                            ignore_index: int):
    """(log-probs [N], entropies [N]) f32 of hidden [N, H] @ lm_head [H, V] at targets [N]; ignored rows give 0."""
    scores = jnp.dot(hidden.astype(jnp.float32), lm_head.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    logp_all = jax.nn.log_softmax(scores / temperature, axis=-1)
    keep = targets != ignore_index
    picked = jnp.take_along_axis(logp_all, jnp.where(keep, targets, 0)[:, None], axis=-1)[:, 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(axis=-1)
    return jnp.where(keep, picked, 0.0), jnp.where(keep, entropy, 0.0)
