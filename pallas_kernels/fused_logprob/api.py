"""fused_logprob: per-token log-probs (and entropies) of targets under hidden @ lm_head, never materialising [N, V].

    logp = fused_logprob(hidden, lm_head, targets)                          # [N, H], [H, V], [N] -> [N] f32
    logp, entropy = fused_logprob(hidden, lm_head, targets, return_entropy=True)

Logits are hidden @ lm_head accumulated in f32, then softcap * tanh(logits / softcap) when `softcap` is set, then
divided by `temperature`; logp = logits[target] - logsumexp(logits) and entropy = -sum p log p of the same
distribution. Rows whose target equals `ignore_index` give logp 0 and entropy 0, and no gradient. Other targets
must lie in [0, V).

Both outputs are differentiable for any upstream gradients (a custom_vjp): the forward saves only the per-row
log-sum-exp and entropy; the backward recomputes the logits tile by tile for d_hidden and d_lm_head.

`impl`: "reference" (materialised f32 logits, plain autodiff; for tests), "xla_chunked" (XLA loops over tiles;
runs everywhere), "tpu" (Mosaic TPU kernels), "gpu" (Mosaic GPU kernels for Hopper and newer; bf16/f16 only), or
"auto": tpu on TPU, else xla_chunked (gpu only when asked for). `interpret=True` runs the tpu kernels
in Pallas interpret mode on any backend, and the gpu kernels in jax's Mosaic GPU simulator (where jax has one).
`block_sizes` (a BlockSizes) overrides the per-implementation tile sizes; rows are padded to block_n, and a
vocabulary that is not a multiple of block_v is masked in its last tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.fused_logprob import gpu, tpu, xla_chunked
from pallas_kernels.fused_logprob.reference import fused_logprob_reference
from pallas_kernels.fused_logprob.tiles import NO_TARGET, BlockSizes, Settings

IMPLS = ("auto", "reference", "xla_chunked", "tpu", "gpu")
_KERNELS = {"xla_chunked": xla_chunked, "tpu": tpu, "gpu": gpu}
_XLA_BLOCKS = {"cpu": BlockSizes(1024, 4096), "gpu": BlockSizes(4096, 16384), "tpu": BlockSizes(2048, 8192)}
_KERNEL_BLOCKS = {"tpu": BlockSizes(512, 512), "gpu": gpu.DEFAULT_BLOCKS}  # untuned: no TPU or GPU measured them
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def fused_logprob(hidden, lm_head, targets, *, temperature: float = 1.0, softcap: float | None = None,
                  return_entropy: bool = False, ignore_index: int = -100, impl: str = "auto",
                  interpret: bool = False, block_sizes: BlockSizes | None = None):
    """log softmax(softcap(hidden @ lm_head) / temperature)[targets]: hidden [N, H], lm_head [H, V], targets [N]
    int -> [N] f32, and the entropies [N] f32 too when `return_entropy` (see the module docstring)."""
    _check_inputs(hidden, lm_head, targets, temperature, softcap, impl)
    impl = resolve_impl(impl, hidden.dtype)
    if impl == "reference":
        logp, entropy = fused_logprob_reference(hidden, lm_head, targets, temperature=temperature, softcap=softcap,
                                                ignore_index=ignore_index)
        return (logp, entropy) if return_entropy else logp
    (n, h), v = hidden.shape, lm_head.shape[1]
    blocks = fit_blocks(block_sizes or default_blocks(impl), impl, n, h, v, hidden.dtype)
    settings = Settings(impl, float(temperature), None if softcap is None else float(softcap), blocks, interpret)
    pad = -n % blocks.block_n
    kernel_targets = jnp.where(targets == ignore_index, NO_TARGET, targets).astype(jnp.int32)
    logp, entropy = _fused(jnp.pad(hidden, ((0, pad), (0, 0))), lm_head,
                           jnp.pad(kernel_targets, (0, pad), constant_values=NO_TARGET), settings)
    return (logp[:n], entropy[:n]) if return_entropy else logp[:n]


def resolve_impl(impl: str, dtype=jnp.bfloat16) -> str:
    """The implementation `impl` names for inputs of `dtype`; "auto" becomes tpu on TPU, else xla_chunked. The GPU
    kernel runs only when asked for (impl="gpu"): it has not yet been checked or timed on a GPU."""
    if impl != "auto":
        return impl
    return "tpu" if jax.default_backend() == "tpu" else "xla_chunked"


def default_blocks(impl: str) -> BlockSizes:
    """The tile sizes `impl` uses when none are given (xla_chunked: per backend)."""
    if impl == "xla_chunked":
        return _XLA_BLOCKS.get(jax.default_backend(), _XLA_BLOCKS["cpu"])
    return _KERNEL_BLOCKS[impl]


def fit_blocks(blocks: BlockSizes, impl: str, n: int, h: int, v: int, dtype) -> BlockSizes:
    """`blocks` shrunk to the problem (no tile larger than the padded rows or the vocabulary), then checked."""
    if min(blocks.block_n, blocks.block_v) < 1 or (blocks.block_h is not None and blocks.block_h < 1):
        raise ValueError(f"fused_logprob: block sizes must be positive, got {blocks}")
    if impl == "gpu":
        gpu.check(blocks, h, dtype)
        return blocks
    row_multiple = 16
    fitted = BlockSizes(min(blocks.block_n, -(-n // row_multiple) * row_multiple), min(blocks.block_v, v),
                        blocks.block_h)
    if impl == "tpu":
        tpu.check_blocks(fitted.block_n, fitted.block_v, -(-n // fitted.block_n) * fitted.block_n, v, dtype)
    return fitted


def _check_inputs(hidden, lm_head, targets, temperature, softcap, impl):
    if impl not in IMPLS:
        raise ValueError(f"fused_logprob: impl {impl!r} is not one of {IMPLS}")
    if hidden.ndim != 2 or lm_head.ndim != 2 or hidden.shape[1] != lm_head.shape[0]:
        raise ValueError(f"fused_logprob: want hidden [N, H] and lm_head [H, V], got {hidden.shape} and "
                         f"{lm_head.shape}")
    if targets.shape != hidden.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"fused_logprob: want integer targets [N] = {hidden.shape[:1]}, got {targets.dtype} "
                         f"{targets.shape}")
    if hidden.dtype != lm_head.dtype or hidden.dtype not in _FLOATS:
        raise ValueError(f"fused_logprob: hidden and lm_head must share one float dtype (float32, bfloat16, "
                         f"float16), got {hidden.dtype} and {lm_head.dtype}; cast one first")
    if not temperature > 0:
        raise ValueError(f"fused_logprob: temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"fused_logprob: softcap must be None or > 0, got {softcap}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(hidden, w, targets, settings: Settings):
    """(logp, entropy) [N] f32 for padded rows; targets use NO_TARGET for ignored and padding rows."""
    return _fused_fwd(hidden, w, targets, settings)[0]


def _fused_fwd(hidden, w, targets, settings: Settings):
    lse, picked, entropy = _KERNELS[settings.impl].forward(hidden, w, targets, settings)
    hit = targets != NO_TARGET
    outputs = jnp.where(hit, picked - lse, 0.0), jnp.where(hit, entropy, 0.0)
    return outputs, (hidden, w, targets, lse, entropy)


def _fused_bwd(settings: Settings, residuals, cotangents):
    hidden, w, targets, lse, entropy = residuals
    hit = targets != NO_TARGET
    g, e = (jnp.where(hit, ct.astype(jnp.float32), 0.0) for ct in cotangents)
    c = e * (lse - entropy) - g  # see tiles.scores_grad
    d_hidden, d_w = _KERNELS[settings.impl].backward(hidden, w, targets, lse, g, c, e, settings)
    return d_hidden, d_w, None


_fused.defvjp(_fused_fwd, _fused_bwd)
