"""Pallas kernels for TPU (Mosaic TPU): one forward pass and two backward passes, all over (row, vocab) tiles.

- forward, grid (row blocks, vocab tiles): online log-sum-exp, entropy and target-logit statistics in lane-dense
  VMEM scratch; writes lse, picked logit and entropy per row.
- d_hidden, grid (row blocks, vocab tiles): recomputes each logits tile, accumulates grad @ w_tile.T in f32.
- d_lm_head, grid (vocab tiles, row blocks): recomputes each logits tile, accumulates hidden.T @ grad in f32.
So the backward recomputes the logits twice (8·N·H·V FLOPs against the 6·N·H·V counted): the price of two
reductions in different directions without atomics. Rows come padded to block_n; the last vocab tile may
reach past V and is masked (its out-of-bounds columns of lm_head are zeroed before they touch a sum).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.fused_logprob.tiles import (
    Settings,
    finish_stats,
    initial_stats,
    logits_and_slope,
    scores_grad,
    update_stats,
)

LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_MIB = 1 << 20


def check_blocks(block_n: int, block_v: int, n: int, v: int, dtype) -> None:
    """Raises ValueError unless (block_n, H) and (H, block_v) are legal Mosaic TPU blocks for [n, H], [H, v]."""
    sublanes = 8 * 4 // jnp.dtype(dtype).itemsize
    if block_n % sublanes and block_n != n:
        raise ValueError(f"fused_logprob tpu: block_n {block_n} must be a multiple of {sublanes} for {dtype} "
                         f"(or equal the row count {n})")
    if block_v % LANES and block_v != v:
        raise ValueError(f"fused_logprob tpu: block_v {block_v} must be a multiple of {LANES} "
                         f"(or equal the vocabulary size {v})")


def _compiler_params(semantics, vmem_bytes: int):
    limit = int(min(max(1.25 * vmem_bytes, 32 * _MIB), 96 * _MIB))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _tile(h_ref, w_ref, vocab_tile, settings: Settings, vocab: int):
    """(logits, slope, column ids, valid columns or None) of one [block_n, block_v] tile."""
    scores = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    logits, slope = logits_and_slope(scores, settings)
    block_v = w_ref.shape[1]
    cols = vocab_tile * block_v + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return logits, slope, cols, (cols < vocab if vocab % block_v else None)


def _tile_grad(h_ref, w_ref, row_refs, vocab_tile, settings: Settings, vocab: int):
    """d loss / d scores [block_n, block_v] f32 of one tile; row_refs: targets, lse, g, c, e, each [block_n, 1]."""
    logits, slope, cols, valid = _tile(h_ref, w_ref, vocab_tile, settings, vocab)
    targets, lse, g, c, e = (ref[...] for ref in row_refs)
    return scores_grad(logits, slope, cols == targets, lse, g, c, e, settings, valid)


def _w_tile(w_ref, vocab_tile, vocab: int):
    """The lm_head tile [H, block_v] with columns past the vocabulary zeroed (they hold garbage otherwise)."""
    w = w_ref[...]
    block_v = w.shape[1]
    if vocab % block_v == 0:
        return w
    cols = vocab_tile * block_v + lax.broadcasted_iota(jnp.int32, w.shape, 1)
    return jnp.where(cols < vocab, w, jnp.zeros_like(w))


def _forward_kernel(h_ref, w_ref, t_ref, lse_ref, picked_ref, entropy_ref, *stats_refs, settings, vocab):
    vocab_tile = pl.program_id(1)

    @pl.when(vocab_tile == 0)
    def _start():
        for ref, value in zip(stats_refs, initial_stats(*stats_refs[0].shape), strict=True):
            ref[...] = value

    logits, _, cols, valid = _tile(h_ref, w_ref, vocab_tile, settings, vocab)
    stats = update_stats(tuple(ref[...] for ref in stats_refs), logits, cols == t_ref[...], valid)
    for ref, value in zip(stats_refs, stats, strict=True):
        ref[...] = value

    @pl.when(vocab_tile == pl.num_programs(1) - 1)
    def _finish():
        lse, entropy = finish_stats(stats)
        lse_ref[...] = lse[:, :1]
        picked_ref[...] = stats[3][:, :1]
        entropy_ref[...] = entropy[:, :1]


def _d_hidden_kernel(h_ref, w_ref, *refs, settings, vocab):
    *row_refs, d_hidden_ref, acc_ref = refs
    vocab_tile = pl.program_id(1)

    @pl.when(vocab_tile == 0)
    def _start():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    grad = _tile_grad(h_ref, w_ref, row_refs, vocab_tile, settings, vocab)
    w = _w_tile(w_ref, vocab_tile, vocab)
    acc_ref[...] += lax.dot_general(grad.astype(w.dtype), w, _NT, preferred_element_type=jnp.float32)

    @pl.when(vocab_tile == pl.num_programs(1) - 1)
    def _finish():
        d_hidden_ref[...] = acc_ref[...].astype(d_hidden_ref.dtype)


def _d_w_kernel(h_ref, w_ref, *refs, settings, vocab):
    *row_refs, d_w_ref, acc_ref = refs
    vocab_tile, row_block = pl.program_id(0), pl.program_id(1)

    @pl.when(row_block == 0)
    def _start():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    grad = _tile_grad(h_ref, w_ref, row_refs, vocab_tile, settings, vocab)
    h = h_ref[...]
    acc_ref[...] += lax.dot_general(h, grad.astype(h.dtype), _TN, preferred_element_type=jnp.float32)

    @pl.when(row_block == pl.num_programs(1) - 1)
    def _finish():
        d_w_ref[...] = acc_ref[...].astype(d_w_ref.dtype)


def forward(hidden, w, targets, settings: Settings):
    """(lse, picked logit, entropy), each [N] f32, for hidden [N, H] (N a multiple of block_n), w [H, V]."""
    (n, h), v = hidden.shape, w.shape[1]
    bn, bv = settings.blocks.block_n, settings.blocks.block_v
    size = hidden.dtype.itemsize
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, settings=settings, vocab=v),
        grid=(n // bn, pl.cdiv(v, bv)),
        in_specs=[pl.BlockSpec((bn, h), lambda i, j: (i, 0)), pl.BlockSpec((h, bv), lambda i, j: (0, j)), row],
        out_specs=[row] * 3,
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 3,
        scratch_shapes=[pltpu.VMEM((bn, LANES), jnp.float32)] * 4,
        compiler_params=_compiler_params(("parallel", "arbitrary"), 2 * (bn + bv) * h * size + 8 * bn * bv * 4),
        interpret=settings.interpret,
    )(hidden, w, targets[:, None])
    return tuple(x[:, 0] for x in outs)


def backward(hidden, w, targets, lse, g, c, e, settings: Settings):
    """(d_hidden [N, H], d_w [H, V]) in the inputs' dtypes, from per-row lse, g, c, e [N] (see tiles.scores_grad)."""
    (n, h), v = hidden.shape, w.shape[1]
    bn, bv = settings.blocks.block_n, settings.blocks.block_v
    size = hidden.dtype.itemsize
    row_inputs = [x[:, None] for x in (targets, lse, g, c, e)]
    tile_bytes = 2 * (bn + bv) * h * size + 8 * bn * bv * 4
    kernel_args = {"settings": settings, "vocab": v}

    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    d_hidden = pl.pallas_call(
        functools.partial(_d_hidden_kernel, **kernel_args),
        grid=(n // bn, pl.cdiv(v, bv)),
        in_specs=[pl.BlockSpec((bn, h), lambda i, j: (i, 0)), pl.BlockSpec((h, bv), lambda i, j: (0, j))]
        + [row] * 5,
        out_specs=pl.BlockSpec((bn, h), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n, h), hidden.dtype),
        scratch_shapes=[pltpu.VMEM((bn, h), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "arbitrary"), tile_bytes + bn * h * (2 * size + 4)),
        interpret=settings.interpret,
    )(hidden, w, *row_inputs)

    row = pl.BlockSpec((bn, 1), lambda j, i: (i, 0))
    d_w = pl.pallas_call(
        functools.partial(_d_w_kernel, **kernel_args),
        grid=(pl.cdiv(v, bv), n // bn),
        in_specs=[pl.BlockSpec((bn, h), lambda j, i: (i, 0)), pl.BlockSpec((h, bv), lambda j, i: (0, j))]
        + [row] * 5,
        out_specs=pl.BlockSpec((h, bv), lambda j, i: (0, j)),
        out_shape=jax.ShapeDtypeStruct((h, v), w.dtype),
        scratch_shapes=[pltpu.VMEM((h, bv), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "arbitrary"), tile_bytes + h * bv * (2 * size + 4)),
        interpret=settings.interpret,
    )(hidden, w, *row_inputs)
    return d_hidden, d_w
