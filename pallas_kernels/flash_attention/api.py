"""flash_attention: argument checks, block sizes, padding to whole blocks, the custom VJP and the choice of kernel.

The forward saves only the per-row log-sum-exp (natural log) besides its inputs and output; the backward
recomputes the scores block by block. `impl="auto"` takes the TPU kernel on TPU, the Mosaic GPU kernel on
Hopper-or-newer GPUs (bf16/f16, head dim a multiple of 64), and the plain-jnp reference (XLA) everywhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.flash_attention.reference import AttentionSpec, reference_attention

IMPLS = ("auto", "reference", "tpu", "gpu")
_KERNELS = {"tpu": tpu, "gpu": gpu}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows of queries and of keys per block, forward and backward (the backward's default to the forward's)."""

    block_q: int
    block_kv: int
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None

    @property
    def backward(self) -> tuple[int, int]:
        """(block_q, block_kv) of the backward kernels."""
        return self.block_q_bwd or self.block_q, self.block_kv_bwd or self.block_kv

    @property
    def every(self) -> tuple[int, int, int, int]:
        """All four: forward (q, kv), backward (q, kv)."""
        return (self.block_q, self.block_kv, *self.backward)


# Largest blocks per backend; a short sequence gets one block rounded up to the alignment (below).
DEFAULT_BLOCK_SIZES = {"tpu": BlockSizes(512, 512),
                       "gpu": BlockSizes(gpu.BLOCK_Q, gpu.BLOCK_KV, gpu.BLOCK_BWD, gpu.BLOCK_BWD)}
_ALIGNMENT = {"tpu": 128, "gpu": 64, "interpret": 8}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_block_sizes(impl: str, q_len: int, kv_len: int, *, head_dim: int, interpret: bool = False) -> BlockSizes:
    """The block sizes `flash_attention` uses for kernel `impl` ("tpu" or "gpu") when none are given."""
    largest = DEFAULT_BLOCK_SIZES[impl]
    align = _ALIGNMENT["interpret" if interpret else impl]
    fit = lambda block, n: min(block, _round_up(n, align))  # one block for a short sequence
    block_q_bwd, block_kv_bwd = largest.backward
    block_q, block_kv = fit(largest.block_q, q_len), fit(largest.block_kv, kv_len)
    if impl == "gpu":
        block_q = _round_up(block_q, gpu.Q_ROWS_PER_TILE)
        block_kv = min(block_kv, gpu.max_block_kv(head_dim))  # the key/value ring must fit in shared memory
    return BlockSizes(block_q, block_kv, fit(block_q_bwd, q_len), fit(block_kv_bwd, kv_len))


def validate_block_sizes(blocks: BlockSizes, impl: str, interpret: bool = False) -> None:
    """Raises ValueError when a block size does not suit kernel `impl` (interpret mode needs multiples of 8 only)."""
    align = _ALIGNMENT["interpret" if interpret else impl]
    bad = [b for b in blocks.every if b <= 0 or b % align]
    if bad:
        why = ("a block's last two dims must be divisible by 8 and 128 on TPU" if impl == "tpu" and not interpret
               else f"block sizes must be positive multiples of {align}")
        raise ValueError(f"flash_attention block sizes {blocks} do not suit impl {impl!r}: {why}")
    if impl == "gpu":
        gpu.validate_block_sizes(blocks.block_q, blocks.block_kv, *blocks.backward)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call: masks, kernel, blocks, true key length (None: keys not padded)."""

    spec: AttentionSpec
    impl: str
    blocks: BlockSizes
    kv_len: int | None
    interpret: bool


def _run_forward(plan: _Plan, q, k, v, q_seg, kv_seg):
    return _KERNELS[plan.impl].forward(q, k, v, q_seg, kv_seg, plan.spec, kv_len=plan.kv_len,
                                       block_q=plan.blocks.block_q, block_kv=plan.blocks.block_kv,
                                       interpret=plan.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: _Plan, q, k, v, q_seg, kv_seg):
    return _run_forward(plan, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(plan: _Plan, q, k, v, q_seg, kv_seg):
    out, lse = _run_forward(plan, q, k, v, q_seg, kv_seg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(plan: _Plan, residuals, d_out):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    block_q, block_kv = plan.blocks.backward
    dq, dk, dv = _KERNELS[plan.impl].backward(q, k, v, out, lse, d_out, q_seg, kv_seg, plan.spec, kv_len=plan.kv_len,
                                              block_q=block_q, block_kv=block_kv, interpret=plan.interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_inputs(q, k, v, segment_ids, sliding_window, softcap):
    """The (q, kv) segment ids after checking shapes, dtypes and options; errors name the offending argument."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"flash_attention wants q [B, T, Hq, D] and k, v [B, S, Hkv, D] of one shape; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"flash_attention: q {q.shape} and k {k.shape} must share batch and head dim, and the "
                         "query heads must be a multiple of the key/value heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"flash_attention: sliding_window must be a positive int or None, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"flash_attention: softcap must be positive or None, got {softcap!r}")
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    elif q.shape[1] == k.shape[1]:
        q_seg = kv_seg = segment_ids
    else:
        raise ValueError("flash_attention: with T != S pass segment_ids as a pair (q_segment_ids [B, T], "
                         "kv_segment_ids [B, S])")
    if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
        raise ValueError(f"flash_attention: segment ids {q_seg.shape} and {kv_seg.shape} do not match q "
                         f"{q.shape[:2]} and k {k.shape[:2]} ([B, T] and [B, S])")
    return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


