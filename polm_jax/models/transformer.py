"""The decoder: one pure-functional Flax Linen module covering Llama 3, Qwen 2.5/3 and Gemma 2/3 by config.

Layers are scanned (params stacked on a leading `layers` axis) under a configurable remat policy, so compile time
does not grow with depth. Every parameter carries logical axis names (see polm_jax.parallel) for sharding.
LoRA: a kernel-owning module whose params hold `lora_a`/`lora_b` next to `kernel` (see polm_jax.models.lora) adds
the low-rank update to its output; params without them run exactly as before.

Shapes: B batch, T new tokens, S cache slots, D hidden, H/K query/key-value heads, E head dim, F MLP, V vocab, L layers.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from polm_jax.models.config import ModelConfig
from polm_jax.ops.attention import attention

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
_normal = nn.initializers.normal(0.02)


def _param(module: nn.Module, name: str, shape, axes, init=_normal):
    """A parameter named with logical axes, in the config's param dtype."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(module.config.param_dtype))


def _lora(module: nn.Module, x, into_rank: str, out_of_rank: str):
    """The LoRA update dropout(x) @ A @ B in the compute dtype, or None when the module's params hold no adapter.

    B arrives pre-scaled by alpha / rank (polm_jax.models.lora.apply). Dropout on x needs config.lora_dropout > 0
    and a `dropout` rng (forward's dropout_rng); without one the update is deterministic.
    """
    if not module.has_variable("params", "lora_a"):
        return None
    cfg = module.config
    if cfg.lora_dropout and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(x.dtype)
    a = module.get_variable("params", "lora_a").astype(cfg.dtype)
    b = module.get_variable("params", "lora_b").astype(cfg.dtype)
    return jnp.einsum(out_of_rank, jnp.einsum(into_rank, x, a), b)


class RMSNorm(nn.Module):
    """RMSNorm in f32; Gemma scales by (1 + w)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), init).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        return (y * (1.0 + scale if cfg.norm_offset else scale)).astype(x.dtype)


class HeadsProjection(nn.Module):
    """x [B, T, D] -> [B, T, heads, E] (q, k or v), with an optional bias."""

    config: ModelConfig
    heads: int
    axis: str

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        w = _param(self, "kernel", (cfg.hidden_size, self.heads, cfg.head_dim), ("embed", self.axis, "head_dim"))
        y = jnp.einsum("btd,dhe->bthe", x, w.astype(cfg.dtype))
        lora = _lora(self, x, "btd,dr->btr", "btr,rhe->bthe")  # A [D, r], B [r, heads, E]
        if lora is not None:
            y = y + lora
        if cfg.qkv_bias:
            y = y + _param(self, "bias", (self.heads, cfg.head_dim), (self.axis, "head_dim"), nn.initializers.zeros)
        return y.astype(cfg.dtype)


class HeadsOutput(nn.Module):
    """Attention output [B, T, H, E] -> [B, T, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        w = _param(self, "kernel", (cfg.num_heads, cfg.head_dim, cfg.hidden_size), ("heads", "head_dim", "embed"))
        y = jnp.einsum("bthe,hed->btd", x, w.astype(cfg.dtype))
        lora = _lora(self, x, "bthe,her->btr", "btr,rd->btd")  # A [H, E, r], B [r, D]
        return y if lora is None else y + lora


class Dense(nn.Module):
    """x [..., in] -> [..., out] with a kernel named by logical axes."""

    config: ModelConfig
    features: int
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, x):
        w = _param(self, "kernel", (x.shape[-1], self.features), self.axes)
        y = jnp.dot(x, w.astype(self.config.dtype))
        lora = _lora(self, x, "...i,ir->...r", "...r,ro->...o")  # A [in, r], B [r, out]
        return y if lora is None else y + lora


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None):
    """Inverse frequencies [E/2] for RoPE, with `linear` or Llama 3.1 (`llama3`) scaling as Hugging Face does."""
    inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)
    if kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")
    return inv


