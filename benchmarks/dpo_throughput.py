"""Steady-state DPO (sigmoid) train-step throughput (pairs/s) and memory: the reference run on the fly (a frozen copy
of the params, one reference forward per step) vs precomputed (the batch carries `ref_logps`), and one forward over
rows packing each pair as two segments of one unit (what polm does) vs two forwards, chosen and rejected apart.

    python benchmarks/dpo_throughput.py [--presets tiny-llama qwen2.5-0.5b] [--steps N] [--warmup N] [--dtype auto]

Full fine-tuning, AdamW, the library's step (Session, make_train_step, init_state), compiled ahead of time; the
packed variants use the library's `preference_loss`, the two-forward ones a loss built here from the same public
pieces. Every variant gets the same synthetic pairs (random ids: a shared prompt, then a chosen or rejected
response; every slot a real token) already on the devices; precomputed reference log-probs are those of the initial
params. Each variant's first step runs (untimed) from the same initial state, so their `first_step` loss and
grad_norm must agree. Then the variants take turns, one step each per round (a shared host's bursts hit all of
them alike); the first --warmup rounds are not timed, the figure is each variant's median step.
--dtype auto: bfloat16 compute on GPU/TPU, float32 on CPU. The qwen2.5-0.5b preset runs with 4 of its 24 layers.
"""

import argparse
import dataclasses
import os
import resource
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from common import emit
from sft_throughput import compiled_bytes

from polm_jax import parallel
from polm_jax.algorithms.preference import (
    Pairs,
    preference_loss,
    reference_logps,
    sequence_logps,
    sigmoid,
)
from polm_jax.config import Config, PreferenceSection
from polm_jax.models.config import ModelConfig
from polm_jax.train import step as step_lib
from polm_jax.train.session import Session
from polm_jax.train.state import init_state


@dataclasses.dataclass
class Shape:
    """A preset's benchmark size: `units` pairs per row, each sequence a prompt then a response."""

    rows: int
    units: int
    prompt_len: int
    response_len: int
    num_layers: int | None = None  # fewer layers than the preset, to fit a 2-core CPU
    warmup: int = 2
    steps: int = 10


SHAPES = {"tiny-llama": Shape(rows=8, units=2, prompt_len=40, response_len=24),
          "qwen2.5-0.5b": Shape(rows=2, units=1, prompt_len=40, response_len=24, num_layers=4, warmup=0, steps=2)}
SIDES = ("chosen", "rejected")


def pair_batch(rng: np.random.Generator, shape: Shape, vocab: int) -> dict:
    """Packed preference rows [rows, units * 2 * seq]: unit u's chosen sequence is segment 2u-1, its rejected one
    segment 2u (polm_jax.data.preference's layout); both share the prompt, the loss covers the responses."""
    r, u, p, n = shape.rows, shape.units, shape.prompt_len, shape.prompt_len + shape.response_len
    tokens = rng.integers(0, vocab, (r, u, 2, n), dtype=np.int32)
    tokens[:, :, 1, :p] = tokens[:, :, 0, :p]  # one prompt per pair
    segment = 2 * np.arange(u)[:, None] + np.arange(1, 3)[None, :]  # [u, 2]: 2u-1, 2u (u from 1)
    full = (r, u, 2, n)
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(n, dtype=np.int32), full),
             "segment_ids": np.broadcast_to(segment[None, :, :, None].astype(np.int32), full),
             "loss_mask": np.broadcast_to((np.arange(n) >= p).astype(np.int32), full)}
    return {k: np.ascontiguousarray(v).reshape(r, u * 2 * n) for k, v in batch.items()}


