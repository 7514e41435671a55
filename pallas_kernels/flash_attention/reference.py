"""The masks every implementation shares, and plain-jnp attention: the numerical reference and the XLA fallback.

Masks are index based: query i sees key j when j <= i (causal, top-left aligned), i - j < W (sliding window W),
and both carry the same nonzero segment id. Block helpers give the kernels the range of blocks a block can see,
so fully masked blocks are skipped (and, on TPU, not even copied).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

MASK_VALUE = -1e30  # finite, so masked logits never make inf - inf


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The static settings every implementation takes: masks, logit soft-cap and the logit scale."""

    causal: bool
    sliding_window: int | None
    softcap: float | None
    scale: float


def index_mask(q_idx, kv_idx, spec: AttentionSpec, kv_len: int | None):
    """Visibility from query and key indices (broadcastable int32 arrays); None when nothing is masked.

    `kv_len` masks keys at or beyond it (padding added to fill a block); None: no key padding.
    """
    conditions = []
    if spec.causal:
        conditions.append(kv_idx <= q_idx)
    if spec.sliding_window is not None:
        conditions.append(q_idx - kv_idx < spec.sliding_window)
    if kv_len is not None:
        conditions.append(kv_idx < kv_len)
    mask = None
    for condition in conditions:
        mask = condition if mask is None else mask & condition
    return mask


def kv_block_range(q_block, spec: AttentionSpec, block_q: int, block_kv: int, num_kv_blocks: int):
    """First and last key block (int32 scalars, inclusive) that query block `q_block` can see by index."""
    q_block = jnp.asarray(q_block, jnp.int32)
    first, last = jnp.int32(0), jnp.int32(num_kv_blocks - 1)
    if spec.causal:
        last = jnp.minimum(last, lax.div(q_block * block_q + (block_q - 1), jnp.int32(block_kv)))
    if spec.sliding_window is not None:
        first_key = jnp.maximum(q_block * block_q - (spec.sliding_window - 1), 0)
        first = lax.div(first_key, jnp.int32(block_kv))
    return first, last


def q_block_range(kv_block, spec: AttentionSpec, block_q: int, block_kv: int, num_q_blocks: int):
    """First and last query block (int32 scalars, inclusive) that can see key block `kv_block` by index."""
    kv_block = jnp.asarray(kv_block, jnp.int32)
    first, last = jnp.int32(0), jnp.int32(num_q_blocks - 1)
    if spec.causal:
        first = lax.div(kv_block * block_kv, jnp.int32(block_q))
    if spec.sliding_window is not None:
        last_query = kv_block * block_kv + (block_kv - 1) + (spec.sliding_window - 1)
        last = jnp.minimum(last, lax.div(last_query, jnp.int32(block_q)))
    return first, last


def segment_ranges(segment_ids, block: int):
    """Per block of `block` positions, the smallest and largest segment id: two int32 arrays [B, L // block]."""
    blocks = segment_ids.reshape(segment_ids.shape[0], -1, block)
    return blocks.min(axis=-1).astype(jnp.int32), blocks.max(axis=-1).astype(jnp.int32)


def segments_may_meet(q_min, q_max, kv_min, kv_max):
    """Whether blocks with these segment-id ranges may share a nonzero id (bool; False means fully masked)."""
    shared_max = jnp.minimum(q_max, kv_max)
    return (shared_max >= jnp.maximum(q_min, kv_min)) & (shared_max > 0)


def visibility(q_len: int, kv_len: int, spec: AttentionSpec, q_segment_ids=None, kv_segment_ids=None):
    """Boolean mask [B or 1, T, S]: which key each query sees (see the module docstring)."""
    by_index = index_mask(jnp.arange(q_len, dtype=jnp.int32)[:, None], jnp.arange(kv_len, dtype=jnp.int32)[None, :],
                          spec, kv_len=None)
    visible = jnp.ones((1, q_len, kv_len), bool) if by_index is None else by_index[None]
    if q_segment_ids is not None:
        kv_segment_ids = kv_segment_ids[:, None, :]
        visible = visible & (q_segment_ids[:, :, None] == kv_segment_ids) & (kv_segment_ids != 0)
    return visible


def reference_attention(q, k, v, spec: AttentionSpec, q_segment_ids=None, kv_segment_ids=None):
    """q [B, T, Hq, D], k and v [B, S, Hkv, D], segment ids [B, T] and [B, S] or None -> [B, T, Hq, D].

    Softmax in f32; rows that see no key give zeros (with finite, zero gradients).
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)  # [B, T, Hkv, G, D]: GQA without repeating K/V
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * spec.scale
    if spec.softcap is not None:
        logits = jnp.tanh(logits / spec.softcap) * spec.softcap
    visible = visibility(t, s, spec, q_segment_ids, kv_segment_ids)[:, None, None]  # [B or 1, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(visible, logits, MASK_VALUE), axis=-1)
    probs = jnp.where(visible.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32), preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
