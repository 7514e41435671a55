"""The optimizer: AdamW with warmup and cosine/linear decay, global-norm clipping, and no decay on chosen params."""

from __future__ import annotations

import jax
import optax

from polm_jax.config import OptimSection


def learning_rate(section: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over warmup_steps, then cosine/linear decay to lr * min_lr_ratio (or constant)."""
    warmup = min(section.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    end = section.lr * section.min_lr_ratio
    if section.schedule == "cosine":
        decay = optax.cosine_decay_schedule(section.lr, rest, alpha=section.min_lr_ratio)
    elif section.schedule == "linear":
        decay = optax.linear_schedule(section.lr, end, rest)
    else:
        decay = optax.constant_schedule(section.lr)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, section.lr, warmup), decay], [warmup])


def decay_mask(no_decay: list[str]):
    """A mask function: True for params whose path has no part containing one of `no_decay` (e.g. norm, bias)."""

    def mask(params):
        def keep(path, _):
            names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            return not any(word in name for name in names for word in no_decay)

        return jax.tree_util.tree_map_with_path(keep, params)

    return mask


def make_optimizer(section: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """Clipping then AdamW; the current learning rate is kept in the state (read it with `current_lr`)."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate(section, total_steps), b1=section.b1, b2=section.b2, eps=section.eps,
        weight_decay=section.weight_decay, mask=decay_mask(section.no_decay))
    if section.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(section.max_grad_norm), adamw)


def current_lr(opt_state):
    """The learning rate the last update used (from the injected hyperparameters; None if not injected)."""
    return optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=lambda _, value: hasattr(value, "dtype"))
