"""Pallas kernels for Hopper-or-newer NVIDIA GPUs (Mosaic GPU, wgmma): tiled matmuls with fused epilogues.

Unverified on hardware: written and lowered for the CUDA platform on a machine without a GPU.

- forward: grid (row blocks, vocab tiles), every tile independent. Each computes its [block_n, block_v] logits
  (wgmma over block_h slices of H, pipelined through shared memory) and writes that tile's own max, sum of
  exponentials, shifted entropy sum and target logit per row; XLA merges the [V / block_v, N] partials.
- backward: per vocabulary chunk of CHUNK_V columns, a kernel of the same shape writes the scores' gradient
  [N, chunk] in the input dtype; d_hidden += grad @ w_chunk.T and d_w[:, chunk] = hidden.T @ grad are XLA
  (cuBLAS) matmuls. Logits are recomputed once: 8·N·H·V FLOPs in all against the 6·N·H·V counted.
Rows come padded to block_n; ragged vocabulary tiles are masked (TMA fills out-of-bounds reads with zeros).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fused_logprob.tiles import (
    BlockSizes,
    Settings,
    logits_and_slope,
    scores_grad,
)
from pallas_kernels.fused_logprob.xla_chunked import over_vocab

DEFAULT_BLOCKS = BlockSizes(block_n=128, block_v=128, block_h=64)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CHUNK_V = 8192  # vocabulary columns per backward chunk: the gradient buffer is [N, CHUNK_V]
_PIPELINE_STEPS = 4
_TMA_COLUMNS = 64


def is_hopper_or_newer(device) -> bool:
    """Whether `device` is an NVIDIA GPU of compute capability 9.0 or later (what Mosaic GPU targets)."""
    try:
        return int(str(getattr(device, "compute_capability", "0")).split(".")[0]) >= 9
    except ValueError:  # not a CUDA device (e.g. ROCm "gfx90a")
        return False


def check(blocks: BlockSizes, hidden_size: int, dtype) -> None:
    """Raises ValueError unless the inputs and tiles suit wgmma (bf16/f16; block_n % 64, block_v % 8 and <= 256,
    block_h a multiple of 64 dividing H) and, when running on a GPU, it is Hopper or newer."""
    if jnp.dtype(dtype) not in DTYPES:
        raise ValueError(f"fused_logprob gpu: wants bfloat16 or float16 inputs, got {dtype}; use xla_chunked")
    if jax.default_backend() == "gpu" and not is_hopper_or_newer(jax.devices()[0]):
        raise ValueError(f"fused_logprob gpu: Mosaic GPU needs Hopper or newer, this is {jax.devices()[0]}; "
                         "use xla_chunked")
    block_h = blocks.block_h or DEFAULT_BLOCKS.block_h
    problems = [f"block_n {blocks.block_n} is not a multiple of 64"] if blocks.block_n % 64 else []
    if blocks.block_v % 8 or blocks.block_v > 256:
        problems.append(f"block_v {blocks.block_v} is not a multiple of 8 up to 256")
    if block_h % 64 or hidden_size % block_h:
        problems.append(f"block_h {block_h} is not a multiple of 64 that divides the hidden size {hidden_size}")
    if CHUNK_V % blocks.block_v:
        problems.append(f"block_v {blocks.block_v} does not divide CHUNK_V {CHUNK_V}")
    if problems:
        raise ValueError("fused_logprob gpu: " + "; ".join(problems))


def _scores(h_gmem, w_gmem, blocks: BlockSizes):
    """The f32 scores tile [block_n, block_v] of this program's (row block, vocab tile)."""
    bn, bv, bh = blocks.block_n, blocks.block_v, blocks.block_h or DEFAULT_BLOCKS.block_h
    row_block, vocab_tile = lax.axis_index("rows"), lax.axis_index("vocab")
    steps = h_gmem.shape[1] // bh

    def accumulate(acc_ref):
        plgpu.emit_pipeline(
            lambda _, h_smem, w_smem: plgpu.wgmma(acc_ref, h_smem, w_smem),
            grid=(steps,),
            in_specs=[plgpu.BlockSpec((bn, bh), lambda k: (row_block, k), delay_release=1),
                      plgpu.BlockSpec((bh, bv), lambda k: (k, vocab_tile), delay_release=1)],
            max_concurrent_steps=max(2, min(_PIPELINE_STEPS, steps)),  # > delay_release
        )(h_gmem, w_gmem)
        return acc_ref[...]

    return pl.run_scoped(accumulate, plgpu.ACC((bn, bv), jnp.float32))


def _columns(blocks: BlockSizes, vocab: int):
    """(column ids [block_n, block_v] of this program's vocab tile, valid columns)."""
    shape = (blocks.block_n, blocks.block_v)
    cols = lax.axis_index("vocab") * blocks.block_v + lax.broadcasted_iota(jnp.int32, shape, 1)
    return cols, cols < vocab


def _row_slice(blocks: BlockSizes):
    return pl.ds(lax.axis_index("rows") * blocks.block_n, blocks.block_n)


def _load_rows(refs, blocks: BlockSizes):
    """This program's rows of per-row vectors (GMEM [N] each), broadcast to the tile [block_n, block_v]."""

    def load(*scratch):
        *buffers, barriers = scratch
        for k, (ref, smem) in enumerate(zip(refs, buffers, strict=True)):
            plgpu.copy_gmem_to_smem(ref.at[_row_slice(blocks)], smem, barriers.at[k])
        values = []
        for k, smem in enumerate(buffers):
            plgpu.barrier_wait(barriers.at[k])
            values.append(lax.broadcast_in_dim(smem[...], (blocks.block_n, blocks.block_v), (0,)))
        return values

    buffers = [plgpu.SMEM((blocks.block_n,), ref.dtype) for ref in refs]
    return pl.run_scoped(load, *buffers, plgpu.Barrier(num_barriers=len(refs)))


