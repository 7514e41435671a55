"""Per-token log-probabilities (and entropies) of target tokens from final hidden states, never holding [B, T, V].

    logp = token_logprobs(hidden, head, targets)   # hidden [B, T, D], head [D, V], targets [B, T] -> [B, T] f32
    logp, entropy = token_logprobs(hidden, head, targets, return_entropy=True)

Logits are hidden @ head accumulated in f32 (the head cast to the hidden states' dtype first), soft-capped as
softcap * tanh(x / softcap) when `softcap` is set, then divided by `temperature`. Both outputs are
differentiable. `impl` picks how pallas_kernels.fused_logprob computes them:
  "auto"         the Pallas kernel on a single TPU device; else xla_chunked (the kernel has no sharding rule yet,
                 and the GPU kernel is not yet checked on hardware)
  "xla_chunked"  XLA loops over [rows, vocab] tiles of the logits; runs on every backend
  "pallas"       the backend's Pallas kernel (Mosaic TPU, or Mosaic GPU on Hopper and newer); on CPU the TPU
                 kernel in interpret mode, so tests can exercise it (slow)
  "reference"    the full f32 logits and plain autodiff, for tests
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import fused_logprob
from polm_jax.models.config import LOGPROB_IMPLS as IMPLS


def _kernel_impl(impl: str) -> tuple[str, bool]:
    """(fused_logprob's impl, interpret) for one of IMPLS."""
    if impl == "auto" and jax.device_count() > 1:
        return "xla_chunked", False
    if impl != "pallas":
        return impl, False
    backend = jax.default_backend()
    if backend == "gpu":
        return "gpu", False  # Mosaic GPU: Hopper or newer, bf16/f16 (fused_logprob says so otherwise)
    return "tpu", backend != "tpu"


def token_logprobs(hidden, head, targets, *, softcap: float | None = None, temperature: float = 1.0,
                   impl: str = "auto", return_entropy: bool = False):
    """log softmax(softcap(hidden @ head) / temperature)[targets]: hidden [B, T, D], head [D, V], targets [B, T]
    -> [B, T] f32; with `return_entropy`, (log-probs, entropies), both [B, T] f32."""
    if impl not in IMPLS:
        raise ValueError(f"token_logprobs impl {impl!r} is not one of {IMPLS}")
    b, t, d = hidden.shape
    kernel_impl, interpret = _kernel_impl(impl)
    out = fused_logprob(hidden.reshape(b * t, d), head.astype(hidden.dtype),
                        jnp.asarray(targets, jnp.int32).reshape(b * t), temperature=temperature, softcap=softcap,
                        return_entropy=return_entropy, impl=kernel_impl, interpret=interpret)
    return tuple(x.reshape(b, t) for x in out) if return_entropy else out.reshape(b, t)
