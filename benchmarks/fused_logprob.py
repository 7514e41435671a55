"""Fused per-token log-probs: memory and time of value-and-grad against the materialised reference.

    python benchmarks/fused_logprob.py [--n 8192] [--hidden 1024] [--vocab 151936] [--time-n 1024] [--repeats 2]

CPU (or any backend): the compiled temporary memory of jit(value_and_grad) of sum(logp * upstream) at n x hidden
x vocab, f32, for the reference (materialised [N, V] logits), xla_chunked and the TPU kernel in interpret mode
(an XLA loop over the kernel's grid: what runs on CPU, not the TPU's memory); then seconds per call at --time-n
rows (the reference's logits, their softmax and gradient need ~3 x 4·N·V bytes, so N is shrunk on small hosts).
On a Hopper-or-newer GPU: the bf16 matmul rate, then for N in 8192, 32768 and H in 2048, 4096 (V = --vocab,
bf16) TFLOP/s of forward+backward counted as 6·N·H·V FLOPs, its share of the matmul rate, and time against the
reference.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from common import emit

from pallas_kernels import fused_logprob
from pallas_kernels.fused_logprob import resolve_impl


def value_and_grad(impl: str):
    """jit(value_and_grad) of sum(logp * upstream) over (hidden, lm_head) through `impl`."""
    interpret = impl == "tpu" and jax.default_backend() != "tpu"

    def loss(hidden, lm_head, targets, upstream):
        return (fused_logprob(hidden, lm_head, targets, impl=impl, interpret=interpret) * upstream).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def shapes(n: int, h: int, v: int, dtype):
    return (jax.ShapeDtypeStruct((n, h), dtype), jax.ShapeDtypeStruct((h, v), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))


def inputs(n: int, h: int, v: int, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(keys[0], (n, h), dtype), (jax.random.normal(keys[1], (h, v)) * h ** -0.5).astype(dtype),
            jax.random.randint(keys[2], (n,), 0, v), jax.random.normal(keys[3], (n,)))


def temp_bytes(impl: str, n: int, h: int, v: int, dtype) -> int:
    """Temporary bytes of the compiled value-and-grad (arguments and outputs not counted); nothing runs."""
    return value_and_grad(impl).lower(*shapes(n, h, v, dtype)).compile().memory_analysis().temp_size_in_bytes


def seconds(impl: str, n: int, h: int, v: int, dtype, repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls, after one call that compiles and warms up."""
    fn, args = value_and_grad(impl), inputs(n, h, v, dtype)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 [size, size] @ [size, size] rate (f32 accumulation), TFLOP/s."""
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(mm(a, a))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = mm(a, a)
    jax.block_until_ready(out)
    return 2 * size ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def cpu_figures(args):
    shape = {"n": args.n, "hidden": args.hidden, "vocab": args.vocab, "dtype": "float32"}
    temps = {impl: temp_bytes(impl, args.n, args.hidden, args.vocab, jnp.float32)
             for impl in ("reference", "xla_chunked", "tpu")}
    for impl, size in temps.items():
        emit("logprob_value_and_grad_temp_memory", size / 2**20, "MiB", impl=impl + ("_interpret" if impl == "tpu"
                                                                                      else ""), **shape)
    for impl in ("xla_chunked", "tpu"):
        emit("logprob_temp_memory_reduction", temps["reference"] / temps[impl], "x", impl=impl, **shape)
    timed = {**shape, "n": args.time_n, "repeats": args.repeats}
    times = {impl: seconds(impl, args.time_n, args.hidden, args.vocab, jnp.float32, args.repeats)
             for impl in ("reference", "xla_chunked")}
    for impl, run in times.items():
        emit("logprob_value_and_grad_time", min(run), "s", impl=impl, runs=[round(t, 3) for t in run], **timed)
    emit("logprob_time_over_reference", min(times["xla_chunked"]) / min(times["reference"]), "x",
         impl="xla_chunked", **timed)


def gpu_figures(args):
    peak = matmul_tflops()
    emit("bf16_matmul_rate", peak, "TFLOP/s", size=8192)
    for n in (8192, 32768):
        for h in (2048, 4096):
            shape = {"n": n, "hidden": h, "vocab": args.vocab, "dtype": "bfloat16"}
            runs = {impl: min(seconds(impl, n, h, args.vocab, jnp.bfloat16, args.repeats))
                    for impl in ("gpu", "xla_chunked", "reference")}
            for impl, run in runs.items():
                rate = 6 * n * h * args.vocab / run / 1e12
                emit("logprob_forward_backward_rate", rate, "TFLOP/s", impl=impl, seconds=round(run, 5), **shape)
                emit("logprob_share_of_matmul_rate", rate / peak, "fraction", impl=impl, **shape)
            emit("logprob_time_over_reference", runs["gpu"] / runs["reference"], "x", impl="gpu", **shape)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--time-n", type=int, default=1024, help="rows for the CPU timing")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if resolve_impl("auto") == "gpu":
        gpu_figures(args)
    else:
        cpu_figures(args)


if __name__ == "__main__":
    main()
