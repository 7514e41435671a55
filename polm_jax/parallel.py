"""Mesh and sharding: a (data, fsdp, tensor) device mesh, and logical axis names mapped to it by a rules table.

Arrays name their axes logically (`batch`, `embed`, `heads`, `vocab`, `layers`, ...); a rules dict such as
`{"embed": ["fsdp"], "heads": ["tensor"]}` maps names to mesh axes. A mesh axis that does not divide an array's
dimension, or is already used by an earlier dimension, is dropped for that array (it stays replicated there).
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polm_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one size of -1 takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes data={data} fsdp={fsdp} tensor={tensor}: each must be >= 1, one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} "
                          f"devices, but {len(devices)} are available")
    return Mesh(np.array(devices).reshape(sizes), AXES)


def mesh_from_config(cfg) -> Mesh:
    """The mesh of a MeshConfig, first initialising the multi-host runtime when `cfg.multihost` is set."""
    if cfg.multihost and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor)


def mesh_spec(logical: PartitionSpec, shape, mesh: Mesh, rules: dict[str, list[str]]) -> PartitionSpec:
    """The mesh PartitionSpec for an array of `shape` whose axes have the given logical names."""
    used, out = set(), []
    for name, dim in zip(logical, shape):
        axes = []
        for axis in rules.get(name, []) if name else []:
            size = math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]
            if axis not in used and dim % size == 0:
                axes.append(axis)
        used.update(axes)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*out)


def shardings(logical_tree, shape_tree, mesh: Mesh, rules: dict[str, list[str]]):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given the matching tree of logical specs."""
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh, rules)),
                        logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(shape, mesh: Mesh, rules: dict[str, list[str]]) -> NamedSharding:
    """The sharding of a batch array [B, ...]: the leading axis by the `batch` rule, the rest replicated."""
    logical = PartitionSpec("batch", *([None] * (len(shape) - 1)))
    return NamedSharding(mesh, mesh_spec(logical, shape, mesh, rules))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict[str, list[str]]):
    """Within this context, traced models constrain activations (act_* logical names) to the mesh."""
    flax_rules = [(name, tuple(axes) or None) for name, axes in rules.items()]
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules):
        yield


def per_device_shapes(array: jax.Array) -> list[tuple[int, ...]]:
    """The shape of each addressable shard of an array, in device order."""
    return [s.data.shape for s in array.addressable_shards]
