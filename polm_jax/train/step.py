"""The one train step factory: any loss, gradient accumulation to the exact token-weighted mean, sharded and jitted.

A loss is `loss_fn(params, frozen, batch, rng) -> (sum, count, metrics)`: `params` the trainable tree (the
gradient is taken w.r.t. it), `frozen` everything held fixed (the LoRA base, a reference model; `{}` if nothing),
`batch` a dict of [B, ...] arrays, `metrics` a dict of (sum, weight) pairs. The step sums over microbatches and
divides once, so accumulation and packing give the same mean as one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from polm_jax.train.optim import current_lr
from polm_jax.train.state import TrainState

LossFn = Callable[[dict, dict, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


def _microbatches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...]; microbatch j takes rows j, j+k, ... so each stays spread over the batch shards."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def accumulate(loss_fn: LossFn, params: dict, frozen: dict, batch: dict, rng, microbatches: int, *,
               batch_shardings=None, with_grad: bool = True):
    """Sums (loss sum, count, metric sums and, if `with_grad`, gradients of the loss sum) over microbatches."""
    value = jax.value_and_grad(loss_fn, has_aux=True) if with_grad else None

    def one(mb, key):
        if batch_shardings is not None:
            mb = jax.lax.with_sharding_constraint(mb, batch_shardings)
        if with_grad:
            (total, (count, metrics)), grads = value(params, frozen, mb, key)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            total, (count, metrics) = loss_fn(params, frozen, mb, key)
            grads = None
        return {"sum": total.astype(jnp.float32), "count": count.astype(jnp.float32), "grads": grads,
                "metrics": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)}

    if microbatches == 1:
        return one(batch, rng)
    keys, parts = jax.random.split(rng, microbatches), _microbatches(batch, microbatches)
    first = jax.eval_shape(one, jax.tree.map(lambda x: x[0], parts), keys[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

    def body(acc, xs):
        return jax.tree.map(jnp.add, acc, one(*xs)), None

    totals, _ = jax.lax.scan(body, zeros, (parts, keys))
    return totals


def _split_loss(loss_fn: LossFn) -> LossFn:
    """loss_fn returning (sum, count, metrics) -> one returning (sum, (count, metrics)) for value_and_grad."""

    def fn(params, frozen, batch, rng):
        total, count, metrics = loss_fn(params, frozen, batch, rng)
        return total, (count, metrics)

    return fn


def _mean_metrics(metrics: dict) -> dict:
    return {name: s / jnp.maximum(w, 1.0) for name, (s, w) in metrics.items()}


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, state_shardings=None,
                    frozen_shardings=None, batch_shardings=None, microbatch_shardings=None, microbatches: int = 1,
                    donate: bool = True):
    """`step(state, frozen, batch) -> (state, metrics)`, jitted with shardings and the state donated.

    A batch with no loss tokens, or a non-finite loss or gradient, leaves params and optimizer state unchanged
    (metrics `skipped_empty` / `skipped_nonfinite` say so); `step` always advances. `microbatch_shardings`
    constrain each microbatch [B/microbatches, ...] to stay spread over the batch axes. Metrics: loss, grad_norm, lr,
    count (loss tokens) and the loss's own metrics, all scalars.
    """
    split = _split_loss(loss_fn)

    def step(state: TrainState, frozen: dict, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        out = accumulate(split, state.params, frozen, batch, rng, microbatches, batch_shardings=microbatch_shardings)
        count = out["count"]
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), out["grads"], state.params)
        loss, grad_norm = out["sum"] / denom, optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = (count > 0) & finite

        def update(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(apply, update, lambda p, o: (p, o), state.params, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        lr = current_lr(opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, **({} if lr is None else {"lr": lr.astype(jnp.float32)}),
                   "count": count, "skipped_empty": (count == 0).astype(jnp.float32),
                   "skipped_nonfinite": (~finite & (count > 0)).astype(jnp.float32), **_mean_metrics(out["metrics"])}
        if "segment_ids" in batch:  # non-padding tokens of the global batch
            metrics["tokens"] = (batch["segment_ids"] > 0).sum().astype(jnp.float32)
        return new_state, metrics

    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn, *, params_shardings=None, frozen_shardings=None, batch_shardings=None):
    """`eval_step(params, frozen, batch) -> {"sum", "count", metric sums}` (no gradient; sum these over batches)."""
    split = _split_loss(loss_fn)

    def evaluate(params, frozen, batch):
        out = accumulate(split, params, frozen, batch, None, 1, with_grad=False)  # no rng: no dropout
        return {"sum": out["sum"], "count": out["count"], "metrics": out["metrics"]}

    return jax.jit(evaluate, in_shardings=(params_shardings, frozen_shardings, batch_shardings))
