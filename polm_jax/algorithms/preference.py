"""The DPO family and KTO as pure functions of per-sequence log-probs, and the loss_fn that trains with them.

Exact objectives: ../shared/ALGORITHMS.md. A pair's statistics are `Pairs` (arrays [P]); each loss maps them to
per-pair losses [P]. `logps` are sums of the response's token log-probs; lengths count its tokens.

Batches (polm_jax.data.preference) pack units of two sequences: unit u of a row holds segments 2u-1 (chosen, or
KTO's example) and 2u (rejected, or KTO's mismatched prompt/completion for the KL estimate), so one forward pass
scores both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from polm_jax.algorithms.sft import sequence_logprobs, target_mask
from polm_jax.config import PreferenceSection
from polm_jax.models.config import ModelConfig

NEEDS_REFERENCE = ("sigmoid", "robust", "hinge", "ipo", "kto")


class Pairs(NamedTuple):
    """Per-pair sequence statistics, each [P] f32 (reference log-probs are 0 when the loss has none)."""

    chosen_logps: jax.Array
    rejected_logps: jax.Array
    chosen_lengths: jax.Array
    rejected_lengths: jax.Array
    ref_chosen_logps: jax.Array
    ref_rejected_logps: jax.Array


def _smoothed(x, eps):
    """-(1 - eps) log sigma(x) - eps log sigma(-x): conservative DPO's label smoothing."""
    return -(1 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def _margin(p: Pairs):
    """h = [logp(y_w) - logp_ref(y_w)] - [logp(y_l) - logp_ref(y_l)]."""
    return (p.chosen_logps - p.ref_chosen_logps) - (p.rejected_logps - p.ref_rejected_logps)


def _mean(logps, lengths):
    return logps / jnp.maximum(lengths, 1.0)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def sigmoid(p: Pairs, o: PreferenceSection):
    """DPO: -log sigma(beta h); with label smoothing eps, conservative DPO (cDPO)."""
    return _smoothed(o.beta * _margin(p), o.label_smoothing)


def robust(p: Pairs, o: PreferenceSection):
    """Robust DPO: (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)."""
    x, eps = o.beta * _margin(p), o.label_smoothing
    return (-(1 - eps) * jax.nn.log_sigmoid(x) + eps * jax.nn.log_sigmoid(-x)) / (1 - 2 * eps)


def hinge(p: Pairs, o: PreferenceSection):
    """SLiC hinge: relu(1 - beta h)."""
    return jax.nn.relu(1 - o.beta * _margin(p))


def ipo(p: Pairs, o: PreferenceSection):
    """IPO: (h - 1 / (2 beta))^2 with h from length-averaged log-probs."""
    h = (_mean(p.chosen_logps - p.ref_chosen_logps, p.chosen_lengths)
         - _mean(p.rejected_logps - p.ref_rejected_logps, p.rejected_lengths))
    return (h - 1 / (2 * o.beta)) ** 2


def simpo(p: Pairs, o: PreferenceSection):
    """SimPO (no reference): -log sigma(beta/|y_w| logp(y_w) - beta/|y_l| logp(y_l) - gamma); smoothing as cDPO."""
    x = o.beta * (_mean(p.chosen_logps, p.chosen_lengths) - _mean(p.rejected_logps, p.rejected_lengths)) - o.gamma
    return _smoothed(x, o.label_smoothing)


def sft(p: Pairs, o: PreferenceSection):
    """The chosen response's length-averaged negative log-likelihood."""
    return -_mean(p.chosen_logps, p.chosen_lengths)


def orpo(p: Pairs, o: PreferenceSection):
    """ORPO (no reference): NLL(y_w) + lambda * -log sigma(log odds(y_w) - log odds(y_l)), on averaged log-probs."""
    lw, ll = _mean(p.chosen_logps, p.chosen_lengths), _mean(p.rejected_logps, p.rejected_lengths)
    log_odds = (lw - log1mexp(lw)) - (ll - log1mexp(ll))
    return -lw - o.lambda_ * jax.nn.log_sigmoid(log_odds)


PAIR_LOSSES: dict[str, Callable[[Pairs, PreferenceSection], jax.Array]] = {
    "sigmoid": sigmoid, "robust": robust, "hinge": hinge, "ipo": ipo, "simpo": simpo, "orpo": orpo, "sft": sft}


def kto(logps, ref_logps, kl_logps, ref_kl_logps, desirable, valid, o: PreferenceSection):
    """KTO per example [U]: r = logp - logp_ref; z0 = max(0, mean of the mismatched pairs' r), no gradient;
    desirable: lambda_D (1 - sigma(beta (r - z0))), undesirable: lambda_U (1 - sigma(beta (z0 - r)))."""
    kl = jnp.sum(jnp.where(valid, kl_logps - ref_kl_logps, 0.0)) / jnp.maximum(valid.sum(), 1)
    z0 = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    r = logps - ref_logps
    return jnp.where(desirable, o.desirable_weight * (1 - jax.nn.sigmoid(o.beta * (r - z0))),
                     o.undesirable_weight * (1 - jax.nn.sigmoid(o.beta * (z0 - r)))), z0


def uses_reference(options: PreferenceSection) -> bool:
    """Whether any configured loss compares with a reference model."""
    return any(name in NEEDS_REFERENCE for name, _ in options.losses)


# ----------------------------------------------------------------------------- batches -> per-sequence sums


def unit_sums(values, segment_ids, units: int):
    """(first, second) sums [R, units] over each unit's two sequences (segments 2u-1, 2u) of values [R, N] by
    their segment ids [R, N]."""
    sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=2 * units + 1))(values, segment_ids)
    return sums[:, 1::2], sums[:, 2::2]


