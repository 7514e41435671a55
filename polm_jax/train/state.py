"""TrainState: the pytree a train step carries (step, trainable params, optimizer state, RNG) and its shardings."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    """What changes during training. `params` are the trainable params only (LoRA: the adapters)."""

    step: jax.Array  # int32 scalar: batches consumed
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # uint32 [2]: the run's key; step k uses fold_in(rng, k)


def init_state(params: dict, optimizer: optax.GradientTransformation, seed: int, shardings=None) -> TrainState:
    """A fresh state at step 0 (jitted, placed with `shardings` from `state_shardings` when given)."""

    def build(p):
        return TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), jax.random.PRNGKey(seed))

    return jax.jit(build, out_shardings=shardings)(params)


def state_shardings(optimizer: optax.GradientTransformation, param_shapes: dict, param_shardings: dict,
                    mesh) -> TrainState:
    """Shardings for a TrainState: optimizer moments follow their params, scalars are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
    opt = optax.tree_utils.tree_map_params(optimizer, lambda _, s: s, opt_shapes, param_shardings,
                                           transform_non_params=lambda _: replicated)
    return TrainState(replicated, param_shardings, opt, replicated)


def abstract_state(optimizer: optax.GradientTransformation, param_shapes: dict, shardings: TrainState) -> TrainState:
    """The state's shapes and dtypes with their shardings (jax.ShapeDtypeStruct), for restoring and AOT lowering."""
    shapes = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p),
                                                 jax.random.PRNGKey(0)), param_shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
