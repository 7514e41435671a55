"""The model's one attention op: grouped-query attention with causal, segment, sliding-window and soft-cap masks.

Masks are defined on positions and segment ids, so one definition serves training (packed sequences, positions
restarting per segment), prefill and decoding from a KV cache: key j is visible to query i when both are in the
same non-padding segment (id != 0), pos_j <= pos_i, and, with a window W, pos_i - pos_j < W.

The Pallas flash-attention kernel (pallas_kernels.flash_attention) masks by index instead. It serves
self-attention without a cache, which the model signals by passing the same array object as q and kv positions
and as q and kv segment ids; positions then rise by one within each segment (`positions_from_segments`), so
index order within a segment is position order and the two masks agree. Other calls (decoding over a cache) take
the XLA path. Under a mesh the kernel runs per shard (shard_map over batch and heads); rows that see no key
(padding) give zeros there, a uniform average on the XLA path.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels.flash_attention import choose_impl, flash_attention
from pallas_kernels.flash_attention.gpu import supports as gpu_supports
from polm_jax.parallel import mesh_spec

IMPLS = ("auto", "xla", "reference", "pallas")
_MASKED = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, never NaN


def attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, window: int | None = None):
    """Boolean visibility [B, T, S] from positions and segment ids ([B, T] and [B, S] int32)."""
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    delta = q_positions[:, :, None] - kv_positions[:, None, :]
    visible = same & (delta >= 0)
    if window is not None:
        visible &= delta < window
    return visible


def _xla_attention(q, k, v, mask, *, scale, softcap):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)  # [B, T, Hkv, G, D]: GQA without repeating K/V
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def _flash_kernel(impl: str, q) -> tuple[str, bool] | None:
    """The flash_attention kernel and interpret flag for this call's impl and backend; None: the XLA path.

    "auto" takes the TPU kernel on TPU (see choose_impl); "pallas" also runs the Mosaic GPU kernel where it applies
    (Hopper or newer, bf16/f16, head dim a multiple of 64) and the TPU kernel in interpret mode on CPU.
    """
    kernel = choose_impl("auto", False, q.dtype, q.shape[-1])
    if kernel != "reference":
        return kernel, False
    if impl == "pallas":
        if jax.default_backend() == "cpu":
            return "tpu", True
        if gpu_supports(jax.devices()[0], q.dtype, q.shape[-1]):
            return "gpu", False
        raise ValueError(f"attention impl 'pallas' has no kernel on {jax.devices()[0].device_kind} for "
                         f"{q.dtype} with head dim {q.shape[-1]} (Mosaic GPU needs Hopper or newer, bf16/f16, a "
                         "head dim multiple of 64); set model.attention_impl to 'auto' or 'xla'")
    return None


def _flash_self_attention(q, k, v, segment_ids, *, window, softcap, scale, impl, interpret):
    return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, sliding_window=window, softcap=softcap,
                           scale=scale, impl=impl, interpret=interpret)


def _per_shard(call, q, k, v, segment_ids):
    """call(q, k, v, segment_ids) on each shard of the current mesh: batch and heads split by the act_* logical
    rules in context, sequences whole. A Pallas kernel is opaque to XLA's partitioner, which would otherwise
    gather its operands onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return call(q, k, v, segment_ids)
    rules = {name: [axes] if isinstance(axes, str) else list(axes or ()) for name, axes in nn.get_logical_axis_rules()}
    q_spec = mesh_spec(PartitionSpec("act_batch", None, "act_heads", None), q.shape, mesh, rules)
    kv_spec = mesh_spec(PartitionSpec("act_batch", None, "act_kv_heads", None), k.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:  # query and key/value heads split alike, or GQA's head mapping breaks
        q_spec, kv_spec = PartitionSpec(q_spec[0], None, None, None), PartitionSpec(kv_spec[0], None, None, None)
    return jax.shard_map(call, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
              window: int | None = None, softcap: float | None = None, scale: float | None = None,
              impl: str = "auto"):
    """Attention of q [B, T, Hq, D] over k, v [B, S, Hkv, D] -> [B, T, Hq, D].

    Positions and segment ids are [B, T] for queries and [B, S] for keys (see the module docstring). `window`
    is a static int or None; `scale` defaults to D ** -0.5; logits are soft-capped as cap * tanh(x / cap).
    "pallas" and "auto" run the flash-attention kernel for self-attention without a cache (same position and
    segment-id arrays for q and kv, positions rising by one per segment), see `_flash_kernel`.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    self_attention = q_positions is kv_positions and q_segment_ids is kv_segment_ids
    kernel = _flash_kernel(impl, q) if impl in ("auto", "pallas") and self_attention else None
    if kernel is not None:
        call = functools.partial(_flash_self_attention, window=window, softcap=softcap, scale=scale,
                                 impl=kernel[0], interpret=kernel[1])
        return _per_shard(call, q, k, v, q_segment_ids)
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, window=window)
    return _xla_attention(q, k, v, mask, scale=scale, softcap=softcap)
