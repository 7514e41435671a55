"""The model's one attention op: grouped-query attention with causal, segment, sliding-window and soft-cap masks.

Masks are defined on positions and segment ids, so one definition serves training (packed sequences, positions
restarting per segment), prefill and decoding from a KV cache: key j is visible to query i when both are in the
same non-padding segment (id != 0), pos_j <= pos_i, and, with a window W, pos_i - pos_j < W.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
              window: int | None = None, softcap: float | None = None, scale: float | None = None,
              impl: str = "auto"):
    """Attention of q [B, T, Hq, D] over k, v [B, S, Hkv, D] -> [B, T, Hq, D].

    Positions and segment ids are [B, T] for queries and [B, S] for keys (see the module docstring). `window`
    is a static int or None; `scale` defaults to D ** -0.5; logits are soft-capped as cap * tanh(x / cap).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "pallas":
        raise NotImplementedError("attention impl 'pallas' is not available yet; use 'xla' or 'auto'")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, window=window)
    return _xla_attention(q, k, v, mask, scale=scale, softcap=softcap)