def rope_tables(positions, head_dim: int, theta: float, scaling: dict | None):
    """(cos, sin), each [B, T, E/2], for positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta, scaling)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x [B, T, H, E] by the half-split (Hugging Face) convention, in f32."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None], sin[:, :, None]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Self-attention over the new tokens and, when decoding, the cached ones."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, is_sliding, rope, layer_cache, masks, cache_index):
        cfg = self.config
        q = HeadsProjection(cfg, cfg.num_heads, "heads", name="q_proj")(x)
        k = HeadsProjection(cfg, cfg.num_kv_heads, "kv_heads", name="k_proj")(x)
        v = HeadsProjection(cfg, cfg.num_kv_heads, "kv_heads", name="v_proj")(x)
        if cfg.qk_norm:
            q, k = RMSNorm(cfg, name="q_norm")(q), RMSNorm(cfg, name="k_norm")(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if layer_cache is not None:  # write the new keys and values at the cache index; attend over every slot
            start = (0, cache_index, 0, 0)
            layer_cache = {"k": jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start),
                           "v": jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)}
            k, v = layer_cache["k"].astype(cfg.dtype), layer_cache["v"].astype(cfg.dtype)
        attend = partial(attention, q, k, v, softcap=cfg.attn_softcap, impl=cfg.attention_impl,
                         scale=(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5, **masks)
        if all(cfg.is_sliding):
            out = attend(window=cfg.sliding_window)
        elif any(cfg.is_sliding):  # mixed layers: the window stays static for each branch (kernels need that)
            out = jax.lax.cond(is_sliding, lambda: attend(window=cfg.sliding_window), lambda: attend(window=None))
        else:
            out = attend(window=None)
        return HeadsOutput(cfg, name="o_proj")(out), layer_cache


class MLP(nn.Module):
    """Gated MLP: SwiGLU (silu) or GeGLU (gelu_tanh)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = Dense(cfg, cfg.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)
        up = Dense(cfg, cfg.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
        act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return Dense(cfg, cfg.hidden_size, ("mlp", "embed"), name="down_proj")(act * up)


class Block(nn.Module):
    """One decoder layer; scanned over layers, so it takes and returns (carry, per-layer outputs)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, is_sliding, layer_cache, rope_global, rope_local, masks, cache_index):
        cfg = self.config
        rope = jax.tree.map(lambda g, l: jnp.where(is_sliding, l, g), rope_global, rope_local)
        h, layer_cache = Attention(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x), is_sliding, rope,
                                                     layer_cache, masks, cache_index)
        if cfg.post_norms:
            h = RMSNorm(cfg, name="post_attn_norm")(h)
        x = x + h
        h = MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
        if cfg.post_norms:
            h = RMSNorm(cfg, name="post_mlp_norm")(h)
        x = nn.with_logical_constraint(x + h, ("act_batch", "act_seq", "act_embed"))
        return x, layer_cache


class Decoder(nn.Module):
    """tokens [B, T] -> logits [B, T, V] (f32), per-token scores [B, T, num_labels] (f32) when the config has a
    scoring head, or final hidden states [B, T, D]; plus the updated cache."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, cache=None, return_hidden=False):
        cfg = self.config
        embedding = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.param_dtype).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))

        masks, layer_caches, index = _masks_and_cache(positions, segment_ids, cache)
        rope_global = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        rope_local = (rope_tables(positions, cfg.head_dim, cfg.rope_local_theta, None)
                      if cfg.rope_local_theta else rope_global)

        block = Block if cfg.remat == "none" else nn.remat(Block, policy=_REMAT[cfg.remat], prevent_cse=False)
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                         length=cfg.num_layers,
                         in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, layer_caches = layers(cfg, name="layers")(x, jnp.array(cfg.is_sliding), layer_caches, rope_global,
                                                     rope_local, masks, index)
        x = RMSNorm(cfg, name="final_norm")(x)
        new_cache = None if cache is None else {**layer_caches, "positions": masks["kv_positions"],
                                                "segment_ids": masks["kv_segment_ids"],
                                                "index": index + tokens.shape[1]}
        if return_hidden:
            return x, new_cache
        if cfg.num_labels:  # a sequence scorer: per-token scores; a sequence's score is its last token's
            score = _param(self, "score", (cfg.hidden_size, cfg.num_labels), ("embed", None))
            scores = jnp.dot(x, score.astype(cfg.dtype), preferred_element_type=jnp.float32)
            return nn.with_logical_constraint(scores, ("act_batch", "act_seq", None)), new_cache
        if cfg.tie_embeddings:
            head = embedding.T
        else:
            head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
        logits = jnp.dot(x, head.astype(cfg.dtype), preferred_element_type=jnp.float32)
        if cfg.final_softcap is not None:
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return nn.with_logical_constraint(logits, ("act_batch", "act_seq", "act_vocab")), new_cache