def max_units(batch: dict) -> int:
    """Units a row can hold: each has two sequences of at least two tokens."""
    return batch["segment_ids"].shape[1] // 4 + 1


def sequence_logps(config: ModelConfig, params: dict, batch: dict, rng=None):
    """(logps, lengths), each a (first, second) pair of [R, U] arrays: each unit's two responses scored."""
    mask = target_mask(batch).astype(jnp.float32)
    logp = sequence_logprobs(config, params, batch, rng) * mask
    targets, units = batch["segment_ids"][:, 1:], max_units(batch)  # the segment of each target token
    return unit_sums(logp, targets, units), unit_sums(mask, targets, units)


def sequence_values(batch: dict, key: str):
    """(first, second) [R, U]: a per-sequence value of batch[key] (stored on the sequence's first token)."""
    return unit_sums(batch[key].astype(jnp.float32), batch["segment_ids"], max_units(batch))


def reference_logps(config: ModelConfig, frozen: dict, batch: dict):
    """Reference (first, second) log-probs [R, U]: precomputed ones from the batch, else the frozen params'."""
    if "ref_logps" in batch:
        return sequence_values(batch, "ref_logps")
    logps, _ = sequence_logps(config, frozen, batch)
    return jax.tree.map(jax.lax.stop_gradient, logps)


def preference_loss(config: ModelConfig, model_params: Callable[[dict, dict], dict], options: PreferenceSection):
    """The loss_fn for make_train_step: (sum over units, units, metrics), for the paired losses or KTO.

    The reference is batch["ref_logps"] when precomputed, else the model with the `frozen` params (LoRA: the base
    with adapters off; full fine-tuning: a frozen copy). Losses without a reference never run one.
    """
    with_reference = uses_reference(options)

    def loss_fn(params, frozen, batch, rng):
        (first, second), (first_len, second_len) = sequence_logps(config, model_params(params, frozen), batch, rng)
        valid = (first_len > 0) & (second_len > 0)
        if with_reference:
            ref_first, ref_second = reference_logps(config, frozen, batch)
        else:
            ref_first = ref_second = jnp.zeros_like(first)
        if options.losses[0][0] == "kto":
            return _kto_terms(first, second, ref_first, ref_second, valid, batch, options)
        pairs = Pairs(first, second, first_len, second_len, ref_first, ref_second)
        losses = sum(weight * PAIR_LOSSES[name](pairs, options) for name, weight in options.losses)
        return masked_sum(losses, valid), valid.sum().astype(jnp.float32), _pair_metrics(pairs, valid, options)

    return loss_fn


def masked_sum(x, valid):
    """The sum of x where valid."""
    return jnp.sum(jnp.where(valid, x, 0.0))


def _pair_metrics(p: Pairs, valid, o: PreferenceSection) -> dict:
    """TRL's reward metrics: implicit rewards beta (logp - logp_ref), or beta * mean logp without a reference."""
    if uses_reference(o):
        chosen, rejected = o.beta * (p.chosen_logps - p.ref_chosen_logps), o.beta * (
            p.rejected_logps - p.ref_rejected_logps)
    else:
        chosen, rejected = o.beta * _mean(p.chosen_logps, p.chosen_lengths), o.beta * _mean(
            p.rejected_logps, p.rejected_lengths)
    n = valid.sum().astype(jnp.float32)
    per_pair = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                "rewards/accuracies": (chosen > rejected).astype(jnp.float32), "logps/chosen": p.chosen_logps,
                "logps/rejected": p.rejected_logps}
    return {k: (masked_sum(v, valid), n) for k, v in per_pair.items()}


def _kto_terms(logps, kl_logps, ref, ref_kl, valid, batch, o: PreferenceSection):
    desirable = sequence_values(batch, "label")[0] > 0
    losses, z0 = kto(logps, ref, kl_logps, ref_kl, desirable, valid, o)
    rewards = o.beta * (logps - ref)
    good, bad = valid & desirable, valid & ~desirable
    metrics = {"rewards/chosen": (masked_sum(rewards, good), good.sum().astype(jnp.float32)),
               "rewards/rejected": (masked_sum(rewards, bad), bad.sum().astype(jnp.float32)),
               "kl": (z0, jnp.float32(1.0))}
    return masked_sum(losses, valid), valid.sum().astype(jnp.float32), metrics
