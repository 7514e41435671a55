"""A model saved as a polm checkpoint: orbax params, the ModelConfig as JSON, and the tokenizer files."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from polm_jax.errors import CheckpointError
from polm_jax.models.config import ModelConfig
from polm_jax.models.hf import mismatches
from polm_jax.models.transformer import param_shapes

CONFIG_FILE = "polm_model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def is_polm_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_FILE))


def read_config(folder: str) -> ModelConfig:
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        return ModelConfig.from_json(f.read())


def save_params(folder: str, config: ModelConfig, params: dict):
    """Writes the config and the (possibly sharded) params; every process of a multi-host run must call it."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(folder, PARAMS_DIR), params, force=True)
    if jax.process_index() == 0:
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            f.write(config.to_json())


def _flat_shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def load_params(folder: str, config: ModelConfig, shardings=None) -> dict:
    """Params for `config` restored from `folder`, placed with `shardings`; a checkpoint of another model is an
    error listing every missing, unexpected or misshaped tensor, raised before anything is read."""
    path = os.path.join(os.path.abspath(folder), PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{folder}: no {PARAMS_DIR}/ folder; not a polm checkpoint (see `polm convert`)")
    shapes = param_shapes(config)
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path)
        saved = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        problems = mismatches(_flat_shapes(shapes), _flat_shapes(saved))
        if problems:
            raise CheckpointError(f"{folder} holds a different model than the {config.family} config "
                                  f"({config.num_layers} layers, hidden {config.hidden_size}): " + "; ".join(problems))
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, shapes)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        return ckpt.restore(path, target)
