"""Steady-state SFT train-step throughput (tokens/s, MFU), compile time and peak memory of one preset on this machine.

    python benchmarks/sft_throughput.py [--preset tiny-llama] [--seq-len 256] [--batch 8] [--steps 10]
        [--lora-rank 0] [--dtype auto] [--remat none] [--microbatches 1]

The step is the library's own (Session -> sft_loss -> make_train_step, state from init_state, the batch sharded
over a mesh of all local devices), compiled ahead of time and fed synthetic batches already on the devices: random
ids in fully packed rows of a few segments, so data loading is not measured. The first --warmup steps are not timed.
--dtype auto: bfloat16 compute on GPU/TPU, float32 on CPU; params stay float32.
"""

import argparse
import os
import resource
import time

import jax
import numpy as np
from common import emit

from polm_jax import parallel
from polm_jax.algorithms.sft import sft_loss
from polm_jax.config import Config
from polm_jax.train import step as step_lib
from polm_jax.train.metrics import flops_per_token, peak_flops
from polm_jax.train.session import Session
from polm_jax.train.state import init_state


def packed_batch(rng: np.random.Generator, rows: int, length: int, vocab: int, segments: int) -> dict:
    """[rows, length] int32 BATCH_KEYS: random ids, every slot used, each row cut into `segments` examples."""
    batch = {"tokens": rng.integers(0, vocab, (rows, length), dtype=np.int32),
             "positions": np.zeros((rows, length), np.int32), "segment_ids": np.zeros((rows, length), np.int32),
             "loss_mask": np.ones((rows, length), np.int32)}
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, length), segments - 1, replace=False)) if segments > 1 else []
        for s, (a, b) in enumerate(zip([0, *cuts], [*cuts, length]), 1):
            batch["positions"][r, a:b], batch["segment_ids"][r, a:b] = np.arange(b - a), s
    return batch


def make_config(args, dtype: str) -> Config:
    cfg = Config()
    cfg.model.preset, cfg.model.dtype, cfg.model.param_dtype = args.preset, dtype, args.param_dtype
    cfg.model.remat = args.remat
    cfg.data.tokenizer, cfg.data.max_length = "bytes", args.seq_len
    cfg.lora.rank = args.lora_rank
    cfg.train.batch_size, cfg.train.microbatches = args.batch, args.microbatches
    cfg.train.steps = args.warmup + args.steps
    cfg.optim.warmup_steps = 0
    return cfg


def compiled_bytes(compiled) -> int | None:
    """Arguments + outputs - donated aliases + temporaries of a compiled step (XLA's estimate), if available."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):  # none on this backend / version
        return None


def compiled_step(session: Session, host: dict, microbatches: int):
    """The library's SFT train step for `session`, lowered for `host`'s shapes and compiled; and the compile time."""
    cfg, (rows, length) = session.cfg, host["tokens"].shape
    micro = {k: parallel.batch_sharding((rows // microbatches, length), session.mesh, cfg.mesh.rules) for k in host}
    train_step = step_lib.make_train_step(sft_loss(session.model.config, session.model_params), session.optimizer,
                                          state_shardings=session.state_shardings(),
                                          frozen_shardings=session.frozen_shardings or None,
                                          batch_shardings=session.batch_shardings(host), microbatch_shardings=micro,
                                          microbatches=microbatches)
    state = init_state(session.trainable, session.optimizer, cfg.seed, session.state_shardings())
    t0 = time.perf_counter()
    compiled = train_step.lower(state, session.frozen, session.put_batch(host)).compile()
    return compiled, state, time.perf_counter() - t0


def step_seconds(compiled, state, frozen, batches: list, warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each of `steps` steps after `warmup` untimed ones, each timed alone (the median then resists
    other processes' bursts on a shared host); and the last loss."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return times[warmup:], float(metrics["loss"])


def report_memory(compiled, platform: str, details: dict) -> None:
    """Peak memory: the devices' own counter (GPU/TPU), XLA's estimate for the step, and the process's max RSS (CPU)."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    if all("peak_bytes_in_use" in s for s in stats):
        emit("sft_peak_memory_gib", max(s["peak_bytes_in_use"] for s in stats) / 2**30, "GiB",
             source="device.memory_stats()['peak_bytes_in_use'], max over local devices", **details)
    estimate = compiled_bytes(compiled)
    if estimate is not None:
        emit("sft_step_memory_gib", estimate / 2**30, "GiB",
             source="compiled.memory_analysis(): argument + output - alias + temp, per device", **details)
    if platform == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        emit("sft_max_rss_gib", rss / 2**30, "GiB", source="resource.getrusage ru_maxrss (whole process)", **details)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--segments", type=int, default=4, help="examples packed per row")
    args = parser.parse_args()

    load = round(os.getloadavg()[0], 2)  # CPU figures are only as good as the host is quiet
    platform = jax.devices()[0].platform
    dtype = args.dtype if args.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
    session = Session.create(make_config(args, dtype))
    config = session.model.config
    rng = np.random.default_rng(0)
    host = [packed_batch(rng, args.batch, args.seq_len, config.vocab_size, args.segments) for _ in range(2)]
    compiled, state, compile_s = compiled_step(session, host[0], args.microbatches)
    batches = [session.put_batch(b) for b in host]  # on the devices before timing
    times, loss = step_seconds(compiled, state, session.frozen, batches, args.warmup, args.steps)
    seconds, tokens = float(np.median(times)), args.batch * args.seq_len  # every slot is a real token

    n_dev = jax.device_count()
    trainable = sum(x.size for x in jax.tree.leaves(session.trainable))
    details = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "lora_rank": args.lora_rank,
               "dtype": dtype, "param_dtype": args.param_dtype, "remat": args.remat,
               "microbatches": args.microbatches, "devices": n_dev, "params_m": round(config.num_params() / 1e6, 2),
               "trainable_m": round(trainable / 1e6, 3), "load_avg_1m_at_start": load}
    emit("sft_compile_s", compile_s, "s", **details)
    emit("sft_step_s", seconds, "s", steps=args.steps, timing="median step", mean_s=round(float(np.mean(times)), 4),
         min_s=round(min(times), 4), max_s=round(max(times), 4), loss=round(loss, 4), **details)
    emit("sft_tokens_per_s", tokens / seconds, "tokens/s", timing="median step", **details)
    model_flops = flops_per_token(config, args.seq_len, weight_grads=not args.lora_rank) * tokens / seconds
    emit("sft_model_tflops_per_s", model_flops / 1e12, "TFLOP/s", **details)
    peak = peak_flops()
    if peak:
        emit("sft_mfu", model_flops / (peak * n_dev), "fraction", peak_flops_per_device=peak, **details)
    report_memory(compiled, platform, details)


if __name__ == "__main__":
    main()
