"""LoRA as a pure transform of the params pytree: adapters live beside the base params, never inside a model class.

Adapters are a pytree mirroring the params but holding, for each targeted kernel, `{"lora_a": A, "lora_b": B}` at
the kernel's module path. A has the kernel's input dims then r, B has r then its output dims (r the rank):

    q/k/v_proj kernel [L, D, H|K, E]  ->  A [L, D, r],     B [L, r, H|K, E]
    o_proj     kernel [L, H, E, D]    ->  A [L, H, E, r],  B [L, r, D]
    gate/up    kernel [L, D, F]       ->  A [L, D, r],     B [L, r, F]       (down_proj: [L, F, r], [L, r, D])

`apply` inserts `lora_a` and `lora_b * scale` next to each kernel, and the model adds dropout(x) @ A @ B to that
module's output (dropout rate: config.lora_dropout, on only when forward gets a dropout_rng); B starts at
zero, so at init the adapted model is the base model. Typical use:

    adapters = lora.init_adapters(config, rank=8, targets=["q", "v"], rng=key)
    scale = alpha / rank

    def loss_fn(adapters, base, batch, rng):  # differentiate w.r.t. adapters only; the base gets no gradient
        logits = forward(config, lora.apply(base, adapters, scale), batch["tokens"], dropout_rng=rng)
        ...

    grads = jax.jit(jax.grad(loss_fn))(adapters, base, batch, rng)  # pass the base as an argument: a closed-over
                                                                    # base would be baked into the program

A scoring model's head (`score`, see `trained_in_full`) trains in full: the adapters tree then also holds it as a
plain array, which `apply` and `merge` put in place of the base's.

The reference model of DPO/RL ("the same weights with adapters off") is simply `base` itself:
`forward(config, base, tokens)`, with no second copy of the weights. `merge` folds the adapters into the kernels
for export (`pj.save_hf(Model(config, lora.merge(base, adapters, scale), tok), folder)`).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from polm_jax.errors import ConfigError
from polm_jax.models.config import ModelConfig
from polm_jax.models.transformer import param_logical_axes, param_shapes

TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                  "up": "up_proj", "down": "down_proj"}  # short names; any other target is a regex on module paths
_ADAPTER_KEYS = ("lora_a", "lora_b")


def _input_dims(path: tuple[str, ...]) -> int:
    """How many of a stacked kernel's dims after [L] are inputs: o_proj takes (H, E), every other kernel one dim."""
    return 2 if path[-1] == "o_proj" else 1


