"""The KV-cache generation engine: prefill once, then a `lax.while_loop` decode, all on device.

    rollout = make_rollout(config, sampling, mesh=mesh, rules=rules)   # jitted; compiles once per input shape
    out = rollout(params, prompts, prompt_lengths, key)                  # prompts [B, P] left-padded, lengths [B]

Rows: B prompts, each sampled `sampling.n` times, give R = B * n rows, prompt-major (row r is prompt r // n).
Prompts are LEFT-padded: row b's prompt is prompts[b, P - len_b:], the padding has segment id 0 and positions
restart at 0 at each row's first real token, so every row decodes at the same cache index. A row with
prompt length 0 is batch padding: it is stopped from the start and generates nothing.

A row stops when it samples an EOS id (the model config's eos_token_id plus `sampling.stop_token_ids`) or ends
with one of `sampling.stop_sequences`; the stopping tokens are kept (they are the policy's actions), and later
columns hold the pad id with log-probs 0. The loop ends as soon as every row has stopped. Randomness: row r
draws step t with fold_in(fold_in(key, r), t), so a row's samples do not depend on the batch around it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from polm_jax import parallel
from polm_jax.config import DEFAULT_RULES
from polm_jax.models.config import ModelConfig
from polm_jax.models.transformer import forward, init_cache, lm_head
from polm_jax.sampling.params import SamplingParams
from polm_jax.sampling.processors import sample_tokens, token_logprob

_CACHE_AXES = {"k": PartitionSpec(None, "batch", None, "kv_heads", None),  # [L, R, S, K, E]
               "v": PartitionSpec(None, "batch", None, "kv_heads", None),
               "positions": PartitionSpec("batch", None), "segment_ids": PartitionSpec("batch", None),
               "index": PartitionSpec()}


class DecodeState(NamedTuple):
    """The decode loop's carry; R rows, N = max_new_tokens, M = longest stop sequence (at least 1)."""

    cache: dict  # the KV cache (see init_cache), R rows
    prompt_lengths: jax.Array  # [R] int32
    keys: jax.Array  # [R] per-row PRNG keys
    tokens: jax.Array  # [R, N] int32, pad after a row stops
    logprobs: jax.Array  # [R, N] f32 under the sampling distribution
    model_logprobs: jax.Array  # [R, N] f32 under the unmodified model (log-softmax of the logits)
    lengths: jax.Array  # [R] int32 tokens generated
    done: jax.Array  # [R] bool
    recent: jax.Array  # [R, M] int32 the last M tokens generated (-1 before the first), for stop sequences
    step: jax.Array  # () int32 columns sampled so far


class Rollout(NamedTuple):
    """What a rollout returns (device arrays; host `generate` gives numpy). R rows, N = max_new_tokens."""

    tokens: jax.Array  # [R, N] int32 generated tokens, the stopping EOS / stop sequence included, then pad
    lengths: jax.Array  # [R] int32 tokens generated per row
    truncated: jax.Array  # [R] bool: hit max_new_tokens without stopping
    logprobs: jax.Array  # [R, N] f32 log-prob of each token under the sampling distribution (greedy: 0)
    model_logprobs: jax.Array  # [R, N] f32 under the unmodified model at temperature 1 (RL's old_logprobs)
    prompt_index: jax.Array  # [R] int32 the prompt row each row samples (r // n)
    steps: jax.Array  # () int32 decode columns run (the loop stops early when every row has stopped)


class Engine(NamedTuple):
    """The jitted pieces for one (config, sampling, mesh): `rollout` runs everything; `prefill`, `decode` and
    `finish` let a caller (streaming) run the loop in chunks."""

    rollout: Callable  # (params, prompts [B, P], prompt_lengths [B], key) -> Rollout
    prefill: Callable  # (params, prompts [B, P], prompt_lengths [B], key) -> DecodeState with column 0 sampled
    decode: Callable  # (params, state, until) -> DecodeState with columns up to `until` (or every row stopped)
    finish: Callable  # (state) -> Rollout