def _masks_and_cache(positions, segment_ids, cache):
    """The attention's position/segment arguments; with a cache, its slots after writing the new tokens."""
    if cache is None:
        return ({"q_positions": positions, "kv_positions": positions, "q_segment_ids": segment_ids,
                 "kv_segment_ids": segment_ids}, None, None)
    index = cache["index"]
    kv_positions = jax.lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32), (0, index))
    kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))
    masks = {"q_positions": positions, "kv_positions": kv_positions, "q_segment_ids": segment_ids,
             "kv_segment_ids": kv_segments}
    return masks, {"k": cache["k"], "v": cache["v"]}, index


def _check_length(config: ModelConfig, length: int, what: str):
    if length > config.max_position_embeddings:
        raise ValueError(f"{what} of {length} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings}); shorten or truncate the input")


def positions_from_segments(segment_ids):
    """Positions [B, T] restarting at 0 at the start of each run of equal segment ids [B, T]."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _boxed_init(config: ModelConfig, rng) -> dict:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config).init(rng, tokens, tokens, tokens)["params"]


def init_params(config: ModelConfig, rng) -> dict:
    """Random parameters: a plain nested dict, layer params stacked on a leading [L] axis."""
    return nn.meta.unbox(_boxed_init(config, rng))


@lru_cache(maxsize=16)
def param_logical_axes(config: ModelConfig) -> dict:
    """A pytree matching the params, of PartitionSpecs of logical axis names (cached: do not mutate)."""
    return nn.get_partition_spec(jax.eval_shape(partial(_boxed_init, config), jax.random.key(0)))


@lru_cache(maxsize=16)
def param_shapes(config: ModelConfig) -> dict:
    """A pytree matching the params, of jax.ShapeDtypeStruct (cached: do not mutate)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def lm_head(config: ModelConfig, params: dict):
    """The output projection [D, V] (the transposed embedding when tied)."""
    if config.num_labels:
        raise ValueError(f"this model is a sequence scorer (num_labels={config.num_labels}, e.g. a reward model); "
                         "it has no language-model head to predict tokens with")
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: k, v [L, B, S, K, E]; slot positions and segment ids [B, S] (0 = empty); index 0."""
    _check_length(config, max_len, "a cache length")
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "positions": jnp.zeros((batch, max_len), jnp.int32), "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


@partial(jax.jit, static_argnames=("config", "return_hidden"))
def forward(config: ModelConfig, params: dict, tokens, positions=None, segment_ids=None, cache=None,
            return_hidden: bool = False, dropout_rng=None):
    """tokens [B, T] int32 -> logits [B, T, V] f32 (or hidden states [B, T, D] with `return_hidden`; a scoring model,
    config.num_labels > 0, gives per-token scores [B, T, num_labels]).

    `segment_ids` [B, T] (default all 1) separate packed examples, 0 marks padding; `positions` default to
    restarting at 0 per segment (or to cache index + t when decoding). With `cache` (see `init_cache`) the new
    tokens are written at its index and attend to every filled slot; the result is then `(out, new_cache)`.
    `dropout_rng` (a PRNG key) turns on LoRA dropout (config.lora_dropout) for params with adapters; None: none.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length] int32, got shape {tokens.shape}")
    _check_length(config, tokens.shape[1] if cache is None else cache["k"].shape[2], "a sequence length")
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if positions is None:
        positions = (positions_from_segments(segment_ids) if cache is None
                     else cache["index"] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), tokens.shape)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    out, new_cache = Decoder(config).apply({"params": params}, tokens, positions, segment_ids, cache, return_hidden,
                                           rngs=rngs)
    return out if cache is None else (out, new_cache)
