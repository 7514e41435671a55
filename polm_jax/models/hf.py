"""Hugging Face checkpoints <-> polm params: config.json translation and safetensors key maps, both directions.

Loading reads one tensor at a time and places it straight onto the mesh with its sharding, so a host never holds
more than one full tensor. Everything is checked before anything is loaded: missing or unexpected tensors and
shape mismatches are reported together in one CheckpointError.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from polm_jax.errors import CheckpointError
from polm_jax.models.config import FULL, SLIDING, ModelConfig
from polm_jax.models.transformer import param_shapes

_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
         "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
         "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}
_SCORER_ARCH = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                "qwen3": "Qwen3ForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
                "gemma3": "Gemma3TextForSequenceClassification"}  # num_labels > 0: a scoring head (reward models)
_SCORER_FAMILY_OF = {arch: family for family, arch in _SCORER_ARCH.items()}
_FAMILY_OF = {**{arch: family for family, (arch, _) in _ARCH.items()}, **_SCORER_FAMILY_OF}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


# ---------------------------------------------------------------------------------------------- config.json


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json; expected a Hugging Face model folder "
                              "(config.json, *.safetensors, tokenizer files) or a polm checkpoint")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} line {e.lineno}: invalid JSON: {e.msg}") from None


def _rope(hf: dict, family: str) -> tuple[float, tuple | None, float | None]:
    """(theta, scaling, local theta) from either config format (rope_parameters, or rope_theta + rope_scaling)."""
    params = hf.get("rope_parameters")
    local_theta = None
    if family == "gemma3":
        if params and "full_attention" in params:
            local_theta = params.get("sliding_attention", {}).get("rope_theta", 10_000.0)
            params = params["full_attention"]
        else:
            local_theta = hf.get("rope_local_base_freq", 10_000.0)
            params = None
    if params is None:
        params = {"rope_theta": hf.get("rope_theta", 1e6 if family == "gemma3" else 10_000.0),
                  **(hf.get("rope_scaling") or {})}
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if scaling["rope_type"] == "default":
        scaling = None
    elif scaling["rope_type"] not in ("linear", "llama3"):
        raise CheckpointError(f"rope type {scaling['rope_type']!r} is not supported (supported: linear, llama3)")
    return float(params["rope_theta"]), tuple(sorted(scaling.items())) if scaling else None, local_theta


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict."""
    archs = hf.get("architectures") or []
    family = next((_FAMILY_OF[a] for a in archs if a in _FAMILY_OF), None)
    if family is None:
        raise CheckpointError(f"{where}: unsupported architecture {archs or hf.get('model_type')}; supported: "
                              f"{', '.join(sorted(_FAMILY_OF))} (for multimodal Gemma 3 use the text-only model)")
    num_labels = len(hf.get("id2label") or {0: 0, 1: 1}) if any(a in _SCORER_FAMILY_OF for a in archs) else 0
    unsupported = [k for k in ("attention_bias", "mlp_bias", "use_sliding_window") if hf.get(k) and
                   not (k == "attention_bias" and family == "qwen2")]
    if unsupported:
        raise CheckpointError(f"{where}: options {unsupported} are not supported for {archs[0]}")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: activation {act!r} is not supported ({sorted(_ACTIVATIONS)})")
    theta, scaling, local_theta = _rope(hf, family)
    gemma = family in ("gemma2", "gemma3")
    heads = hf["num_attention_heads"]
    layer_types = hf.get("layer_types")
    if gemma and layer_types is None:
        period = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
        layer_types = [SLIDING if (i + 1) % period else FULL for i in range(hf["num_hidden_layers"])]
    if layer_types is not None and SLIDING not in layer_types:
        layer_types = None
    eos = hf.get("eos_token_id")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf["max_position_embeddings"], rope_theta=theta, rope_local_theta=local_theta,
        rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6), norm_offset=gemma,
        activation=_ACTIVATIONS[act], qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "gemma3"),
        post_norms=gemma, embed_scale=gemma, attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"), query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        sliding_window=hf.get("sliding_window") if layer_types else None,
        layer_types=tuple(layer_types) if layer_types else None,
        tie_embeddings=hf.get("tie_word_embeddings", gemma), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=hf.get("pad_token_id"),
        dtype=dtype, param_dtype=dtype, num_labels=num_labels)


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict that `transformers` loads (both the 4.x and 5.x rope fields are written)."""
    arch, model_type = _ARCH[cfg.family]
    if cfg.num_labels:
        arch = _SCORER_ARCH[cfg.family]
    scaling = cfg.rope_scaling_dict
    hf = dict(architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
              eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
              pad_token_id=cfg.pad_token_id, torch_dtype=cfg.param_dtype, dtype=cfg.param_dtype,
              rope_theta=cfg.rope_theta, rope_scaling=scaling, attention_dropout=0.0, use_cache=True)
    hf["rope_parameters"] = {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})}
    if cfg.num_labels:
        hf.update(id2label={str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
                  label2id={f"LABEL_{i}": i for i in range(cfg.num_labels)})
    if cfg.family in ("gemma2", "gemma3"):
        hf.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                  query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
                  layer_types=list(cfg.layer_types or [FULL] * cfg.num_layers),
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
                  attention_bias=False)
    else:
        hf.update(hidden_act="silu", attention_bias=cfg.qkv_bias, mlp_bias=False, use_sliding_window=False)
    if cfg.family == "gemma3":
        local = cfg.rope_local_theta or cfg.rope_theta
        hf.update(rope_local_base_freq=local, rope_parameters={
            "full_attention": hf["rope_parameters"], "sliding_attention": {"rope_theta": local, "rope_type": "default"}})
    return hf


# ---------------------------------------------------------------------------------------------- tensor map


@dataclass(frozen=True)
class TensorSpec:
    """One polm parameter and the HF tensor(s) it comes from: `hf_name` has `{i}` for stacked layer params."""

    path: tuple[str, ...]
    hf_name: str
    kind: str  # same | transpose | in_heads | out_heads | bias_heads

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every parameter of `cfg` with its HF name and layout transform."""
    specs = [TensorSpec(("embed",), "model.embed_tokens.weight", "same"),
             TensorSpec(("final_norm", "scale"), "model.norm.weight", "same")]
    if cfg.num_labels:
        specs.append(TensorSpec(("score",), "score.weight", "transpose"))
    elif not cfg.tie_embeddings:
        specs.append(TensorSpec(("lm_head",), "lm_head.weight", "transpose"))
    layer = [(("attn", f"{p}_proj", "kernel"), f"self_attn.{p}_proj.weight", "in_heads") for p in "qkv"]
    layer.append((("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "out_heads"))
    layer += [(("mlp", f"{p}_proj", "kernel"), f"mlp.{p}_proj.weight", "transpose") for p in ("gate", "up", "down")]
    if cfg.qkv_bias:
        layer += [(("attn", f"{p}_proj", "bias"), f"self_attn.{p}_proj.bias", "bias_heads") for p in "qkv"]
    if cfg.qk_norm:
        layer += [(("attn", f"{p}_norm", "scale"), f"self_attn.{p}_norm.weight", "same") for p in "qk"]
    norms = {"attn_norm": "input_layernorm"}
    if cfg.post_norms:
        norms.update(post_attn_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                     post_mlp_norm="post_feedforward_layernorm")
    else:
        norms["mlp_norm"] = "post_attention_layernorm"
    layer += [((ours, "scale"), f"{hf}.weight", "same") for ours, hf in norms.items()]
    return specs + [TensorSpec(("layers", *path), "model.layers.{i}." + name, kind) for path, name, kind in layer]


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for a polm (per-layer) shape."""
    if kind == "transpose":
        return shape[::-1]
    if kind == "in_heads":  # ours [D, H, E], HF [H*E, D]
        return (shape[1] * shape[2], shape[0])
    if kind == "out_heads":  # ours [H, E, D], HF [D, H*E]
        return (shape[2], shape[0] * shape[1])
    if kind == "bias_heads":
        return (shape[0] * shape[1],)
    return shape


def to_polm(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An HF tensor in polm layout `shape`."""
    if kind in ("transpose", "in_heads", "out_heads"):
        return np.ascontiguousarray(x.T).reshape(shape)
    return x.reshape(shape)


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    """A polm (per-layer) tensor in HF layout."""
    shape = hf_shape(kind, x.shape)
    if kind in ("transpose", "in_heads", "out_heads"):
        return np.ascontiguousarray(x.reshape(shape[::-1]).T)
    return np.ascontiguousarray(x.reshape(shape))


# ---------------------------------------------------------------------------------------------- safetensors I/O


def _weight_map(folder: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, from the index if there is one."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(folder, file) for name, file in json.load(f)["weight_map"].items()}
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (only safetensors checkpoints are supported)")
    out = {}
    for file in files:
        with safe_open(os.path.join(folder, file), "np") as f:
            out.update({name: os.path.join(folder, file) for name in f.keys()})
    return out


def _hf_shapes(weight_map: dict[str, str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(set(weight_map.values())):
        try:
            with safe_open(file, "np") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k in weight_map})
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{file}: cannot read safetensors header: {e}") from None
    return shapes


def _expected(cfg: ModelConfig) -> dict[str, tuple[TensorSpec, int | None, tuple[int, ...]]]:
    """HF name -> (spec, layer index or None, HF shape) for every tensor the model needs."""
    shapes = param_shapes(cfg)
    out = {}
    for spec in tensor_specs(cfg):
        shape = _get(shapes, spec.path).shape
        if spec.stacked:
            for i in range(shape[0]):
                out[spec.hf_name.format(i=i)] = (spec, i, hf_shape(spec.kind, shape[1:]))
        else:
            out[spec.hf_name] = (spec, None, hf_shape(spec.kind, shape))
    return out


def check_hf_tensors(folder: str, cfg: ModelConfig) -> dict[str, str]:
    """The weight map, after checking names and shapes against `cfg`; raises one error listing every problem."""
    weight_map = _weight_map(folder)
    found = _hf_shapes(weight_map)
    expected = _expected(cfg)
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    found = {n: shape for n, shape in found.items() if n not in ignorable and not n.endswith(_IGNORED_SUFFIXES)}
    problems = mismatches({n: shape for n, (_, _, shape) in expected.items()}, found)
    if problems:
        raise CheckpointError(f"{folder} does not match the {cfg.family} config ({cfg.num_layers} layers, hidden "
                              f"{cfg.hidden_size}, vocab {cfg.vocab_size}): " + "; ".join(problems))
    return weight_map


def mismatches(expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    """Missing, unexpected and misshaped tensors, by name -> shape, as short descriptions (empty when equal)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n}: file {tuple(found[n])}, model {tuple(expected[n])}" for n in sorted(set(found) & set(expected))
             if tuple(found[n]) != tuple(expected[n])]
    return ([f"missing tensors ({len(missing)}): {_short(missing)}"] if missing else []) + \
           ([f"unexpected tensors ({len(unexpected)}): {_short(unexpected)}"] if unexpected else []) + \
           ([f"shape mismatches ({len(wrong)}): {_short(wrong)}"] if wrong else [])


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _place(x: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


@partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, i):
    return stacked.at[i].set(layer)


def load_hf_params(folder: str, cfg: ModelConfig, shardings=None) -> dict:
    """Params for `cfg` from a HF folder, each tensor read once and placed with `shardings` (a matching tree)."""
    weight_map = check_hf_tensors(folder, cfg)
    shapes, dtype, params = param_shapes(cfg), np.dtype(jnp.dtype(cfg.param_dtype)), {}
    specs = tensor_specs(cfg)
    count = sum(_get(shapes, spec.path).shape[0] if spec.stacked else 1 for spec in specs)
    progress = tqdm(total=count, desc=f"loading {os.path.basename(os.path.normpath(folder))}",
                    unit="tensor", disable=None)
    for spec in specs:
        shape = _get(shapes, spec.path).shape
        sharding = None if shardings is None else _get(shardings, spec.path)

        def read(name, layer_shape):
            progress.update()
            with safe_open(weight_map[name], "np") as f:
                return to_polm(spec.kind, f.get_tensor(name), layer_shape).astype(dtype)

        if not spec.stacked:
            _set(params, spec.path, _place(read(spec.hf_name, shape), sharding))
            continue
        layer_sharding = None if sharding is None else jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        stacked = jax.jit(lambda s=shape: jnp.zeros(s, dtype), out_shardings=sharding)()
        for i in range(shape[0]):
            stacked = _set_layer(stacked, _place(read(spec.hf_name.format(i=i), shape[1:]), layer_sharding), i)
        _set(params, spec.path, stacked)
    progress.close()
    return params


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def hf_tensors(cfg: ModelConfig, params: dict):
    """Yields (HF name, numpy tensor) for every parameter, one layer slice at a time."""
    for spec in tensor_specs(cfg):
        x = _get(params, spec.path)
        if spec.stacked:
            for i in range(x.shape[0]):
                yield spec.hf_name.format(i=i), to_hf(spec.kind, _to_host(x[i]))
        else:
            yield spec.hf_name, to_hf(spec.kind, _to_host(x))


def save_hf_params(folder: str, cfg: ModelConfig, params: dict, max_shard_bytes: int = 4 << 30):
    """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`) that transformers loads.

    In a multi-host run every process must call it (tensors are gathered across hosts); process 0 writes.
    """
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg), f, indent=2)
    shards, current, size = [], {}, 0
    for name, tensor in tqdm(hf_tensors(cfg, params), desc=f"saving {os.path.basename(os.path.normpath(folder))}",
                             unit="tensor", disable=None):
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(_write_shard(folder, len(shards), current, writer))
            current, size = {}, 0
        current[name], size = tensor, size + tensor.nbytes
    shards.append(_write_shard(folder, len(shards), current, writer))
    if not writer:
        return
    if len(shards) == 1:
        os.replace(shards[0][0], os.path.join(folder, "model.safetensors"))
        return
    weight_map, total = {}, 0
    for k, (path, names, nbytes) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, os.path.join(folder, final))
        weight_map.update({n: final for n in names})
        total += nbytes
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _write_shard(folder: str, k: int, tensors: dict[str, np.ndarray], writer: bool):
    path = os.path.join(folder, f".shard-{k}.safetensors.tmp")
    if writer:
        save_file(tensors, path, metadata={"format": "pt"})
    return path, list(tensors), sum(t.nbytes for t in tensors.values())