def eos_ids(config: ModelConfig, sampling: SamplingParams) -> tuple[int, ...]:
    """The ids that stop a row: the model config's eos_token_id (an int or a tuple) and sampling.stop_token_ids."""
    own = config.eos_token_id
    own = () if own is None else (own,) if isinstance(own, int) else tuple(own)
    return tuple(dict.fromkeys((*own, *sampling.stop_token_ids)))


def make_engine(config: ModelConfig, sampling: SamplingParams, *, mesh=None, rules: dict | None = None) -> Engine:
    """The jitted engine; cached, so the same config, mesh, rules and sampling (but its host-only fields: seed and
    prompt length handling) reuse compiled code."""
    rules_key = tuple(sorted((k, tuple(v)) for k, v in (rules or DEFAULT_RULES).items()))
    device_only = sampling.replace(seed=0, max_prompt_length=None, prompt_truncation="error")
    return _engine(config, device_only, mesh, rules_key)


def make_rollout(config: ModelConfig, sampling: SamplingParams, *, mesh=None, rules: dict | None = None):
    """`rollout(params, prompts [B, P] int32 left-padded, prompt_lengths [B] int32, key) -> Rollout` of B * n
    rows, jitted (compiled once per shape); params and prompts stay on device, nothing comes back to the host."""
    return make_engine(config, sampling, mesh=mesh, rules=rules).rollout


@functools.lru_cache(maxsize=32)
def _engine(config: ModelConfig, sampling: SamplingParams, mesh, rules_key: tuple) -> Engine:
    rules = {k: list(v) for k, v in rules_key}
    constrain = _cache_constraint(mesh, rules)
    stops = eos_ids(config, sampling)

    def prefill(params, prompts, prompt_lengths, key):
        return _prefill(config, sampling, stops, constrain, params, prompts, prompt_lengths, key)

    def decode(params, state, until):
        return _decode(config, sampling, stops, constrain, params, state, until)

    def finish(state):
        return _finish(state, sampling.n)

    def rollout(params, prompts, prompt_lengths, key):
        if not sampling.max_new_tokens:  # nothing to generate: no model call, no loop
            return _empty_rollout(prompts.shape[0] * sampling.n, sampling.n)
        state = prefill(params, prompts, prompt_lengths, key)
        return finish(decode(params, state, sampling.max_new_tokens))

    in_mesh = functools.partial(_in_mesh, mesh=mesh, rules=rules)
    return Engine(in_mesh(jax.jit(rollout)), in_mesh(jax.jit(prefill)), in_mesh(jax.jit(decode)), jax.jit(finish))


def _in_mesh(fn, *, mesh, rules):
    """`fn` run (and traced) with the model's activation constraints on `mesh`; unchanged without a mesh."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        with parallel.activation_sharding(mesh, rules):
            return fn(*args)

    return wrapped


def _cache_constraint(mesh, rules):
    """cache -> the cache constrained to the mesh (rows over the batch axes, kv heads over tensor), or unchanged."""
    if mesh is None:
        return lambda cache: cache

    def constrain(cache):
        return {name: jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, parallel.mesh_spec(_CACHE_AXES[name], x.shape, mesh, rules)))
                for name, x in cache.items()}

    return constrain


def _head_logits(config: ModelConfig, params: dict, hidden):
    """Logits [B, V] f32 of final hidden states [B, D], soft-capped as the model's own logits are."""
    logits = jnp.dot(hidden, lm_head(config, params).astype(hidden.dtype), preferred_element_type=jnp.float32)
    if config.final_softcap is not None:
        logits = jnp.tanh(logits / config.final_softcap) * config.final_softcap
    return logits


