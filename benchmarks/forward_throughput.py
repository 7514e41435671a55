"""Forward tokens/s (jitted, after compilation) of the tiny preset and a small real one on this machine.

    python benchmarks/forward_throughput.py [--presets tiny-llama qwen2.5-0.5b] [--batch 4] [--seq-len 256]
"""

import argparse
import time

import jax
import numpy as np
from common import emit

import polm_jax as pj


def tokens_per_second(model, batch: int, length: int, repeats: int) -> float:
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, length), dtype=np.int32)
    jax.block_until_ready(pj.forward(model.config, model.params, tokens))  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(pj.forward(model.config, model.params, tokens))
    return batch * length * repeats / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny-llama", "qwen2.5-0.5b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    for preset in args.presets:
        model = pj.init(preset, dtype=args.dtype, param_dtype=args.dtype)
        rate = tokens_per_second(model, args.batch, args.seq_len, args.repeats)
        emit("forward_tokens_per_s", rate, "tokens/s", preset=preset, batch=args.batch, seq_len=args.seq_len,
             dtype=args.dtype, params_m=round(model.config.num_params() / 1e6, 1))


if __name__ == "__main__":
    main()
