"""Sampler throughput: prefill tokens/s, KV-cache decode tokens/s, and a no-cache baseline that re-runs the full
forward for every new token; on a GPU also the decode step time against the memory-bandwidth bound.

    python benchmarks/decode_throughput.py [--presets tiny-llama qwen2.5-0.5b] [--batch 8] [--prompt-len 64]
                                           [--new-tokens 32] [--dtype float32]
    python benchmarks/decode_throughput.py --gpu-preset llama3.2-1b --gpu-batch 64   # GPU only

Decode runs every row to max_new_tokens (EOS ids cleared). The baseline keeps one compiled shape: each step runs
the forward over [batch, prompt + new tokens], the not yet generated slots masked as padding, and takes the argmax.
The bandwidth bound is (bytes of params + the whole KV cache, read once per step) / (measured copy bandwidth).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import emit

import polm_jax as pj
from polm_jax.sampling.engine import make_engine
from polm_jax.sampling.generate import place_prompts
from polm_jax.sampling.params import SamplingParams


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (blocked until ready) after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _setup(preset: str, batch: int, prompt_len: int, new: int, dtype: str):
    model = pj.init(preset, dtype=dtype, param_dtype=dtype, eos_token_id=None)  # no early stop
    sampling = SamplingParams(max_new_tokens=new, temperature=0.0)
    prompts = np.random.default_rng(0).integers(3, model.config.vocab_size, (batch, prompt_len)).tolist()
    tokens, lengths = place_prompts(prompts, model.config, sampling)
    return model, make_engine(model.config, sampling), tokens, lengths


def measure_cpu(preset: str, batch: int, prompt_len: int, new: int, dtype: str, repeats: int) -> None:
    model, engine, tokens, lengths = _setup(preset, batch, prompt_len, new, dtype)
    params, key = model.params, jax.random.key(0)
    rows, width = tokens.shape  # the buckets actually run
    prefill_s = _timed(lambda: engine.prefill(params, tokens, lengths, key), repeats)
    state = engine.prefill(params, tokens, lengths, key)
    decode_s = _timed(lambda: engine.decode(params, state, new), repeats)
    details = {"preset": preset, "batch": batch, "rows_run": rows, "prompt_len": prompt_len, "new_tokens": new,
               "dtype": dtype, "load_avg_1m": round(os.getloadavg()[0], 2)}  # the host may be shared
    emit("prefill_tokens_per_s", batch * prompt_len / prefill_s, "tokens/s", **details)
    decode_rate = batch * (new - 1) / decode_s  # column 0 comes from the prefill
    emit("decode_tokens_per_s", decode_rate, "tokens/s", step_ms=round(decode_s / (new - 1) * 1e3, 3), **details)

    full = np.zeros((rows, width + new), np.int32)
    full[:, :width] = np.asarray(tokens)
    segments = (full > 0).astype(np.int32)
    segments[:, width:] = 0

    def no_cache_step():
        return jnp.argmax(pj.forward(model.config, params, full, segment_ids=segments)[:, width - 1], -1)

    baseline_rate = batch / _timed(no_cache_step, repeats)  # one new token per row per full forward
    emit("nocache_decode_tokens_per_s", baseline_rate, "tokens/s", speedup_of_cache=round(decode_rate / baseline_rate, 2),
         **details)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * nbytes / _timed(lambda: copy(x), 10)


def measure_gpu(preset: str, batch: int, prompt_len: int, new: int, repeats: int) -> None:
    model, engine, tokens, lengths = _setup(preset, batch, prompt_len, new, "bfloat16")
    params, key = model.params, jax.random.key(0)
    state = engine.prefill(params, tokens, lengths, key)
    step_s = _timed(lambda: engine.decode(params, state, new), repeats) / (new - 1)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    cache_bytes = state.cache["k"].nbytes + state.cache["v"].nbytes
    bound_s = (param_bytes + cache_bytes) / copy_bandwidth()
    emit("gpu_decode_step_ms", step_s * 1e3, "ms", bound_ms=round(bound_s * 1e3, 4),
         fraction_of_bound=round(bound_s / step_s, 3), param_bytes=param_bytes, cache_bytes=cache_bytes,
         preset=preset, batch=batch, prompt_len=prompt_len, new_tokens=new, dtype="bfloat16")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny-llama", "qwen2.5-0.5b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-preset", default="llama3.2-1b")
    parser.add_argument("--gpu-batch", type=int, default=64)
    args = parser.parse_args()
    if jax.devices()[0].platform == "gpu":
        measure_gpu(args.gpu_preset, args.gpu_batch, 128, 128, args.repeats)
        return
    for preset in args.presets:
        measure_cpu(preset, args.batch, args.prompt_len, args.new_tokens, args.dtype, args.repeats)


if __name__ == "__main__":
    main()
