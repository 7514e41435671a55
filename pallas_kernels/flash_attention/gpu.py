"""Flash attention kernels for Hopper-or-newer GPUs (Mosaic GPU, `plgpu.kernel`): forward, dQ and dK/dV.

Each kernel has compute warpgroups (wgmma from shared memory, softmax in registers) and one memory warpgroup
that streams the blocks the compute warpgroups walk over through TMA into a ring of shared-memory slots. The
forward runs two compute warpgroups on neighbouring query rows (sharing each key/value block); the backward
kernels run one. Only the key blocks (forward, dQ) or query blocks (dK/dV) that a tile can see by index are
walked, so fully masked blocks are neither copied nor computed. GQA reads key/value head h // (Hq // Hkv);
the dK/dV kernel sums the query heads of a group itself. Softmax uses exp2 of logits scaled by log2(e); the LSE
read and written is natural-log. Unverified on GPU hardware: the kernels lower for CUDA, and their pipelining,
barrier and masking logic matched the reference once in Pallas's GPU interpret mode (with wgmma and layout casts
swapped for plain jnp, which that interpreter lacks); speed is unmeasured.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention.reference import (
    MASK_VALUE,
    AttentionSpec,
    index_mask,
    kv_block_range,
    q_block_range,
)

BLOCK_Q = 128  # forward: query rows per tile, split over two compute warpgroups
BLOCK_KV = 128  # forward: key rows per step
BLOCK_BWD = 64  # backward: rows per tile and per step (one compute warpgroup)
Q_ROWS_PER_TILE = 128  # forward query tiles are multiples of this (two warpgroups of 64 rows)
FORWARD_WARPGROUPS = 2
MAX_STEPS_IN_FLIGHT = 2  # ring slots per streamed input
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_WGMMA = plgpu.Layout.WGMMA
_ROW, _COL = _WGMMA.reduce(1), _WGMMA.reduce(0)  # a value per row / per column of a WGMMA tile


def supports(device, dtype, head_dim: int) -> bool:
    """Whether the kernels apply: a Hopper-or-newer GPU, bf16 or f16, head dim a multiple of 64 up to 256."""
    capability = getattr(device, "compute_capability", None)
    try:
        major = int(str(capability).split(".")[0])
    except ValueError:
        return False
    return major >= 9 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 64 == 0 and head_dim <= 256


def check_inputs(dtype, head_dim: int) -> None:
    """Raises ValueError when the GPU kernels cannot take this dtype or head dim."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 64 or head_dim > 256:
        raise ValueError(f"flash_attention impl 'gpu' takes bf16/f16 with a head dim multiple of 64 up to 256; got "
                         f"{jnp.dtype(dtype)} with head dim {head_dim}")


def validate_block_sizes(block_q: int, block_kv: int, block_q_bwd: int, block_kv_bwd: int) -> None:
    """Raises ValueError unless forward query tiles are multiples of 128 and every other block of 64."""
    if block_q % Q_ROWS_PER_TILE or any(b % 64 for b in (block_kv, block_q_bwd, block_kv_bwd)):
        raise ValueError(f"flash_attention impl 'gpu': block_q must be a multiple of {Q_ROWS_PER_TILE} (two "
                         f"warpgroups of 64 rows) and the other blocks multiples of 64; got {block_q}, {block_kv}, "
                         f"{block_q_bwd}, {block_kv_bwd}")


def max_block_kv(head_dim: int) -> int:
    """The largest forward key block whose double-buffered K and V (plus the query tiles) fit in shared memory."""
    return BLOCK_KV if head_dim <= 128 else 64


def _ring_barriers(num_streams: int):
    """One barrier array per streamed input, a barrier per ring slot, completed by that slot's TMA copy."""
    return tuple(plgpu.Barrier(num_barriers=MAX_STEPS_IN_FLIGHT) for _ in range(num_streams))


