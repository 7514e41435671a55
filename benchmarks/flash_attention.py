"""Flash attention: compiled temporary memory of forward+backward against the reference (any device), and on a GPU
TFLOP/s of forward and forward+backward against jax.nn.dot_product_attention (XLA and cuDNN).

    python benchmarks/flash_attention.py [--seq-len 8192] [--batch 1] [--heads 8] [--head-dim 128] [--dtype bfloat16]

Off TPU/GPU the kernel figure is the Pallas TPU kernel compiled in interpret mode (an XLA loop over its grid),
which is what runs on CPU; the reference materialises the [B, H, T, S] scores.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import emit

from pallas_kernels import flash_attention

GPU_SEQ_LENS = (2048, 4096, 8192)
GPU_TOKENS = 16_384  # batch = GPU_TOKENS // T at each length


def _inputs(batch, seq_len, heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (batch, seq_len, heads, head_dim), jnp.float32).astype(dtype) for key in keys]


def _forward_backward(attend):
    """(q, k, v) -> (dq, dk, dv) of the sum of the attention output."""
    return jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def temp_memory(attend, args) -> int:
    """Compiled temporary bytes of forward+backward of `attend` (compiled, not run)."""
    compiled = jax.jit(_forward_backward(attend)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_figures(batch, seq_len, heads, head_dim, dtype):
    """Prints the temporary memory of forward+backward: kernel, reference, and their ratio."""
    shapes = [jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype)] * 3
    on_accelerator = jax.default_backend() in ("tpu", "gpu")
    kernel = lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=not on_accelerator)
    reference = lambda q, k, v: flash_attention(q, k, v, causal=True, impl="reference")
    details = {"batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim, "dtype": jnp.dtype(dtype).name,
                   "causal": True}
    kernel_name = "flash (auto)" if on_accelerator else "flash (TPU kernel, interpret mode)"
    kernel_bytes, reference_bytes = temp_memory(kernel, shapes), temp_memory(reference, shapes)
    emit("flash_attention_fwd_bwd_temp_memory", kernel_bytes / 2**20, "MiB", impl=kernel_name, **details)
    emit("flash_attention_fwd_bwd_temp_memory", reference_bytes / 2**20, "MiB", impl="reference", **details)
    emit("flash_attention_fwd_bwd_temp_memory_ratio", reference_bytes / max(kernel_bytes, 1), "x", **details)


def _seconds(fn, args, repeats: int) -> float:
    """Median wall time of jitted fn(*args) after compiling and one warm-up run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gpu_figures(heads, head_dim, repeats):
    """Prints TFLOP/s of forward and forward+backward (causal, bf16) for the kernel, XLA and cuDNN."""
    impls = {
        "flash_gpu": lambda q, k, v: flash_attention(q, k, v, causal=True, impl="gpu"),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
    }
    for seq_len in GPU_SEQ_LENS:
        batch = max(GPU_TOKENS // seq_len, 1)
        args = _inputs(batch, seq_len, heads, head_dim, jnp.bfloat16)
        forward_flops = 4 * batch * heads * seq_len * seq_len * head_dim / 2  # causal: half the scores
        for name, attend in impls.items():
            for pass_name, fn, flops in (("fwd", attend, forward_flops),
                                         ("fwd_bwd", _forward_backward(attend), 3.5 * forward_flops)):
                try:
                    seconds = _seconds(jax.jit(fn), args, repeats)
                except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError) as error:  # say so, keep measuring
                    print(f"# {name} {pass_name} T={seq_len}: {type(error).__name__}: {str(error)[:200]}")
                    continue
                emit(f"flash_attention_{pass_name}_tflops", flops / seconds / 1e12, "TFLOP/s", impl=name,
                     batch=batch, seq_len=seq_len, heads=heads, head_dim=head_dim, dtype="bfloat16", causal=True,
                     ms=round(seconds * 1e3, 3))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    memory_figures(args.batch, args.seq_len, args.heads, args.head_dim, jnp.dtype(args.dtype))
    if jax.default_backend() == "gpu":
        gpu_figures(args.heads, args.head_dim, args.repeats)
    else:
        print("# GPU TFLOP/s: not measured (no GPU on this machine)")


if __name__ == "__main__":
    main()
