"""Per-token log-probabilities of target tokens from final hidden states, without keeping more than needed.

    logp = token_logprobs(hidden, head, targets)   # hidden [B, T, D], head [D, V], targets [B, T] -> [B, T] f32

`impl`: "xla" (full f32 logits, then log-softmax), "reference" (the same, written plainly, for tests); "auto"
picks the best available. Later implementations (chunked over the vocabulary, Pallas) plug in here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "reference")


def _logits(hidden, head, softcap, temperature):
    logits = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits / temperature


def _xla(hidden, head, targets, softcap, temperature):
    logits = _logits(hidden, head, softcap, temperature)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _reference(hidden, head, targets, softcap, temperature):
    logp = jax.nn.log_softmax(_logits(hidden, head, softcap, temperature), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def token_logprobs(hidden, head, targets, *, softcap: float | None = None, temperature: float = 1.0,
                   impl: str = "auto"):
    """log softmax(softcap(hidden @ head) / temperature)[targets]: hidden [B, T, D], head [D, V] -> [B, T] f32."""
    if impl not in IMPLS:
        raise ValueError(f"token_logprobs impl {impl!r} is not one of {IMPLS}")
    fn = _reference if impl == "reference" else _xla
    return fn(hidden, head, jnp.asarray(targets, jnp.int32), softcap, temperature)