def _kernel_paths(config: ModelConfig) -> list[tuple[str, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    return [tuple(k.key for k in path[:-1]) for path, _ in flat if path[-1].key == "kernel"]


def target_paths(config: ModelConfig, targets) -> list[tuple[str, ...]]:
    """Module paths (e.g. ("layers", "attn", "q_proj")) of the kernels `targets` select, in params order.

    A target is a short name (q k v o gate up down) or a regex searched in the '/'-joined path (`layers/mlp/up_proj`).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    available = _kernel_paths(config)
    names = ["/".join(p) for p in available]
    if not targets:
        raise ConfigError(f"lora targets: none given; use names {list(TARGET_MODULES)} or regexes on the module "
                          f"paths: {', '.join(names)}")
    chosen = set()
    for target in targets:
        if target in TARGET_MODULES:
            hits = {p for p in available if p[-1] == TARGET_MODULES[target]}
        else:
            try:
                pattern = re.compile(target)
            except re.error as e:
                raise ConfigError(f"lora target {target!r} is neither a name {list(TARGET_MODULES)} nor a valid "
                                  f"regex ({e})") from None
            hits = {p for p, name in zip(available, names) if pattern.search(name)}
        if not hits:
            raise ConfigError(f"lora target {target!r} matches no kernel; use a name {list(TARGET_MODULES)} or a "
                              f"regex on one of the module paths: {', '.join(names)}")
        chosen |= hits
    return [p for p in available if p in chosen]


def _check_rank(rank) -> int:
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora rank must be an int >= 1, got {rank!r}")
    return rank


def _nested(items) -> dict:
    """{path: value} -> the nested dict with each value at its path."""
    tree: dict = {}
    for path, value in items:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def adapter_shapes(config: ModelConfig, rank: int, targets, dtype="float32") -> dict:
    """The adapters' tree of jax.ShapeDtypeStruct: A [L, *in, r] and B [L, r, *out] for each targeted kernel."""
    _check_rank(rank)
    shapes, dtype = param_shapes(config), jnp.dtype(dtype)

    def one(path):
        kernel, n = _lookup(shapes, path)["kernel"].shape, 1 + _input_dims(path)
        return {"lora_a": jax.ShapeDtypeStruct((*kernel[:n], rank), dtype),
                "lora_b": jax.ShapeDtypeStruct((kernel[0], rank, *kernel[n:]), dtype)}

    return _nested((path, one(path)) for path in target_paths(config, targets))


def adapter_logical_axes(config: ModelConfig, rank: int, targets) -> dict:
    """The adapters' tree of PartitionSpecs of logical axis names: A takes the kernel's input axes + None (rank),
    B None + its output axes; `parallel.shardings(this, adapter_shapes(...), mesh, rules)` places them."""
    _check_rank(rank)
    axes = param_logical_axes(config)

    def one(path):
        spec, n = tuple(_lookup(axes, path)["kernel"]), 1 + _input_dims(path)
        return {"lora_a": PartitionSpec(*spec[:n], None), "lora_b": PartitionSpec(spec[0], None, *spec[n:])}

    return _nested((path, one(path)) for path in target_paths(config, targets))


def init_adapters(config: ModelConfig, rank: int, targets, rng, dtype="float32") -> dict:
    """Fresh adapters: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's default, kaiming-uniform with a=sqrt(5)),
    fan_in the kernel's input size; B = 0, so the adapted model starts equal to the base. Leaves in `dtype`."""
    shapes = adapter_shapes(config, rank, targets, dtype)

    def one(i, path):
        a, b = _lookup(shapes, path)["lora_a"], _lookup(shapes, path)["lora_b"]
        bound = 1.0 / math.sqrt(math.prod(a.shape[1:-1]))
        lora_a = jax.random.uniform(jax.random.fold_in(rng, i), a.shape, jnp.float32, -bound, bound)
        return {"lora_a": lora_a.astype(a.dtype), "lora_b": jnp.zeros(b.shape, b.dtype)}

    return _nested((path, one(i, path)) for i, path in enumerate(target_paths(config, targets)))


def _is_adapter(node) -> bool:
    return isinstance(node, dict) and set(node) == set(_ADAPTER_KEYS)


def trained_in_full(config: ModelConfig) -> tuple[str, ...]:
    """Top-level params that train in full beside the adapters (PEFT's modules_to_save): a scoring head."""
    return ("score",) if config.num_labels else ()


def _graft(base: dict, adapters: dict, fn, path=()) -> dict:
    """A copy of `base` with fn(module_params, adapter, path) in place of each module that has an adapter, and
    the adapters' plain arrays (params trained in full) in place of the base's."""
    out = dict(base)
    for key, sub in adapters.items():
        where = (*path, key)
        if not isinstance(base, dict) or key not in base:
            raise ConfigError(f"adapter at {'/'.join(where)} has no matching module in the params")
        if not isinstance(sub, dict):
            out[key] = sub
        else:
            out[key] = fn(base[key], sub, where) if _is_adapter(sub) else _graft(base[key], sub, fn, where)
    return out


def _checked(module: dict, adapter: dict, path) -> tuple:
    name = "/".join(path)
    if "lora_a" in module:
        raise ConfigError(f"adapter at {name}: the params there already hold an adapter; pass the base params")
    if "kernel" not in module:
        raise ConfigError(f"adapter at {name}: the params there have no kernel")
    kernel, a, b = module["kernel"], adapter["lora_a"], adapter["lora_b"]
    if a.shape[0] != b.shape[0] or a.shape[-1] != b.shape[1] or (*a.shape[:-1], *b.shape[2:]) != kernel.shape:
        raise ConfigError(f"adapter at {name}: lora_a {a.shape} and lora_b {b.shape} do not fit kernel {kernel.shape}")
    return kernel, a, b


def apply(base_params: dict, adapters: dict, scale: float) -> dict:
    """The params the model consumes: base leaves unchanged (shared, not copied), `lora_a` and `lora_b * scale`
    next to each adapted kernel. Pure and cheap; differentiable w.r.t. the adapters. `scale` is alpha / rank."""

    def insert(module, adapter, path):
        _, a, b = _checked(module, adapter, path)
        return {**module, "lora_a": a, "lora_b": (b * scale).astype(b.dtype)}

    return _graft(base_params, adapters, insert)


def merge(base_params: dict, adapters: dict, scale: float) -> dict:
    """Plain params with each adapted kernel replaced by kernel + scale * A @ B (computed in f32, cast back to the
    kernel's dtype): the same model as `apply`, with no adapter leaves, for export."""

    def fold(module, adapter, path):
        kernel, a, b = _checked(module, adapter, path)
        layers, rank = a.shape[0], a.shape[-1]
        delta = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank).astype(jnp.float32),
                           b.reshape(layers, rank, -1).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        merged = kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)
        return {**module, "kernel": merged.astype(kernel.dtype)}

    return _graft(base_params, adapters, fold)
