"""`polm plan`: size a run before paying for it. Params, bytes per device under the configured sharding, FLOPs per
token, and the compiled memory of one train step lowered ahead of time on abstract inputs (nothing allocated)."""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from polm_jax import parallel
from polm_jax.algorithms.sft import sft_loss
from polm_jax.config import Config
from polm_jax.data.pipeline import BATCH_KEYS
from polm_jax.train.metrics import flops_per_token
from polm_jax.train.optim import make_optimizer
from polm_jax.train.session import combine_params, model_config, param_layout
from polm_jax.train.state import abstract_state, state_shardings
from polm_jax.train.step import make_train_step


def _device_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a tree of arrays with these shardings (the largest shard of each)."""
    total = 0
    for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
    return total


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def plan(cfg: Config) -> dict:
    """The figures of one SFT train step of `cfg` on its mesh (see module docstring); compiles, allocates nothing."""
    config = model_config(cfg)
    mesh = parallel.mesh_from_config(cfg.mesh)
    layout = param_layout(cfg, config, mesh)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(optimizer, layout.trainable_shapes, layout.trainable_shardings, mesh)
    state = abstract_state(optimizer, layout.trainable_shapes, shardings)
    frozen = _abstract(layout.frozen_shapes, layout.frozen_shardings)
    rows, length = cfg.train.batch_size, cfg.data.max_length
    micro = rows // cfg.train.microbatches
    batch_sh = {k: parallel.batch_sharding((rows, length), mesh, cfg.mesh.rules) for k in BATCH_KEYS}
    micro_sh = {k: parallel.batch_sharding((micro, length), mesh, cfg.mesh.rules) for k in BATCH_KEYS}
    batch = {k: jax.ShapeDtypeStruct((rows, length), np.int32, sharding=batch_sh[k]) for k in BATCH_KEYS}

    loss_fn = sft_loss(config, lambda t, f: combine_params(layout.lora_scale, t, f))
    step = make_train_step(loss_fn, optimizer, state_shardings=shardings,
                           frozen_shardings=layout.frozen_shardings or None, batch_shardings=batch_sh,
                           microbatch_shardings=micro_sh, microbatches=cfg.train.microbatches)
    t0 = time.perf_counter()
    with parallel.activation_sharding(mesh, cfg.mesh.rules):
        compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    n_trainable = sum(math.prod(s.shape) for s in jax.tree.leaves(layout.trainable_shapes))
    opt_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.opt_state)
    figures = {
        "model": cfg.model.path or cfg.model.preset,
        "params": config.num_params(),
        "trainable_params": n_trainable,
        "devices": int(mesh.devices.size),
        "platform": mesh.devices.flat[0].platform,
        "mesh": dict(mesh.shape),
        "param_bytes_per_device": _device_bytes(layout.trainable_shapes, layout.trainable_shardings)
        + _device_bytes(layout.frozen_shapes, layout.frozen_shardings),
        "optimizer_bytes_per_device": _device_bytes(opt_shapes, shardings.opt_state),
        "tokens_per_step": rows * length,
        "flops_per_token": flops_per_token(config, length, weight_grads=not cfg.lora.rank),
        "compile_seconds": round(compile_s, 2),
    }
    if memory is not None:
        figures.update(step_argument_bytes=memory.argument_size_in_bytes, step_output_bytes=memory.output_size_in_bytes,
                       step_temp_bytes=memory.temp_size_in_bytes, step_alias_bytes=memory.alias_size_in_bytes,
                       step_peak_bytes=memory.argument_size_in_bytes + memory.output_size_in_bytes
                       - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return figures


def devices_needed(cfg: Config) -> int | None:
    """How many devices the configured mesh names (None when an axis is -1, i.e. 'the rest')."""
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    return None if -1 in sizes else math.prod(sizes)
