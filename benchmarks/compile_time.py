"""Compile time of a jitted forward+backward at 4 and at 32 layers: scanned layers keep the ratio near 1.

    python benchmarks/compile_time.py [--preset qwen3-0.6b] [--seq-len 512]
"""

import argparse
import time

import jax
import jax.numpy as jnp
from common import emit

import polm_jax as pj
from polm_jax.models.transformer import param_shapes


def compile_seconds(config, batch: int, length: int) -> float:
    """Seconds to lower and compile value_and_grad of the mean log-sum-exp of the logits (nothing is run)."""
    def loss(params, tokens):
        return jnp.mean(jax.nn.logsumexp(pj.forward(config, params, tokens), -1))

    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    t0 = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(param_shapes(config), tokens).compile()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()
    seconds = {}
    for layers in (4, 32):
        config = pj.get_preset(args.preset, num_layers=layers, remat=args.remat)
        seconds[layers] = compile_seconds(config, 1, args.seq_len)
        emit("compile_forward_backward", seconds[layers], "s", preset=args.preset, layers=layers, remat=args.remat)
    emit("compile_ratio_32_over_4_layers", seconds[32] / seconds[4], "x", preset=args.preset, remat=args.remat)


if __name__ == "__main__":
    main()