def _prefill(config, sampling, stops, constrain, params, prompts, prompt_lengths, key) -> DecodeState:
    """Runs the B prompts through the model into a fresh cache, repeats it n times and samples column 0."""
    b, p = prompts.shape
    n, new = sampling.n, sampling.max_new_tokens
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    pad = (p - prompt_lengths)[:, None]
    column = jnp.arange(p, dtype=jnp.int32)[None]
    segment_ids = (column >= pad).astype(jnp.int32)
    positions = jnp.maximum(column - pad, 0)
    cache = constrain(init_cache(config, b, p + new))
    hidden, cache = forward(config, params, prompts, positions, segment_ids, cache, return_hidden=True)
    logits = _head_logits(config, params, hidden[:, -1])  # the last column is every row's last prompt token
    if n > 1:  # the n samples of a prompt share its prefill
        cache = {**{k: jnp.repeat(cache[k], n, axis=1) for k in ("k", "v")},
                 **{k: jnp.repeat(cache[k], n, axis=0) for k in ("positions", "segment_ids")}, "index": cache["index"]}
        logits, prompt_lengths = jnp.repeat(logits, n, axis=0), jnp.repeat(prompt_lengths, n)
    rows, width = b * n, max((len(s) for s in sampling.stop_sequences), default=1)
    state = DecodeState(
        cache=constrain(cache), prompt_lengths=prompt_lengths,
        keys=jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(rows)),
        tokens=jnp.zeros((rows, new), jnp.int32), logprobs=jnp.zeros((rows, new), jnp.float32),
        model_logprobs=jnp.zeros((rows, new), jnp.float32), lengths=jnp.zeros(rows, jnp.int32),
        done=prompt_lengths == 0, recent=jnp.full((rows, width), -1, jnp.int32), step=jnp.zeros((), jnp.int32))
    return _sample_column(config, sampling, stops, state, logits)


def _decode(config, sampling, stops, constrain, params, state: DecodeState, until) -> DecodeState:
    """Feeds each row's last token and samples the next column, while step < until and some row is running."""
    until = jnp.minimum(until, sampling.max_new_tokens)

    def running(s: DecodeState):
        return (s.step < until) & ~jnp.all(s.done)

    def step(s: DecodeState):
        last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [R, 1]
        positions = (s.prompt_lengths + s.step - 1)[:, None]
        logits, cache = forward(config, params, last, positions, jnp.ones_like(last), s.cache)
        return _sample_column(config, sampling, stops, s._replace(cache=constrain(cache)), logits[:, 0])

    return jax.lax.while_loop(running, step, state)


def _sample_column(config, sampling, stops, s: DecodeState, logits) -> DecodeState:
    """Samples column s.step from logits [R, V] for the running rows and records it; marks rows that stop."""
    keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
    tokens, logprobs = sample_tokens(logits, keys, sampling)
    model_logprobs = token_logprob(logits, tokens)
    running = ~s.done
    tokens = jnp.where(running, tokens, config.pad_token_id or 0)
    recent = jnp.concatenate([s.recent[:, 1:], tokens[:, None]], axis=1)
    stopped = jnp.isin(tokens, jnp.asarray(stops, jnp.int32)) if stops else jnp.zeros_like(running)
    for seq in sampling.stop_sequences:
        stopped |= jnp.all(recent[:, recent.shape[1] - len(seq):] == jnp.asarray(seq, jnp.int32), axis=1)

    def put(buffer, column):
        return jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None].astype(buffer.dtype), s.step, axis=1)

    return s._replace(tokens=put(s.tokens, tokens), logprobs=put(s.logprobs, jnp.where(running, logprobs, 0.0)),
                      model_logprobs=put(s.model_logprobs, jnp.where(running, model_logprobs, 0.0)),
                      lengths=s.lengths + running, done=s.done | (running & stopped), recent=recent, step=s.step + 1)


def _empty_rollout(rows: int, n: int) -> Rollout:
    """The rollout of max_new_tokens = 0: no tokens, nothing truncated."""
    empty = jnp.zeros((rows, 0), jnp.int32)
    return Rollout(tokens=empty, lengths=jnp.zeros(rows, jnp.int32), truncated=jnp.zeros(rows, bool),
                   logprobs=empty.astype(jnp.float32), model_logprobs=empty.astype(jnp.float32),
                   prompt_index=jnp.arange(rows, dtype=jnp.int32) // n, steps=jnp.zeros((), jnp.int32))


def _finish(s: DecodeState, n: int) -> Rollout:
    """The loop's result; a row still running at the end was truncated by max_new_tokens."""
    rows = s.tokens.shape[0]
    return Rollout(tokens=s.tokens, lengths=s.lengths, truncated=~s.done, logprobs=s.logprobs,
                   model_logprobs=s.model_logprobs, prompt_index=jnp.arange(rows, dtype=jnp.int32) // n, steps=s.step)