def _tile_smem(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _stream_blocks(sources, rings, loaded, consumed, num_steps):
    """Memory warpgroup: copies step n of every source (a function of n giving a GMEM slice) into ring slot n % K.

    A slot is reused only after the compute warpgroups have arrived on its `consumed` barrier.
    """
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, num_steps)
    def _step(n):
        slot = lax.rem(n, MAX_STEPS_IN_FLIGHT)

        @pl.when(n >= MAX_STEPS_IN_FLIGHT)
        def _wait_free():
            plgpu.barrier_wait(consumed.at[slot])

        for source, ring, barrier in zip(sources, rings, loaded):
            plgpu.copy_gmem_to_smem(source(n), ring.at[slot], barrier.at[slot])

    @pl.loop(jnp.maximum(num_steps - MAX_STEPS_IN_FLIGHT, 0), num_steps)
    def _drain(n):  # observe the last releases too, so every barrier phase is waited on
        plgpu.barrier_wait(consumed.at[lax.rem(n, MAX_STEPS_IN_FLIGHT)])


def _load_now(pairs, barriers):
    """Copies (GMEM slice, SMEM ref) pairs, one barrier each, and waits for all of them."""
    for (source, target), barrier in zip(pairs, barriers):
        plgpu.copy_gmem_to_smem(source, target, barrier)
    for barrier in barriers[:len(pairs)]:
        plgpu.barrier_wait(barrier)


def _scores(spec: AttentionSpec, raw):
    """Logits in log2 units from raw q.k (f32), and tanh of the scaled logits for the backward (None without cap)."""
    if spec.softcap is None:
        return raw * (spec.scale * _LOG2E), None
    t = jnp.tanh(raw * (spec.scale / spec.softcap))
    return t * (spec.softcap * _LOG2E), t


def _tile_mask(spec, kv_len, q_start, kv_start, shape, q_axis, q_seg=None, kv_seg=None):
    """Visibility of a WGMMA tile of scores (queries along `q_axis`); q_seg/kv_seg are per-row/column vectors."""
    mask = None
    if spec.causal or spec.sliding_window is not None or kv_len is not None:
        q_idx = q_start + plgpu.broadcasted_iota(jnp.int32, shape, q_axis, layout=_WGMMA)
        kv_idx = kv_start + plgpu.broadcasted_iota(jnp.int32, shape, 1 - q_axis, layout=_WGMMA)
        mask = index_mask(q_idx, kv_idx, spec, kv_len)
    if q_seg is not None:
        q_seg = lax.broadcast_in_dim(q_seg, shape, [q_axis])
        kv_seg = lax.broadcast_in_dim(kv_seg, shape, [1 - q_axis])
        same = (q_seg == kv_seg) & (kv_seg != 0)
        mask = same if mask is None else mask & same
    return mask


def _matmul(a, b, shape):
    """a @ b into a fresh f32 WGMMA accumulator of `shape` (a from SMEM or registers, b from SMEM)."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _matmul_add(acc, a, b):
    """acc + a @ b, accumulating in place in a WGMMA accumulator."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(run)(plgpu.ACC.init(acc))


def _zeros(shape, layout):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)


