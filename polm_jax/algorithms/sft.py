"""SFT: masked next-token cross-entropy, packing-aware, returned as (sum, count) so the step's mean is token-weighted.

A target token t counts when loss_mask[t] = 1 and it belongs to the same (non-padding) segment as token t-1,
so a packed row never predicts one example's first token from the previous example.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from polm_jax.models.config import ModelConfig
from polm_jax.models.transformer import forward, lm_head
from polm_jax.ops.logprob import token_logprobs


def target_mask(batch: dict):
    """[B, T-1] float: which next-token targets tokens[:, 1:] are trained on."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (batch["loss_mask"][:, 1:] > 0) & same


def sequence_logprobs(config: ModelConfig, params: dict, batch: dict, rng=None):
    """Log-probs [B, T-1] (f32) of tokens[:, 1:] under the model, each given the tokens before it in its segment;
    computed by config.logprob_impl (see polm_jax.ops.logprob)."""
    hidden = forward(config, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                     return_hidden=True, dropout_rng=rng)
    return token_logprobs(hidden[:, :-1], lm_head(config, params), batch["tokens"][:, 1:],
                          softcap=config.final_softcap, impl=config.logprob_impl)


def sft_loss(config: ModelConfig, model_params: Callable[[dict, dict], dict]):
    """The SFT loss_fn for make_train_step; `model_params(trainable, frozen)` builds the params the model reads."""

    def loss_fn(params, frozen, batch, rng):
        mask = target_mask(batch).astype(jnp.float32)
        logp = sequence_logprobs(config, model_params(params, frozen), batch, rng)
        count = mask.sum()
        return -(logp * mask).sum(), count, {}

    return loss_fn
