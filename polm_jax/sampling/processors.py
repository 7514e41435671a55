"""Pure logit transforms and the sampling step: vocabulary limit, temperature, top-k, top-p, min-p, one draw per row.

    tokens, logprobs = sample_tokens(logits, keys, params)   # logits [R, V] f32, keys [R] -> [R] int32, [R] f32

`logprobs` are under the distribution actually sampled from (after every filter, renormalised); greedy rows
get 0 (a point mass). Each row draws with its own key, so a row's sample does not depend on the other rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polm_jax.sampling.params import SamplingParams

_NEG_INF = -jnp.inf


def filter_logits(logits, params: SamplingParams):
    """Candidates after temperature, top-k, top-p and min-p: (logits [R, C] with dropped ones at -inf, ids [R, C]
    or None when the candidates are the whole vocabulary in order, C = V). Needs temperature > 0."""
    x = logits / params.temperature
    ids = None
    if params.top_k and params.top_k < x.shape[-1]:
        x, ids = jax.lax.top_k(x, params.top_k)  # sorted, most likely first
    elif params.top_p < 1.0:  # top-p needs the whole vocabulary sorted
        iota = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
        neg, ids = jax.lax.sort((-x, iota), dimension=-1, num_keys=1)
        x = -neg
    if params.top_p < 1.0:  # x is sorted here: keep tokens whose preceding mass is below top_p (the first always)
        probs = jax.nn.softmax(x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        x = jnp.where(before < params.top_p, x, _NEG_INF)
    if params.min_p > 0.0:  # p >= min_p * p_max  <=>  logit >= max logit + log(min_p)
        x = jnp.where(x >= jnp.max(x, axis=-1, keepdims=True) + jnp.log(params.min_p), x, _NEG_INF)
    return x, ids


def sample_tokens(logits, keys, params: SamplingParams):
    """One token per row from logits [R, V] (f32) with per-row keys [R] -> (tokens [R] int32, logprobs [R] f32)."""
    if params.vocab_size is not None and params.vocab_size < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < params.vocab_size, logits, _NEG_INF)
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1], jnp.float32)
    x, ids = filter_logits(logits, params)
    choice = jax.vmap(jax.random.categorical)(keys, x)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), choice[:, None], axis=-1)[:, 0]
    tokens = choice if ids is None else jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprobs


def token_logprob(logits, tokens):
    """log softmax(logits)[tokens]: the unmodified model's log-prob of each row's token, [R, V], [R] -> [R] f32."""
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