def choose_impl(impl: str, interpret: bool, dtype, head_dim: int) -> str:
    """The implementation that runs: "reference", "tpu" or "gpu" (interpret mode runs the TPU kernel).

    "auto" takes the TPU kernel on TPU. The GPU kernel runs only when asked for (impl="gpu"): it has not yet been
    checked or timed on a GPU, and auto picks a kernel only where it is known to be right and faster.
    """
    if impl not in IMPLS:
        raise ValueError(f"flash_attention impl {impl!r} is not one of {IMPLS}")
    if interpret:
        if impl == "gpu":
            raise ValueError("flash_attention: interpret=True runs the TPU kernel; use impl='tpu' or 'auto'")
        return "reference" if impl == "reference" else "tpu"
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    return "tpu" if backend == "tpu" else "reference"


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, sliding_window: int | None = None,
                    softcap: float | None = None, scale: float | None = None, impl: str = "auto",
                    interpret: bool = False, block_sizes: BlockSizes | None = None):
    """Attention of q [B, T, Hq, D] over k, v [B, S, Hkv, D] -> [B, T, Hq, D], differentiable.

    Query i sees key j when j <= i (`causal`, top-left aligned), i - j < `sliding_window`, and, with
    `segment_ids` ([B, T] when T == S, or a pair ([B, T], [B, S])), both ids are equal and nonzero. Logits are
    `scale` (default D ** -0.5) times q.k, soft-capped as cap * tanh(x / cap). Rows that see no key give zeros.
    """
    q_seg, kv_seg = _check_inputs(q, k, v, segment_ids, sliding_window, softcap)
    t, s, d = q.shape[1], k.shape[1], q.shape[3]
    spec = AttentionSpec(causal=causal, sliding_window=sliding_window, softcap=softcap,
                         scale=d ** -0.5 if scale is None else float(scale))
    impl = choose_impl(impl, interpret, q.dtype, d)
    if impl == "reference":
        return reference_attention(q, k, v, spec, q_seg, kv_seg)
    if impl == "gpu":
        gpu.check_inputs(q.dtype, d)
    blocks = block_sizes or default_block_sizes(impl, t, s, head_dim=d, interpret=interpret)
    validate_block_sizes(blocks, impl, interpret)
    t_pad = _round_up(t, math.lcm(blocks.block_q, blocks.backward[0])) - t
    s_pad = _round_up(s, math.lcm(blocks.block_kv, blocks.backward[1])) - s
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2)) if n else x  # zeros: segment 0
    q, k, v = pad(q, t_pad), pad(k, s_pad), pad(v, s_pad)
    if q_seg is not None:
        q_seg, kv_seg = pad(q_seg, t_pad), pad(kv_seg, s_pad)
    plan = _Plan(spec, impl, blocks, kv_len=s if s_pad else None, interpret=interpret)
    return _flash(plan, q, k, v, q_seg, kv_seg)[:, :t]