def with_ref_logps(batch: dict, first, second) -> dict:
    """The packed batch plus `ref_logps`: each sequence's reference log-prob ([rows, units] each) on its first token."""
    r, length = batch["tokens"].shape
    per_unit = np.stack([np.asarray(first), np.asarray(second)], axis=-1)  # [r, u, 2]
    ref = np.zeros((r, per_unit.shape[1], 2, length // (2 * per_unit.shape[1])), np.float32)
    ref[..., 0] = per_unit
    return {**batch, "ref_logps": ref.reshape(r, length)}


def split_batch(batch: dict, units: int) -> dict:
    """A packed batch -> `chosen_*` and `rejected_*` rows of half the length, the same sequences with the same
    segment ids (2u-1 chosen, 2u rejected), so `sequence_logps` reads each half's pairs."""
    r, length = batch["tokens"].shape
    out = {}
    for k, v in batch.items():
        sides = v.reshape(r, units, 2, length // (2 * units))
        for i, side in enumerate(SIDES):
            out[f"{side}_{k}"] = np.ascontiguousarray(sides[:, :, i]).reshape(r, length // 2)
    return out


def two_forward_loss(config: ModelConfig, model_params: Callable[[dict, dict], dict],
                     options: PreferenceSection) -> step_lib.LossFn:
    """DPO sigmoid over `chosen_*` and `rejected_*` batches scored by two forwards: (loss sum, pairs, {})."""

    def loss_fn(params, frozen, batch, rng):
        chosen, rejected = ({k.removeprefix(f"{s}_"): v for k, v in batch.items() if k.startswith(f"{s}_")}
                            for s in SIDES)
        model = model_params(params, frozen)
        (logp_w, _), (len_w, _) = sequence_logps(config, model, chosen, rng)
        (_, logp_l), (_, len_l) = sequence_logps(config, model, rejected, rng)
        ref_w, ref_l = reference_logps(config, frozen, chosen)[0], reference_logps(config, frozen, rejected)[1]
        valid = (len_w > 0) & (len_l > 0)
        losses = sigmoid(Pairs(logp_w, logp_l, len_w, len_l, ref_w, ref_l), options)
        return jnp.where(valid, losses, 0.0).sum(), valid.sum().astype(jnp.float32), {}

    return loss_fn


def make_config(preset: str, shape: Shape, dtype: str) -> Config:
    """Full fine-tuning DPO (sigmoid, beta 0.1) of `preset` at `shape`: f32 params, AdamW at a constant 5e-6."""
    cfg = Config()
    cfg.model.preset, cfg.model.dtype, cfg.model.param_dtype = preset, dtype, "float32"
    if shape.num_layers:
        cfg.model.overrides = {"num_layers": shape.num_layers}
    cfg.data.tokenizer = "bytes"
    cfg.train.batch_size = shape.rows
    cfg.optim.lr, cfg.optim.schedule = 5e-6, "constant"
    cfg.preference.loss_type, cfg.preference.beta = "sigmoid", 0.1
    return cfg


@dataclasses.dataclass
class Variant:
    """One way to run the DPO step: its compiled step, the frozen params and device batches it reads, its times."""

    reference: str  # on_the_fly | precomputed
    forward: str  # one_packed | two_separate
    compiled: object
    frozen: dict
    batches: list
    compile_s: float
    first_step: dict  # loss and grad_norm of a step from the initial state
    times: list = dataclasses.field(default_factory=list)


def compile_variant(session: Session, loss_fn: step_lib.LossFn, host: list[dict], initial, *, reference: str,
                    forward: str) -> tuple[Variant, object]:
    """The library's train step with `loss_fn`, compiled ahead of time for `host`'s shapes, then run once (untimed)
    on a copy of the `initial` state, so every variant's first step starts from the same params; and the state
    that step returns."""
    shardings = session.batch_shardings(host[0])
    on_the_fly = reference == "on_the_fly"
    frozen = session.frozen if on_the_fly else {}
    step = step_lib.make_train_step(loss_fn, session.optimizer, state_shardings=session.state_shardings(),
                                    frozen_shardings=session.frozen_shardings if on_the_fly else None,
                                    batch_shardings=shardings, microbatch_shardings=shardings)
    batches = [session.put_batch(b) for b in host]  # on the devices before timing
    t0 = time.perf_counter()
    with parallel.activation_sharding(session.mesh, session.cfg.mesh.rules):
        compiled = step.lower(initial, frozen, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(jax.tree.map(jnp.copy, initial), frozen, batches[0])  # the step donates its state
    first = {k: round(float(metrics[k]), 6) for k in ("loss", "grad_norm")}
    return Variant(reference, forward, compiled, frozen, batches, compile_s, first), state


def time_round_robin(variants: list[Variant], state, warmup: int, steps: int) -> None:
    """Times `steps` rounds (after `warmup` untimed ones) of one step of each variant in turn, each step alone, one
    state passed along (all variants share its shapes); interleaving spreads a shared host's bursts over all."""
    for i in range(warmup + steps):
        for v in variants:
            t0 = time.perf_counter()
            state, metrics = v.compiled(state, v.frozen, v.batches[i % len(v.batches)])
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                v.times.append(time.perf_counter() - t0)


def bench_preset(preset: str, shape: Shape, dtype: str) -> None:
    """Times and sizes the four variants of `preset`'s DPO step, one JSON line per figure."""
    load = round(os.getloadavg()[0], 2)  # CPU figures are only as good as the host is quiet
    session = Session.create(make_config(preset, shape, dtype), reference=True)
    config, options = session.model.config, session.cfg.preference
    rng = np.random.default_rng(0)
    packed = [pair_batch(rng, shape, config.vocab_size) for _ in range(2)]
    score = jax.jit(lambda params, batch: sequence_logps(config, params, batch)[0])
    precomputed = [with_ref_logps(b, *(x[:, :shape.units] for x in score(session.frozen, session.put_batch(b))))
                   for b in packed]
    layouts = {"one_packed": lambda b: b, "two_separate": lambda b: split_batch(b, shape.units)}
    losses = {"one_packed": preference_loss(config, session.model_params, options),
              "two_separate": two_forward_loss(config, session.model_params, options)}
    initial = init_state(session.trainable, session.optimizer, session.cfg.seed, session.state_shardings())
    variants, state = [], None
    for reference, hosts in (("on_the_fly", packed), ("precomputed", precomputed)):
        for forward, layout in layouts.items():
            state = None  # the previous variant's state goes before the next first step makes one
            variant, state = compile_variant(session, losses[forward], [layout(b) for b in hosts], initial,
                                             reference=reference, forward=forward)
            variants.append(variant)
    del initial  # the timed steps carry on from the last variant's first step
    time_round_robin(variants, state, shape.warmup, shape.steps)
    load_after = round(os.getloadavg()[0], 2)
    pairs, row_tokens = shape.rows * shape.units, shape.units * 2 * (shape.prompt_len + shape.response_len)
    for v in variants:
        details = {"preset": preset, "num_layers": config.num_layers, "reference": v.reference, "forward": v.forward,
                   "tuning": "full", "rows": shape.rows, "pairs_per_step": pairs, "row_tokens": row_tokens,
                   "prompt_len": shape.prompt_len, "response_len": shape.response_len, "dtype": dtype,
                   "devices": jax.device_count(), "load_avg_1m_at_start": load, "load_avg_1m_at_end": load_after}
        seconds = float(np.median(v.times))
        emit("dpo_pairs_per_s", pairs / seconds, "pairs/s", step_s=round(seconds, 4), timing="median step, "
             "variants interleaved", steps=shape.steps, min_s=round(min(v.times), 4), max_s=round(max(v.times), 4),
             compile_s=round(v.compile_s, 2), first_step=v.first_step, **details)
        estimate = compiled_bytes(v.compiled)
        if estimate is not None:
            emit("dpo_step_memory_gib", estimate / 2**30, "GiB",
                 source="compiled.memory_analysis(): argument + output - alias + temp, per device", **details)
    if jax.devices()[0].platform == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        emit("dpo_max_rss_gib", rss / 2**30, "GiB", preset=preset,
             source="resource.getrusage ru_maxrss: the whole process so far (this preset's four variants and any "
                    "preset before it)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, help="timed steps (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed steps after compilation (default: the preset's)")
    parser.add_argument("--dtype", default="auto", help="compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    dtype = args.dtype if args.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
    for preset in args.presets:
        shape = SHAPES[preset]
        steps = shape.steps if args.steps is None else args.steps
        warmup = shape.warmup if args.warmup is None else args.warmup
        bench_preset(preset, dataclasses.replace(shape, steps=steps, warmup=warmup), dtype)


if __name__ == "__main__":
    main()
