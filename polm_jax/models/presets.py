"""Named architectures: real model sizes (as their Hugging Face config.json say) and tiny ones for tests."""

from __future__ import annotations

import difflib

from polm_jax.errors import ConfigError
from polm_jax.models.config import ModelConfig, default_layer_types


def _llama(**kw) -> dict:
    return {**dict(family="llama", norm_eps=1e-5, rope_theta=500_000.0, vocab_size=128_256,
                   max_position_embeddings=131_072, bos_token_id=128_000, eos_token_id=128_001), **kw}


def _llama31_scaling(factor: float) -> tuple:
    return (("factor", factor), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))


def _qwen2(**kw) -> dict:
    return {**dict(family="qwen2", qkv_bias=True, rope_theta=1_000_000.0, eos_token_id=151_643), **kw}


def _qwen3(**kw) -> dict:
    return {**dict(family="qwen3", qk_norm=True, rope_theta=1_000_000.0, vocab_size=151_936,
                   max_position_embeddings=40_960, head_dim=128, eos_token_id=151_645), **kw}


def _gemma(family: str, **kw) -> dict:
    base = dict(family=family, norm_offset=True, activation="gelu_tanh", post_norms=True, embed_scale=True,
                tie_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if family == "gemma3":
        base.update(qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0, vocab_size=262_144,
                    head_dim=256, query_pre_attn_scalar=256)
    else:
        base.update(attn_softcap=50.0, final_softcap=30.0)
    return {**base, **kw}


_PRESETS: dict[str, dict] = {
    "llama3.2-1b": _llama(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                          head_dim=64, tie_embeddings=True, rope_scaling=_llama31_scaling(32.0)),
    "llama3.1-8b": _llama(hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32, num_kv_heads=8,
                          head_dim=128, rope_scaling=_llama31_scaling(8.0)),
    "qwen2.5-0.5b": _qwen2(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                           num_kv_heads=2, head_dim=64, max_position_embeddings=32_768, tie_embeddings=True),
    "qwen2.5-1.5b": _qwen2(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                           num_kv_heads=2, head_dim=128, max_position_embeddings=131_072, tie_embeddings=True),
    "qwen2.5-7b": _qwen2(vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_layers=28, num_heads=28,
                         num_kv_heads=4, head_dim=128, max_position_embeddings=131_072),
    "qwen3-0.6b": _qwen3(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                         tie_embeddings=True),
    "qwen3-1.7b": _qwen3(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                         tie_embeddings=True),
    "qwen3-8b": _qwen3(hidden_size=4096, intermediate_size=12_288, num_layers=36, num_heads=32, num_kv_heads=8),
    "gemma2-2b": _gemma("gemma2", vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_layers=26,
                        num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        max_position_embeddings=8192, sliding_window=4096),
    "gemma3-270m": _gemma("gemma3", hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4,
                          num_kv_heads=1, max_position_embeddings=32_768, sliding_window=512),
    "gemma3-1b": _gemma("gemma3", hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
                        num_kv_heads=1, max_position_embeddings=32_768, sliding_window=512),
    "gemma3-4b": _gemma("gemma3", vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_layers=34,
                        num_heads=8, num_kv_heads=4, max_position_embeddings=131_072, sliding_window=1024,
                        rope_scaling=(("factor", 8.0), ("rope_type", "linear"))),
}

_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_PRESETS.update({
    "tiny-llama": _llama(**_TINY, num_layers=2,
                         rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                       ("original_max_position_embeddings", 64), ("rope_type", "llama3"))),
    "tiny-qwen2": _qwen2(**_TINY, num_layers=2, tie_embeddings=True),
    "tiny-qwen3": _qwen3(**_TINY, num_layers=2),
    "tiny-gemma2": _gemma("gemma2", **_TINY, num_layers=4,
                          query_pre_attn_scalar=16, sliding_window=8),
    "tiny-gemma3": _gemma("gemma3", **_TINY, num_layers=7, query_pre_attn_scalar=16, sliding_window=8,
                          rope_scaling=(("factor", 8.0), ("rope_type", "linear"))),
})


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str, **changes) -> ModelConfig:
    """The ModelConfig of a named preset, with optional field changes (e.g. `num_layers=4`)."""
    if name not in _PRESETS:
        near = difflib.get_close_matches(name, _PRESETS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"unknown model preset {name!r}; {hint}known presets: {', '.join(preset_names())}")
    fields = dict(_PRESETS[name])
    fields.setdefault("layer_types", default_layer_types(fields["family"], fields["num_layers"]))
    return ModelConfig(**fields).replace(**changes) if changes else ModelConfig(**fields)
