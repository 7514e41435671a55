"""Host-level generation from token-id prompts: checks, left-padding into shape buckets, one device rollout.

    out = generate(model.config, model.params, [[1, 5, 9], [1, 7]], SamplingParams(max_new_tokens=32, n=4))
    out.tokens[r, :out.lengths[r]]   # row r samples prompt out.prompt_index[r] (numpy arrays, B * n rows)

Batches are padded up to a power of two rows (at least MIN_BATCH_BUCKET, and a multiple of the mesh's batch shards)
and prompts up to a power of two tokens (at least MIN_PROMPT_BUCKET), so a run compiles once per bucket, not once
per batch (decoding a few rows more costs little: a decode step is bound by reading the weights).
An empty prompt is an error (text prompts get the tokenizer's BOS when it adds one, see text.py); a prompt
longer than `max_prompt_length` is an error, or keeps its last tokens with prompt_truncation="left".
"""

from __future__ import annotations

import math

import jax
import numpy as np

from polm_jax import parallel
from polm_jax.config import DEFAULT_RULES
from polm_jax.errors import ConfigError, DataError
from polm_jax.models.config import ModelConfig
from polm_jax.sampling.engine import Rollout, make_engine
from polm_jax.sampling.params import SamplingParams

MIN_BATCH_BUCKET = 8
MIN_PROMPT_BUCKET = 16


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def max_prompt_length(config: ModelConfig, sampling: SamplingParams) -> int:
    """The longest prompt accepted: sampling.max_prompt_length, else what leaves room for max_new_tokens."""
    room = config.max_position_embeddings - sampling.max_new_tokens
    limit = sampling.max_prompt_length or room
    if limit > room or room < 1:
        raise ConfigError(f"sampling: max_prompt_length ({limit}) + max_new_tokens ({sampling.max_new_tokens}) "
                          f"exceed the model's max_position_embeddings ({config.max_position_embeddings}); "
                          "lower one of them")
    return limit


def batch_multiple(mesh, rules: dict | None = None) -> int:
    """Rows a batch must be a multiple of to spread evenly over the mesh's batch axes (1 without a mesh)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[axis] for axis in (rules or DEFAULT_RULES).get("batch", []))


def pad_prompts(prompts: list[list[int]], config: ModelConfig, sampling: SamplingParams, *,
                rows_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token-id prompts -> (tokens [B', P'] int32 left-padded, lengths [B'] int32); B', P' rounded up to buckets,
    the extra rows of length 0 (batch padding). DataError for an empty prompt or a too long one (unless truncated)."""
    limit = max_prompt_length(config, sampling)
    prompts = [list(p) for p in prompts]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise DataError(f"prompt {i} is empty; give at least one token (e.g. the tokenizer's BOS)")
        if len(prompt) > limit:
            if sampling.prompt_truncation != "left":
                raise DataError(f"prompt {i} has {len(prompt)} tokens, more than max_prompt_length {limit} (the "
                                f"cache holds it and max_new_tokens {sampling.max_new_tokens} within the model's "
                                f"{config.max_position_embeddings} positions); shorten it, lower max_new_tokens, "
                                "or set prompt_truncation='left' to keep its last tokens")
            prompts[i] = prompt[-limit:]
        bad = [t for t in prompts[i] if not 0 <= t < config.vocab_size]
        if bad:
            raise DataError(f"prompt {i} has token ids {bad[:5]} outside the model's vocabulary "
                            f"({config.vocab_size})")
    longest = max((len(p) for p in prompts), default=1)
    width = min(_power_of_two(max(longest, MIN_PROMPT_BUCKET)), config.max_position_embeddings - sampling.max_new_tokens)
    rows = -(-_power_of_two(max(len(prompts), MIN_BATCH_BUCKET)) // rows_multiple) * rows_multiple
    tokens = np.full((rows, width), config.pad_token_id or 0, np.int32)
    lengths = np.zeros(rows, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt):] = prompt
        lengths[i] = len(prompt)
    return tokens, lengths


def place_prompts(prompts: list[list[int]], config: ModelConfig, sampling: SamplingParams, *, mesh=None,
                  rules: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """`pad_prompts`, then on the device(s): rows spread over the mesh's batch axes when a mesh is given."""
    tokens, lengths = pad_prompts(prompts, config, sampling, rows_multiple=batch_multiple(mesh, rules))
    if mesh is None:
        return jax.device_put(tokens), jax.device_put(lengths)
    return tuple(jax.device_put(x, parallel.batch_sharding(x.shape, mesh, rules or DEFAULT_RULES))
                 for x in (tokens, lengths))


def generate(config: ModelConfig, params: dict, prompts: list[list[int]], sampling: SamplingParams, *,
             mesh=None, rules: dict | None = None) -> Rollout:
    """Completions of token-id prompts: a Rollout of numpy arrays with len(prompts) * n rows (prompt-major),
    seeded by sampling.seed. `params` may be sharded on `mesh` (then the batch is spread over its batch axes)."""
    if not prompts:
        raise DataError("generate: no prompts given")
    tokens, lengths = place_prompts(prompts, config, sampling, mesh=mesh, rules=rules)
    rollout = make_engine(config, sampling, mesh=mesh, rules=rules).rollout
    out = jax.device_get(rollout(params, tokens, lengths, jax.random.key(sampling.seed)))
    rows = len(prompts) * sampling.n
    return Rollout(*(np.asarray(x)[:rows] for x in out[:-1]), steps=int(out.steps))