def _store(values, refs):
    """Writes tiles or row vectors through shared memory to the GMEM windows `refs`."""

    def store(*buffers):
        for value, smem in zip(values, buffers, strict=True):
            smem[...] = value.astype(smem.dtype)
        plgpu.commit_smem()
        for smem, ref in zip(buffers, refs, strict=True):
            plgpu.copy_smem_to_gmem(smem, ref)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(store, *[plgpu.SMEM(ref.shape, ref.dtype) for ref in refs])


def _forward_kernel(h_gmem, w_gmem, t_gmem, *out_gmems, settings: Settings, vocab: int):
    blocks = settings.blocks
    logits, _ = logits_and_slope(_scores(h_gmem, w_gmem, blocks), settings)
    cols, valid = _columns(blocks, vocab)
    (targets,) = _load_rows([t_gmem], blocks)
    logits = jnp.where(valid, logits, -jnp.inf)
    tile_max = logits.max(axis=1)
    shifted = logits - lax.broadcast_in_dim(tile_max, logits.shape, (0,))
    probs = jnp.exp(shifted)
    partials = (tile_max, probs.sum(axis=1), jnp.where(valid, probs * shifted, 0.0).sum(axis=1),
                jnp.where(cols == targets, logits, 0.0).sum(axis=1))
    _store(partials, [out.at[lax.axis_index("vocab"), _row_slice(blocks)] for out in out_gmems])


def _grad_kernel(h_gmem, w_gmem, t_gmem, lse_gmem, g_gmem, c_gmem, e_gmem, grad_gmem, *, settings: Settings,
                 vocab: int):
    blocks = settings.blocks
    logits, slope = logits_and_slope(_scores(h_gmem, w_gmem, blocks), settings)
    cols, valid = _columns(blocks, vocab)
    targets, *row_values = _load_rows([t_gmem, lse_gmem, g_gmem, c_gmem, e_gmem], blocks)
    grad = scores_grad(logits, slope, cols == targets, *row_values, settings, valid)
    window = grad_gmem.at[_row_slice(blocks), pl.ds(lax.axis_index("vocab") * blocks.block_v, blocks.block_v)]
    _store([grad], [window])


def _interpret_params():
    """Mosaic GPU's simulator on CPU (shared memory, barriers, TMA), for tests; private in jax 0.10, so guarded."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:
        raise NotImplementedError("fused_logprob gpu: interpret=True needs jax's GPU interpreter "
                                  "(jax._src.pallas.mosaic_gpu.interpret, present in jax 0.10), which this jax "
                                  "lacks") from err
    return InterpretGPUParams()


def _launch(body, out_type, n: int, v: int, settings: Settings):
    return plgpu.kernel(
        body, out_type=out_type, grid=(n // settings.blocks.block_n, pl.cdiv(v, settings.blocks.block_v)),
        grid_names=("rows", "vocab"), interpret=_interpret_params() if settings.interpret else None,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )


def _pad_vocab(w):
    """w [H, V] with zero columns up to a multiple of 64 (TMA wants whole 64-column tiles; real vocabularies are)."""
    return jnp.pad(w, ((0, 0), (0, -w.shape[1] % _TMA_COLUMNS)))


def forward(hidden, w, targets, settings: Settings):
    """(lse, picked logit, entropy), each [N] f32, for hidden [N, H] (N a multiple of block_n), w [H, V]."""
    (n, _), v = hidden.shape, w.shape[1]
    w = _pad_vocab(w)
    partial_type = jax.ShapeDtypeStruct((pl.cdiv(v, settings.blocks.block_v), n), jnp.float32)
    body = functools.partial(_forward_kernel, settings=settings, vocab=v)
    tile_max, sum_exp, sum_xp, picked = _launch(body, [partial_type] * 4, n, v, settings)(hidden, w, targets)
    top = tile_max.max(axis=0)
    rescale = jnp.exp(tile_max - top)
    total = (rescale * sum_exp).sum(axis=0)
    shifted_sum = (rescale * (sum_xp + (tile_max - top) * sum_exp)).sum(axis=0)
    log_total = jnp.log(total)
    return top + log_total, picked.sum(axis=0), log_total - shifted_sum / total


def backward(hidden, w, targets, lse, g, c, e, settings: Settings):
    """(d_hidden [N, H], d_w [H, V]) in the inputs' dtypes, from per-row lse, g, c, e [N] (see tiles.scores_grad)."""
    (n, h), v = hidden.shape, w.shape[1]
    w = _pad_vocab(w)  # the padding columns are zero, so their (unmasked) gradient adds nothing to d_hidden

    def chunk_step(carry, start, size):
        d_hidden, d_w = carry
        w_chunk = lax.dynamic_slice_in_dim(w, start, size, axis=1)
        body = functools.partial(_grad_kernel, settings=settings, vocab=size)
        grad = _launch(body, jax.ShapeDtypeStruct((n, size), hidden.dtype), n, size, settings)(
            hidden, w_chunk, targets - start, lse, g, c, e)
        d_hidden += jnp.dot(grad, w_chunk.T, preferred_element_type=jnp.float32)
        d_w_chunk = jnp.dot(hidden.T, grad, preferred_element_type=jnp.float32).astype(w.dtype)
        return d_hidden, lax.dynamic_update_slice_in_dim(d_w, d_w_chunk, start, axis=1)

    init = (jnp.zeros((n, h), jnp.float32), jnp.zeros_like(w))
    d_hidden, d_w = over_vocab(chunk_step, init, w.shape[1], min(CHUNK_V, w.shape[1]))
    return d_hidden.astype(hidden.dtype), d_w[:, :v]