def forward(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, kv_len: int | None, block_q: int,
            block_kv: int, interpret: bool = False):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D] (whole blocks), segment ids [B, T]/[B, S] or None -> out, lse [B, Hq, T]."""
    del interpret  # the GPU kernel has no interpret mode here
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group, nk, wgs = hq // hkv, s // block_kv, FORWARD_WARPGROUPS
    rows = block_q // wgs
    segments = q_segment_ids is not None
    pure_causal = spec.causal and spec.sliding_window is None and kv_len is None and not segments

    def body(*refs, q_smem, k_ring, v_ring, kv_seg_ring, q_seg_smem, lse_smem, q_loaded, loaded, consumed):
        if segments:
            q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, out_ref, lse_ref = refs
        else:
            q_ref, k_ref, v_ref, out_ref, lse_ref = refs
        batch, head, tile, wg = (lax.axis_index(n) for n in ("batch", "heads", "q_tiles", "wg"))
        kv_head = lax.div(head, group)
        first, last = kv_block_range(tile, spec, block_q, block_kv, nk)
        num_steps = jnp.maximum(last - first + 1, 0)

        @pl.when(wg < wgs)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_start = tile * block_q + wg * rows
            q_rows = pl.ds(q_start, rows)
            q_tile = q_smem.at[wg]
            pairs = [(q_ref.at[batch, q_rows, head], q_tile)]
            if segments:
                pairs.append((q_seg_ref.at[batch, q_rows], q_seg_smem.at[wg]))
            _load_now(pairs, [q_loaded.at[wg * 2 + i] for i in range(2)])
            q_seg = plgpu.load(q_seg_smem.at[wg], (), layout=_ROW) if segments else None

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j - first, MAX_STEPS_IN_FLIGHT)
                plgpu.barrier_wait(loaded[0].at[slot])
                s2, _ = _scores(spec, _matmul(q_tile, plgpu.transpose_ref(k_ring.at[slot], (1, 0)),
                                              (rows, block_kv)))
                mask = None
                if masked:
                    kv_seg = None
                    if segments:
                        plgpu.barrier_wait(loaded[2].at[slot])
                        kv_seg = plgpu.load(kv_seg_ring.at[slot], (), layout=_COL)
                    mask = _tile_mask(spec, kv_len, q_start, j * block_kv, (rows, block_kv), 0, q_seg, kv_seg)
                    s2 = jnp.where(mask, s2, MASK_VALUE)
                m_next = jnp.maximum(m, s2.max(axis=1))
                alpha = jnp.exp2(m - m_next)
                p = jnp.exp2(s2 - lax.broadcast_in_dim(m_next, s2.shape, [0]))
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)  # rows with nothing visible yet add nothing
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(loaded[1].at[slot])
                acc = _matmul_add(acc, p.astype(v_ring.dtype), v_ring.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return acc, m_next, l

            carry = (_zeros((rows, d), _WGMMA), plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), _ROW),
                     _zeros((rows,), _ROW))
            any_mask = spec.causal or spec.sliding_window is not None or kv_len is not None or segments
            if pure_causal:  # blocks wholly at or below this warpgroup's first row need no mask
                unmasked_end = jnp.clip(lax.div(q_start + 1, block_kv), first, last + 1)
                carry = lax.fori_loop(first, unmasked_end, functools.partial(step, masked=False), carry)
                carry = lax.fori_loop(unmasked_end, last + 1, functools.partial(step, masked=True), carry)
            else:
                carry = lax.fori_loop(first, last + 1, functools.partial(step, masked=any_mask), carry)
            acc, m, l = carry
            seen = l > 0.0
            inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
            q_tile[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(q_tile.dtype)
            # natural-log LSE; +inf for rows that see no key, so the backward's exp(s - lse) is 0 there
            lse_smem.at[wg][...] = jnp.where(seen, m * _LN2 + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, out_ref.at[batch, q_rows, head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, q_rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            kv_rows = lambda n: pl.ds((first + n) * block_kv, block_kv)
            sources = [lambda n: k_ref.at[batch, kv_rows(n), kv_head], lambda n: v_ref.at[batch, kv_rows(n), kv_head]]
            rings = [k_ring, v_ring]
            if segments:
                sources.append(lambda n: kv_seg_ref.at[batch, kv_rows(n)])
                rings.append(kv_seg_ring)
            _stream_blocks(sources, rings, loaded[:len(rings)], consumed, num_steps)

    operands = (q, k, v, q_segment_ids, kv_segment_ids) if segments else (q, k, v)
    scratch = {
        "q_smem": _tile_smem((wgs, rows, d), q.dtype),
        "k_ring": _tile_smem((MAX_STEPS_IN_FLIGHT, block_kv, d), k.dtype),
        "v_ring": _tile_smem((MAX_STEPS_IN_FLIGHT, block_kv, d), v.dtype),
        "kv_seg_ring": plgpu.SMEM((MAX_STEPS_IN_FLIGHT, block_kv), jnp.int32),
        "q_seg_smem": plgpu.SMEM((wgs, rows), jnp.int32),
        "lse_smem": plgpu.SMEM((wgs, rows), jnp.float32),
        "q_loaded": plgpu.Barrier(num_barriers=wgs * 2),
        "loaded": _ring_barriers(3),
        "consumed": plgpu.Barrier(num_arrivals=wgs, num_barriers=MAX_STEPS_IN_FLIGHT),
    }
    out, lse = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
        scratch_types=scratch,
        grid=(hq, t // block_q, b), grid_names=("heads", "q_tiles", "batch"),
        num_threads=wgs + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*operands)
    return out, lse


def backward(q, k, v, out, lse, d_out, q_segment_ids, kv_segment_ids, spec: AttentionSpec, *, kv_len: int | None,
             block_q: int, block_kv: int, interpret: bool = False):
    """Gradients (dq [B, T, Hq, D], dk and dv [B, S, Hkv, D]) from the forward's out and lse [B, Hq, T] and d_out."""
    del interpret
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))  # [B, Hq, T]
    lse2 = lse * _LOG2E  # exp2 units, as the kernels' scores
    dq = _dq(q, k, v, d_out, lse2, delta, q_segment_ids, kv_segment_ids, spec, kv_len, block_q, block_kv)
    dk, dv = _dkv(q, k, v, d_out, lse2, delta, q_segment_ids, kv_segment_ids, spec, kv_len, block_q, block_kv)
    return dq, dk, dv


