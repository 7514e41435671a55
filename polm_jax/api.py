"""The small public front: load, init, save and run a model. The core stays functional underneath."""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax

from polm_jax import parallel
from polm_jax.config import DEFAULT_RULES, ModelSection
from polm_jax.data.tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from polm_jax.errors import CheckpointError
from polm_jax.models import hf, polm_checkpoint
from polm_jax.models.config import ModelConfig
from polm_jax.models.presets import get_preset
from polm_jax.models.transformer import init_params, param_logical_axes, param_shapes


@dataclass
class Model:
    """A model: its architecture, its params (a plain nested dict of arrays) and, if it has one, its tokenizer."""

    config: ModelConfig
    params: dict
    tokenizer: Tokenizer | None = None


def param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh, rules: dict | None = None):
    """NamedShardings for the params of `config` on `mesh` under logical axis `rules`."""
    return parallel.shardings(param_logical_axes(config), param_shapes(config), mesh, rules or DEFAULT_RULES)


def _with_dtypes(config: ModelConfig, dtype, param_dtype, changes) -> ModelConfig:
    extra = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    return config.replace(**changes, **extra) if (changes or extra) else config


def init(preset: str | ModelConfig, seed: int = 0, *, mesh=None, rules=None, dtype=None, param_dtype=None,
         **changes) -> Model:
    """A randomly initialised model from a preset name (or a ModelConfig), created directly sharded on `mesh`."""
    config = get_preset(preset) if isinstance(preset, str) else preset
    config = _with_dtypes(config, dtype, param_dtype, changes)
    shardings = None if mesh is None else param_shardings(config, mesh, rules)
    params = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(config, jax.random.key(seed))
    return Model(config, params)


def read_model_config(path: str) -> ModelConfig:
    """The architecture stored in a Hugging Face folder or a polm checkpoint (no weights read)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such folder")
    if polm_checkpoint.is_polm_checkpoint(path):
        return polm_checkpoint.read_config(path)
    return hf.config_from_hf(hf.read_hf_config(path), os.path.join(path, "config.json"))


def load(path: str, *, mesh=None, rules=None, dtype=None, param_dtype=None, seed: int = 0, **changes) -> Model:
    """A model from a Hugging Face folder or a polm checkpoint, each tensor placed with its sharding on `mesh`.

    `dtype`/`param_dtype` override the checkpoint's; `changes` set other runtime fields (e.g. remat="full").
    `num_labels=n` on a causal LM's checkpoint gives a sequence scorer (a reward model to train): the decoder's
    weights with a fresh `score` head [D, n] (normal, std 0.02, from `seed`) in place of the language-model head.
    """
    stored = read_model_config(path)
    config = _with_dtypes(stored, dtype, param_dtype, changes)
    in_files = config.replace(num_labels=stored.num_labels)
    shardings = None if mesh is None else param_shardings(in_files, mesh, rules)
    if polm_checkpoint.is_polm_checkpoint(path):
        params = polm_checkpoint.load_params(path, in_files, shardings)
        tok_dir = os.path.join(path, polm_checkpoint.TOKENIZER_DIR)
    else:
        params, tok_dir = hf.load_hf_params(path, in_files, shardings), path
    if config.num_labels != stored.num_labels:
        params = _with_score_head(path, stored, config, params, seed, mesh, rules)
    return Model(config, params, load_tokenizer(tok_dir) if has_tokenizer(tok_dir) else None)


def _with_score_head(path: str, stored: ModelConfig, config: ModelConfig, params: dict, seed: int, mesh,
                     rules) -> dict:
    """A causal LM's params with its language-model head replaced by a fresh scoring head for `config`."""
    if stored.num_labels:
        raise CheckpointError(f"{path} holds a scoring model with num_labels={stored.num_labels}; it cannot be "
                              f"loaded with num_labels={config.num_labels}")
    shape = param_shapes(config)["score"]
    sharding = None if mesh is None else param_shardings(config, mesh, rules)["score"]
    init = jax.jit(lambda key: 0.02 * jax.random.normal(key, shape.shape, shape.dtype), out_shardings=sharding)
    return {**{k: v for k, v in params.items() if k != "lm_head"}, "score": init(jax.random.key(seed))}


def save_hf(model: Model, folder: str, max_shard_bytes: int = 4 << 30):
    """Writes a folder `transformers` loads: config.json, safetensors (sharded past the limit), tokenizer files.

    In a multi-host run every process calls it; process 0 writes.
    """
    hf.save_hf_params(folder, model.config, model.params, max_shard_bytes)
    if model.tokenizer is not None and jax.process_index() == 0:
        model.tokenizer.save(folder)


def save(model: Model, folder: str):
    """Writes a polm checkpoint (orbax params, model config, tokenizer files); `load` reads it back.

    In a multi-host run every process calls it; process 0 writes the config and tokenizer files.
    """
    polm_checkpoint.save_params(folder, model.config, model.params)
    if model.tokenizer is not None and jax.process_index() == 0:
        model.tokenizer.save(os.path.join(folder, polm_checkpoint.TOKENIZER_DIR))


def _section_changes(section: ModelSection) -> dict:
    runtime = {k: getattr(section, k) for k in ("dtype", "param_dtype", "remat", "attention_impl", "logprob_impl")}
    return {**section.overrides, **{k: v for k, v in runtime.items() if v is not None}}


def config_from_section(section: ModelSection) -> ModelConfig:
    """The architecture a config's `model:` section names, without reading or creating any weights."""
    if section.path:
        return read_model_config(section.path).replace(**_section_changes(section))
    if not section.preset:
        raise CheckpointError("model: set model.path (a HF folder or polm checkpoint) or model.preset")
    return get_preset(section.preset).replace(**_section_changes(section))


def from_section(section: ModelSection, *, seed: int = 0, mesh=None, rules=None) -> Model:
    """The model a config's `model:` section names: loaded from `path`, else initialised from `preset`."""
    if section.path:
        return load(section.path, mesh=mesh, rules=rules, seed=seed, **_section_changes(section))
    return init(config_from_section(section), seed, mesh=mesh, rules=rules)
