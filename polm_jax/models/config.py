"""ModelConfig: everything that decides the decoder's architecture and numerics, one frozen dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from polm_jax.errors import ConfigError

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
SLIDING, FULL = "sliding_attention", "full_attention"
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "reference", "pallas")
LOGPROB_IMPLS = ("auto", "xla_chunked", "pallas", "reference")  # see polm_jax.ops.logprob


@dataclass(frozen=True)
class ModelConfig:
    """A decoder architecture. Field names follow Hugging Face where one exists."""

    family: str  # llama | qwen2 | qwen3 | gemma2 | gemma3: picks the HF key map and class names
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10_000.0
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3); None: rope_theta
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # e.g. (("rope_type", "llama3"), ("factor", 8.0), ...)
    norm_eps: float = 1e-6
    norm_offset: bool = False  # RMSNorm scales by (1 + w) (Gemma)
    activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU)
    qkv_bias: bool = False  # Qwen 2.5
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen 3, Gemma 3)
    post_norms: bool = False  # norms after attention and MLP as well as before (Gemma 2/3)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None: head_dim
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer: sliding_attention | full_attention; None: all full
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch
    attention_impl: str = "auto"
    logprob_impl: str = "auto"
    lora_dropout: float = 0.0  # dropout on the LoRA adapters' input (active only when forward gets a dropout_rng)
    num_labels: int = 0  # 0: a causal LM (lm_head); n >= 1: a sequence scorer (a reward model: `score` [D, n], no lm_head)

    def __post_init__(self):
        self._check()

    def _check(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {FAMILIES}")
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES),
                              ("attention_impl", ATTENTION_IMPLS), ("logprob_impl", LOGPROB_IMPLS),
                              ("activation", ("silu", "gelu_tanh"))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {allowed}")
        if self.num_labels < 0:
            problems.append(f"num_labels {self.num_labels} is negative (0: a causal LM; >= 1: a scoring head)")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout {self.lora_dropout} is not in [0, 1)")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            if set(self.layer_types) - {SLIDING, FULL}:
                problems.append(f"layer_types entries must be {SLIDING!r} or {FULL!r}")
            if SLIDING in self.layer_types and not self.sliding_window:
                problems.append("sliding_attention layers need sliding_window")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window."""
        return tuple(t == SLIDING for t in (self.layer_types or (FULL,) * self.num_layers))

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed; `layer_types` is re-derived for the family when num_layers changes."""
        if "num_layers" in changes and "layer_types" not in changes and self.layer_types is not None:
            changes["layer_types"] = default_layer_types(self.family, changes["num_layers"])
        if isinstance(changes.get("rope_scaling"), dict):
            changes["rope_scaling"] = tuple(sorted(changes["rope_scaling"].items()))
        if isinstance(changes.get("layer_types"), list):
            changes["layer_types"] = tuple(changes["layer_types"])
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown model config field(s) {sorted(unknown)}; valid: "
                              f"{sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """The config `to_json` wrote; runtime fields an older file lacks (e.g. lora_dropout) take their defaults."""
        data = json.loads(text)
        data["rope_scaling"] = tuple(tuple(kv) for kv in data["rope_scaling"]) if data.get("rope_scaling") else None
        for key in ("layer_types", "eos_token_id"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)

    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if self.qkv_bias else 0) + (2 * hd if self.qk_norm else 0)
        norms = d * (4 if self.post_norms else 2)
        per_layer = attn + 3 * d * f + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings or self.num_labels else 2)
        return self.num_layers * per_layer + embed + d + d * self.num_labels


def default_layer_types(family: str, num_layers: int) -> tuple[str, ...] | None:
    """The HF layer pattern: Gemma 2 alternates (even layers slide); Gemma 3 has every sixth layer global."""
    if family == "gemma2":
        return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(num_layers))
    if family == "gemma3":
        return tuple(SLIDING if (i + 1) % 6 else FULL for i in range(num_layers))
    return None