def _dq(q, k, v, d_out, lse2, delta, q_segment_ids, kv_segment_ids, spec, kv_len, block_q, block_kv):
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group, nk = hq // hkv, s // block_kv
    segments = q_segment_ids is not None

    def body(*refs, q_smem, do_smem, lse_smem, delta_smem, q_seg_smem, k_ring, v_ring, kv_seg_ring, q_loaded,
             loaded, consumed):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
        q_seg_ref, kv_seg_ref = refs[6:8] if segments else (None, None)
        dq_ref = refs[-1]
        batch, head, tile, wg = (lax.axis_index(n) for n in ("batch", "heads", "q_tiles", "wg"))
        kv_head = lax.div(head, group)
        first, last = kv_block_range(tile, spec, block_q, block_kv, nk)
        q_rows = pl.ds(tile * block_q, block_q)

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            pairs = [(q_ref.at[batch, q_rows, head], q_smem), (do_ref.at[batch, q_rows, head], do_smem),
                     (lse_ref.at[batch, head, q_rows], lse_smem), (delta_ref.at[batch, head, q_rows], delta_smem)]
            if segments:
                pairs.append((q_seg_ref.at[batch, q_rows], q_seg_smem))
            _load_now(pairs, [q_loaded.at[i] for i in range(5)])
            lse_rows = plgpu.load(lse_smem, (), layout=_ROW)
            delta_rows = plgpu.load(delta_smem, (), layout=_ROW)
            q_seg = plgpu.load(q_seg_smem, (), layout=_ROW) if segments else None
            shape = (block_q, block_kv)

            def step(j, dq_acc):
                slot = lax.rem(j - first, MAX_STEPS_IN_FLIGHT)
                plgpu.barrier_wait(loaded[0].at[slot])
                s2, tanh_s = _scores(spec, _matmul(q_smem, plgpu.transpose_ref(k_ring.at[slot], (1, 0)), shape))
                p = jnp.exp2(s2 - lax.broadcast_in_dim(lse_rows, shape, [0]))
                kv_seg = None
                if segments:
                    plgpu.barrier_wait(loaded[2].at[slot])
                    kv_seg = plgpu.load(kv_seg_ring.at[slot], (), layout=_COL)
                mask = _tile_mask(spec, kv_len, tile * block_q, j * block_kv, shape, 0, q_seg, kv_seg)
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                plgpu.barrier_wait(loaded[1].at[slot])
                dp = _matmul(do_smem, plgpu.transpose_ref(v_ring.at[slot], (1, 0)), shape)
                ds = p * (dp - lax.broadcast_in_dim(delta_rows, shape, [0]))
                if tanh_s is not None:
                    ds = ds * (1.0 - tanh_s * tanh_s)
                dq_acc = _matmul_add(dq_acc, ds.astype(k_ring.dtype), k_ring.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return dq_acc

            dq_acc = lax.fori_loop(first, last + 1, step, _zeros((block_q, d), _WGMMA))
            q_smem[...] = (dq_acc * spec.scale).astype(q_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, q_rows, head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            kv_rows = lambda n: pl.ds((first + n) * block_kv, block_kv)
            sources = [lambda n: k_ref.at[batch, kv_rows(n), kv_head], lambda n: v_ref.at[batch, kv_rows(n), kv_head]]
            rings = [k_ring, v_ring]
            if segments:
                sources.append(lambda n: kv_seg_ref.at[batch, kv_rows(n)])
                rings.append(kv_seg_ring)
            _stream_blocks(sources, rings, loaded[:len(rings)], consumed,
                           jnp.maximum(last - first + 1, 0))

    segs = (q_segment_ids, kv_segment_ids) if segments else ()
    scratch = {
        "q_smem": _tile_smem((block_q, d), q.dtype), "do_smem": _tile_smem((block_q, d), q.dtype),
        "lse_smem": plgpu.SMEM((block_q,), jnp.float32), "delta_smem": plgpu.SMEM((block_q,), jnp.float32),
        "q_seg_smem": plgpu.SMEM((block_q,), jnp.int32),
        "k_ring": _tile_smem((MAX_STEPS_IN_FLIGHT, block_kv, d), k.dtype),
        "v_ring": _tile_smem((MAX_STEPS_IN_FLIGHT, block_kv, d), v.dtype),
        "kv_seg_ring": plgpu.SMEM((MAX_STEPS_IN_FLIGHT, block_kv), jnp.int32),
        "q_loaded": plgpu.Barrier(num_barriers=5),
        "loaded": _ring_barriers(3),
        "consumed": plgpu.Barrier(num_barriers=MAX_STEPS_IN_FLIGHT),
    }
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), scratch_types=scratch,
        grid=(hq, t // block_q, b), grid_names=("heads", "q_tiles", "batch"), num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, d_out, lse2, delta, *segs)


def _dkv(q, k, v, d_out, lse2, delta, q_segment_ids, kv_segment_ids, spec, kv_len, block_q, block_kv):
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group, nq = hq // hkv, t // block_q
    segments = q_segment_ids is not None

    def body(*refs, k_smem, v_smem, kv_seg_smem, q_ring, do_ring, lse_ring, delta_ring, q_seg_ring, kv_loaded,
             loaded, consumed):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
        q_seg_ref, kv_seg_ref = refs[6:8] if segments else (None, None)
        dk_ref, dv_ref = refs[-2:]
        batch, kv_head, tile, wg = (lax.axis_index(n) for n in ("batch", "kv_heads", "kv_tiles", "wg"))
        first, last = q_block_range(tile, spec, block_q, block_kv, nq)
        per_head = jnp.maximum(last - first + 1, 0)  # steps walk (query head of the group, query block) pairs
        kv_rows = pl.ds(tile * block_kv, block_kv)

        def head_and_block(n):
            n_blocks = jnp.maximum(per_head, 1)
            return kv_head * group + lax.div(n, n_blocks), first + lax.rem(n, n_blocks)

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            pairs = [(k_ref.at[batch, kv_rows, kv_head], k_smem), (v_ref.at[batch, kv_rows, kv_head], v_smem)]
            if segments:
                pairs.append((kv_seg_ref.at[batch, kv_rows], kv_seg_smem))
            _load_now(pairs, [kv_loaded.at[i] for i in range(3)])
            kv_seg = plgpu.load(kv_seg_smem, (), layout=_ROW) if segments else None
            shape = (block_kv, block_q)  # keys down, queries across

            def step(n, carry):
                dk_acc, dv_acc = carry
                _, i = head_and_block(n)
                slot = lax.rem(n, MAX_STEPS_IN_FLIGHT)
                for stream in range(4):
                    plgpu.barrier_wait(loaded[stream].at[slot])
                s2_t, tanh_t = _scores(spec, _matmul(k_smem, plgpu.transpose_ref(q_ring.at[slot], (1, 0)), shape))
                lse_cols = plgpu.load(lse_ring.at[slot], (), layout=_COL)
                p_t = jnp.exp2(s2_t - lax.broadcast_in_dim(lse_cols, shape, [1]))
                q_seg = None
                if segments:
                    plgpu.barrier_wait(loaded[4].at[slot])
                    q_seg = plgpu.load(q_seg_ring.at[slot], (), layout=_COL)
                mask = _tile_mask(spec, kv_len, i * block_q, tile * block_kv, shape, 1, q_seg, kv_seg)
                if mask is not None:
                    p_t = jnp.where(mask, p_t, 0.0)
                dv_acc = _matmul_add(dv_acc, p_t.astype(do_ring.dtype), do_ring.at[slot])
                dp_t = _matmul(v_smem, plgpu.transpose_ref(do_ring.at[slot], (1, 0)), shape)
                delta_cols = plgpu.load(delta_ring.at[slot], (), layout=_COL)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta_cols, shape, [1]))
                if tanh_t is not None:
                    ds_t = ds_t * (1.0 - tanh_t * tanh_t)
                dk_acc = _matmul_add(dk_acc, ds_t.astype(q_ring.dtype), q_ring.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return dk_acc, dv_acc

            zeros = _zeros((block_kv, d), _WGMMA)
            dk_acc, dv_acc = lax.fori_loop(0, per_head * group, step, (zeros, zeros))
            k_smem[...] = (dk_acc * spec.scale).astype(k_smem.dtype)
            v_smem[...] = dv_acc.astype(v_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, kv_rows, kv_head])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, kv_rows, kv_head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            def rows(n):
                h, i = head_and_block(n)
                return h, pl.ds(i * block_q, block_q)

            sources = [lambda n: q_ref.at[batch, rows(n)[1], rows(n)[0]],
                       lambda n: do_ref.at[batch, rows(n)[1], rows(n)[0]],
                       lambda n: lse_ref.at[batch, rows(n)[0], rows(n)[1]],
                       lambda n: delta_ref.at[batch, rows(n)[0], rows(n)[1]]]
            rings = [q_ring, do_ring, lse_ring, delta_ring]
            if segments:
                sources.append(lambda n: q_seg_ref.at[batch, rows(n)[1]])
                rings.append(q_seg_ring)
            _stream_blocks(sources, rings, loaded[:len(rings)], consumed, per_head * group)

    segs = (q_segment_ids, kv_segment_ids) if segments else ()
    scratch = {
        "k_smem": _tile_smem((block_kv, d), k.dtype), "v_smem": _tile_smem((block_kv, d), v.dtype),
        "kv_seg_smem": plgpu.SMEM((block_kv,), jnp.int32),
        "q_ring": _tile_smem((MAX_STEPS_IN_FLIGHT, block_q, d), q.dtype),
        "do_ring": _tile_smem((MAX_STEPS_IN_FLIGHT, block_q, d), q.dtype),
        "lse_ring": plgpu.SMEM((MAX_STEPS_IN_FLIGHT, block_q), jnp.float32),
        "delta_ring": plgpu.SMEM((MAX_STEPS_IN_FLIGHT, block_q), jnp.float32),
        "q_seg_ring": plgpu.SMEM((MAX_STEPS_IN_FLIGHT, block_q), jnp.int32),
        "kv_loaded": plgpu.Barrier(num_barriers=3),
        "loaded": _ring_barriers(5),
        "consumed": plgpu.Barrier(num_barriers=MAX_STEPS_IN_FLIGHT),
    }
    kv_type = jax.ShapeDtypeStruct(k.shape, k.dtype)
    return plgpu.kernel(
        body, out_type=(kv_type, kv_type), scratch_types=scratch,
        grid=(hkv, s // block_kv, b), grid_names=("kv_heads", "kv_tiles", "batch"), num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, d_out, lse2, delta, *segs)
