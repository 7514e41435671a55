"""What every tiled implementation shares: block sizes, the static settings of one call, and the per-tile math.

A tile is the f32 logits of `n` rows against `v` vocabulary columns. Its statistics are kept per row, shaped
[n, k] (k = 1 in XLA, k = 128 lane-dense in the TPU kernel; all k columns hold the same value):
  max      the running maximum m of the logits seen so far
  sum_exp  s = sum exp(l - m)
  sum_xp   t = sum exp(l - m) * (l - m)   (shifted by m, so the entropy needs no large cancellation)
  picked   the target's logit (0 until the tile holding it is seen; stays 0 for rows without a target)
and give lse = m + log s, entropy = log s - t / s.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

NO_TARGET = -1  # the target id the implementations see for ignored and padding rows
_START_MAX = -1e30  # finite, so (old max - new max) * 0 stays 0 on the first tile


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: `block_n` rows of hidden and `block_v` vocabulary columns per tile; `block_h` (GPU kernel
    only) is the slice of the hidden size one matmul step contracts."""

    block_n: int
    block_v: int
    block_h: int | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static part of one call: which implementation, the logit transform, tile sizes, interpret mode."""

    impl: str
    temperature: float
    softcap: float | None
    blocks: BlockSizes
    interpret: bool = False


def logits_and_slope(scores, settings: Settings):
    """(logits, d logits / d scores * temperature or None) for raw scores [n, v] f32: softcap, then temperature."""
    if settings.softcap is None:
        return scores / settings.temperature, None
    capped = jnp.tanh(scores / settings.softcap)
    return settings.softcap * capped / settings.temperature, 1.0 - capped * capped


def initial_stats(rows: int, lanes: int = 1):
    """Statistics (max, sum_exp, sum_xp, picked), each [rows, lanes] f32, before any tile is seen."""
    zeros = jnp.zeros((rows, lanes), jnp.float32)
    return jnp.full((rows, lanes), _START_MAX, jnp.float32), zeros, zeros, zeros


def update_stats(stats, logits, hit, valid=None):
    """Folds one tile (logits [n, v] f32, hit = column is the row's target, valid = column exists, both [n, v]
    bool or valid None) into the statistics (each [n, k])."""
    m, s, t, picked = stats
    if valid is not None:
        logits = jnp.where(valid, logits, -jnp.inf)
    new_m = jnp.maximum(m, logits.max(axis=1, keepdims=True))
    shifted = logits - new_m[:, :1]
    probs = jnp.exp(shifted)
    weighted = probs * shifted if valid is None else jnp.where(valid, probs * shifted, 0.0)
    rescale = jnp.exp(m - new_m)
    s_new = rescale * s + probs.sum(axis=1, keepdims=True)
    t_new = rescale * (t + (m - new_m) * s) + weighted.sum(axis=1, keepdims=True)
    picked = picked + jnp.where(hit, logits, 0.0).sum(axis=1, keepdims=True)
    return new_m, s_new, t_new, picked


def finish_stats(stats):
    """(lse, entropy), each shaped like the statistics, from the statistics after the last tile."""
    m, s, t, _ = stats
    log_s = jnp.log(s)
    return m + log_s, log_s - t / s


def scores_grad(logits, slope, hit, lse, g, c, e, settings: Settings, valid=None):
    """d loss / d scores [n, v] f32 for one tile, given per-row lse, g, c, e (each [n, 1]).

    With p = exp(logits - lse), the logits' gradient is g * hit + p * (c - e * logits), where g and e are the
    upstream gradients of the log-prob and the entropy and c = e * (lse - entropy) - g; then the chain rule
    through temperature and soft-cap.
    """
    probs = jnp.exp(logits - lse)
    grad = jnp.where(hit, g, 0.0) + probs * (c - e * logits)
    grad = grad / settings.temperature if slope is None else grad * (slope / settings.temperature)
    return grad if valid is None else jnp.where(valid, grad, 0.0)
