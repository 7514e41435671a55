"""Flash attention kernels for TPU (Mosaic): a forward with an online softmax, and a backward as a dK/dV pass and a
dQ pass that recompute the scores from the saved log-sum-exp.

Inputs are [B, L, H, D] with lengths already padded to whole blocks; the kernels work on [B, H, L, D] (so a block's
last two dims are (rows, D)). GQA: query head h reads key/value head h // (Hq // Hkv) through the index maps, so
K/V are never repeated in memory. Blocks that no query can see by index (causal, window) are skipped and their
index maps clamped to a needed block, so they are not copied either; blocks whose segment-id ranges cannot meet
(scalar-prefetched per-block ranges) are skipped. Per-row running max and sum stay lane-dense, (block, 128).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.reference import (
    MASK_VALUE,
    AttentionSpec,
    index_mask,
    kv_block_range,
    q_block_range,
    segment_ranges,
    segments_may_meet,
)

LANES = 128
_SQ = pl.squeezed
_NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ b.T


def _heads_major(x):
    return x.transpose(0, 2, 1, 3)  # [B, L, H, D] -> [B, H, L, D]


def _block_mask(spec, kv_len, q_start, kv_start, shape, q_axis, q_seg=None, kv_seg=None):
    """Visibility of one block of scores with queries along `q_axis`; None when nothing in it is masked."""
    mask = None
    if spec.causal or spec.sliding_window is not None or kv_len is not None:
        q_idx = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
        mask = index_mask(q_idx, kv_idx, spec, kv_len)
    if q_seg is not None:
        same = (q_seg == kv_seg) & (kv_seg != 0)
        mask = same if mask is None else mask & same
    return mask


def _block_runs(spec, q_block, kv_block, block_q, block_kv, num_kv_blocks, batch, ranges):
    """Whether block (q_block, kv_block) has any visible pair: by index, then by per-block segment ranges."""
    first, last = kv_block_range(q_block, spec, block_q, block_kv, num_kv_blocks)
    runs = (first <= kv_block) & (kv_block <= last)
    if ranges is not None:
        q_min, q_max, kv_min, kv_max = ranges
        runs &= segments_may_meet(q_min[batch, q_block], q_max[batch, q_block],
                                  kv_min[batch, kv_block], kv_max[batch, kv_block])
    return runs


def _capped(spec, s):
    """Soft-capped logits and, for the backward, tanh of the scaled logits (None without a cap)."""
    if spec.softcap is None:
        return s, None
    t = jnp.tanh(s / spec.softcap)
    return spec.softcap * t, t


def _forward_kernel(*refs, spec, kv_len, block_q, block_kv, num_kv_blocks, segments):
    ranges, refs = (refs[:4], refs[4:]) if segments else (None, refs)
    if segments:
        q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    batch, q_block, kv_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_block_runs(spec, q_block, kv_block, block_q, block_kv, num_kv_blocks, batch, ranges))
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * spec.scale
        s, _ = _capped(spec, s)  # [block_q, block_kv]
        mask = _block_mask(spec, kv_len, q_block * block_q, kv_block * block_kv, s.shape, 0,
                           *((q_seg_ref[...], kv_seg_ref[...]) if segments else ()))
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_scr[...], l_scr[...]  # [block_q, LANES], lanes equal
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_next[:, :1])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)  # a row with nothing visible yet adds nothing
        alpha = jnp.exp(m_prev - m_next)
        m_scr[...] = m_next
        l_scr[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * alpha[:, :1] + pv

    @pl.when(kv_block == num_kv_blocks - 1)
    def _finish():
        l, m = l_scr[...][:, :1], m_scr[...][:, :1]
        seen = l > 0.0
        o_ref[...] = (acc_scr[...] * jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)).astype(o_ref.dtype)
        # natural-log LSE; +inf for rows that see no key, so the backward's exp(s - lse) is 0 there
        lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _prefetch(q_segment_ids, kv_segment_ids, block_q, block_kv):
    if q_segment_ids is None:
        return ()
    return (*segment_ranges(q_segment_ids, block_q), *segment_ranges(kv_segment_ids, block_kv))


def _compiler_params(num_parallel: int, num_arbitrary: int):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_parallel + ("arbitrary",) * num_arbitrary)


def forward(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, kv_len: int | None, block_q: int,
            block_kv: int, interpret: bool = False):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D] (whole blocks), segment ids [B, T]/[B, S] or None -> out, lse [B, Hq, T]."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group, nq, nk = hq // hkv, t // block_q, s // block_kv
    segments = q_segment_ids is not None

    def kv_index(bi, h, i, j, *_):
        first, last = kv_block_range(i, spec, block_q, block_kv, nk)
        return bi, lax.div(h, group), jnp.clip(j, first, last), 0

    def kv_seg_index(bi, h, i, j, *_):
        return bi, 0, kv_index(bi, h, i, j)[2]

    q_spec = pl.BlockSpec((_SQ, _SQ, block_q, d), lambda bi, h, i, j, *_: (bi, h, i, 0))
    kv_spec = pl.BlockSpec((_SQ, _SQ, block_kv, d), kv_index)
    in_specs, operands = [q_spec, kv_spec, kv_spec], [_heads_major(q), _heads_major(k), _heads_major(v)]
    if segments:
        in_specs += [pl.BlockSpec((_SQ, block_q, 1), lambda bi, h, i, j, *_: (bi, i, 0)),
                     pl.BlockSpec((_SQ, 1, block_kv), kv_seg_index)]
        operands += [q_segment_ids.reshape(b, t, 1), kv_segment_ids.reshape(b, 1, s)]
    kernel = functools.partial(_forward_kernel, spec=spec, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
                               num_kv_blocks=nk, segments=segments)
    prefetch = _prefetch(q_segment_ids, kv_segment_ids, block_q, block_kv)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(b, hq, nq, nk), in_specs=in_specs,
            out_specs=[q_spec, pl.BlockSpec((_SQ, _SQ, block_q, 1), lambda bi, h, i, j, *_: (bi, h, i, 0))],
            scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, hq, t, d), q.dtype), jax.ShapeDtypeStruct((b, hq, t, 1), jnp.float32)],
        compiler_params=_compiler_params(3, 1),
        interpret=interpret,
        name="flash_attention_forward",
    )(*prefetch, *operands)
    return _heads_major(out), lse[..., 0]


def _dkv_kernel(*refs, spec, kv_len, block_q, block_kv, num_kv_blocks, num_q_blocks, group, segments):
    ranges, refs = (refs[:4], refs[4:]) if segments else (None, refs)
    if segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
         dk_ref, dv_ref, dk_scr, dv_scr) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    batch, kv_block, g, q_block = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (q_block == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_block_runs(spec, q_block, kv_block, block_q, block_kv, num_kv_blocks, batch, ranges))
    def _step():
        q, do = q_ref[...], do_ref[...]
        s_t = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32) * spec.scale
        s_t, tanh_t = _capped(spec, s_t)  # [block_kv, block_q]: keys down, queries across
        p_t = jnp.exp(s_t - lse_ref[...])  # lse [1, block_q]
        mask = _block_mask(spec, kv_len, q_block * block_q, kv_block * block_kv, s_t.shape, 1,
                           *((q_seg_ref[...], kv_seg_ref[...]) if segments else ()))
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv_scr[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[...])
        if tanh_t is not None:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        dk_scr[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when((g == group - 1) & (q_block == num_q_blocks - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * spec.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, spec, kv_len, block_q, block_kv, num_kv_blocks, segments):
    ranges, refs = (refs[:4], refs[4:]) if segments else (None, refs)
    if segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref, dq_scr = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
    batch, q_block, kv_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_block_runs(spec, q_block, kv_block, block_q, block_kv, num_kv_blocks, batch, ranges))
    def _step():
        k = k_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * spec.scale
        s, tanh_s = _capped(spec, s)  # [block_q, block_kv]
        p = jnp.exp(s - lse_ref[...])  # lse [block_q, 1]
        mask = _block_mask(spec, kv_len, q_block * block_q, kv_block * block_kv, s.shape, 0,
                           *((q_seg_ref[...], kv_seg_ref[...]) if segments else ()))
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        if tanh_s is not None:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(kv_block == num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def backward(q, k, v, out, lse, d_out, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, kv_len: int | None,
             block_q: int, block_kv: int, interpret: bool = False):
    """Gradients (dq [B, T, Hq, D], dk and dv [B, S, Hkv, D]) from the forward's out and lse [B, Hq, T] and d_out."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group, nq, nk = hq // hkv, t // block_q, s // block_kv
    segments = q_segment_ids is not None
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))  # [B, Hq, T]
    qh, kh, vh, doh = map(_heads_major, (q, k, v, d_out))
    prefetch = _prefetch(q_segment_ids, kv_segment_ids, block_q, block_kv)
    common = {"spec": spec, "kv_len": kv_len, "block_q": block_q, "block_kv": block_kv, "num_kv_blocks": nk,
              "segments": segments}

    # dK/dV: grid (B, Hkv, kv blocks, group, q blocks); the last two reduce over the query heads and blocks.
    def q_index(bi, kvh, j, g, i, *_):
        first, last = q_block_range(j, spec, block_q, block_kv, nq)
        return bi, kvh * group + g, jnp.clip(i, first, last), 0

    def q_row_index(bi, kvh, j, g, i, *_):  # for [B, H, 1, T] rows (lse, delta)
        _, h, i, _ = q_index(bi, kvh, j, g, i)
        return bi, h, 0, i

    def q_seg_index(bi, kvh, j, g, i, *_):  # for [B, 1, T] rows of segment ids
        return bi, 0, q_index(bi, kvh, j, g, i)[2]

    kv_spec = pl.BlockSpec((_SQ, _SQ, block_kv, d), lambda bi, kvh, j, g, i, *_: (bi, kvh, j, 0))
    q_spec = pl.BlockSpec((_SQ, _SQ, block_q, d), q_index)
    row_spec = pl.BlockSpec((_SQ, _SQ, 1, block_q), q_row_index)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    operands = [qh, kh, vh, doh, lse.reshape(b, hq, 1, t), delta.reshape(b, hq, 1, t)]
    if segments:
        in_specs += [pl.BlockSpec((_SQ, 1, block_q), q_seg_index),
                     pl.BlockSpec((_SQ, block_kv, 1), lambda bi, kvh, j, g, i, *_: (bi, j, 0))]
        operands += [q_segment_ids.reshape(b, 1, t), kv_segment_ids.reshape(b, s, 1)]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, num_q_blocks=nq, group=group, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(b, hkv, nk, group, nq), in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((block_kv, d), jnp.float32), pltpu.VMEM((block_kv, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        compiler_params=_compiler_params(3, 2),
        interpret=interpret,
        name="flash_attention_dkv",
    )(*prefetch, *operands)

    # dQ: grid (B, Hq, q blocks, kv blocks); the last reduces over key blocks.
    def kv_index(bi, h, i, j, *_):
        first, last = kv_block_range(i, spec, block_q, block_kv, nk)
        return bi, lax.div(h, group), jnp.clip(j, first, last), 0

    q_spec = pl.BlockSpec((_SQ, _SQ, block_q, d), lambda bi, h, i, j, *_: (bi, h, i, 0))
    col_spec = pl.BlockSpec((_SQ, _SQ, block_q, 1), lambda bi, h, i, j, *_: (bi, h, i, 0))
    kv_spec = pl.BlockSpec((_SQ, _SQ, block_kv, d), kv_index)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec]
    operands = [qh, kh, vh, doh, lse.reshape(b, hq, t, 1), delta.reshape(b, hq, t, 1)]
    if segments:
        in_specs += [pl.BlockSpec((_SQ, block_q, 1), lambda bi, h, i, j, *_: (bi, i, 0)),
                     pl.BlockSpec((_SQ, 1, block_kv), lambda bi, h, i, j, *_: (bi, 0, kv_index(bi, h, i, j)[2]))]
        operands += [q_segment_ids.reshape(b, t, 1), kv_segment_ids.reshape(b, 1, s)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(b, hq, nq, nk), in_specs=in_specs, out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=_compiler_params(3, 1),
        interpret=interpret,
        name="flash_attention_dq",
    )(*prefetch, *operands)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
