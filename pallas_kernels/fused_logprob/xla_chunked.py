"""Plain XLA, tiled: loops over row blocks and vocabulary tiles, so only a [block_n, block_v] logits tile exists.

Runs on every backend (the CPU default). The forward walks each row block across the vocabulary; the backward
walks each vocabulary tile down the rows, so it accumulates d_hidden [N, H] in f32 and writes each d_lm_head
tile once. Vocabularies that are not a multiple of block_v end with one smaller (static) tile.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.fused_logprob.tiles import (
    Settings,
    finish_stats,
    initial_stats,
    logits_and_slope,
    scores_grad,
    update_stats,
)


def over_vocab(step, carry, vocab: int, block_v: int):
    """carry = step(carry, start, size) over the column tiles [start, start + size) that cover [0, vocab)."""
    full = vocab // block_v
    carry = lax.fori_loop(0, full, lambda j, c: step(c, j * block_v, block_v), carry)
    if vocab % block_v:
        carry = step(carry, full * block_v, vocab % block_v)
    return carry


def _tile_logits(hidden, w_tile, settings: Settings):
    """(logits, slope) of hidden [n, H] against w_tile [H, v], accumulated in f32."""
    return logits_and_slope(jnp.dot(hidden, w_tile, preferred_element_type=jnp.float32), settings)


def _hits(start, size: int, targets):
    """[n, size] bool: column start + k is the row's target (targets [n, 1])."""
    return start + lax.broadcasted_iota(jnp.int32, (1, size), 1) == targets


def forward(hidden, w, targets, settings: Settings):
    """(lse, picked logit, entropy), each [N] f32, for hidden [N, H] (N a multiple of block_n), w [H, V]."""
    n, h = hidden.shape
    bn = settings.blocks.block_n

    def row_block(args):
        rows, row_targets = args  # [bn, H], [bn, 1]

        def vocab_step(stats, start, size):
            logits, _ = _tile_logits(rows, lax.dynamic_slice_in_dim(w, start, size, axis=1), settings)
            return update_stats(stats, logits, _hits(start, size, row_targets))

        stats = over_vocab(vocab_step, initial_stats(bn), w.shape[1], settings.blocks.block_v)
        lse, entropy = finish_stats(stats)
        return lse[:, 0], stats[3][:, 0], entropy[:, 0]

    outs = lax.map(row_block, (hidden.reshape(n // bn, bn, h), targets.reshape(n // bn, bn, 1)))
    return tuple(x.reshape(n) for x in outs)


def backward(hidden, w, targets, lse, g, c, e, settings: Settings):
    """(d_hidden [N, H], d_w [H, V]) in the inputs' dtypes, from per-row lse, g, c, e [N] (see tiles.scores_grad)."""
    n, h = hidden.shape
    bn = settings.blocks.block_n
    blocks = n // bn
    rows = hidden.reshape(blocks, bn, h)
    per_row = [x.reshape(blocks, bn, 1) for x in (targets, lse, g, c, e)]

    def vocab_step(carry, start, size):
        d_hidden, d_w = carry
        w_tile = lax.dynamic_slice_in_dim(w, start, size, axis=1)

        def row_step(i, inner):
            d_hidden, d_w_tile = inner
            row_targets, row_lse, row_g, row_c, row_e = (x[i] for x in per_row)
            logits, slope = _tile_logits(rows[i], w_tile, settings)
            grad = scores_grad(logits, slope, _hits(start, size, row_targets), row_lse, row_g, row_c, row_e, settings)
            d_rows = jnp.dot(grad.astype(w.dtype), w_tile.T, preferred_element_type=jnp.float32)
            d_w_tile += jnp.dot(rows[i].T, grad.astype(hidden.dtype), preferred_element_type=jnp.float32)
            return d_hidden.at[i].add(d_rows), d_w_tile

        d_hidden, d_w_tile = lax.fori_loop(0, blocks, row_step, (d_hidden, jnp.zeros((h, size), jnp.float32)))
        return d_hidden, lax.dynamic_update_slice_in_dim(d_w, d_w_tile.astype(w.dtype), start, axis=1)

    init = (jnp.zeros((blocks, bn, h), jnp.float32), jnp.zeros_like(w))
    d_hidden, d_w = over_vocab(vocab_step, init, w.shape[1], settings.blocks.block_v)
    return d_hidden.reshape(n, h).astype(hidden.dtype), d_w

