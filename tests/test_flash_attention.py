"""Flash attention: the Pallas TPU kernel in interpret mode against the plain-jnp reference (values and gradients),
its lowering for TPU (and the GPU kernel's for CUDA), and the model with attention_impl="pallas" against "xla"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention
from pallas_kernels.flash_attention import BlockSizes, default_block_sizes
from polm_jax import parallel
from polm_jax.config import DEFAULT_RULES
from polm_jax.models import presets
from polm_jax.models import transformer as tf
from polm_jax.ops.attention import attention

SMALL_BLOCKS = BlockSizes(16, 16)  # several blocks per sequence, quick to interpret


def _run_jitted(fn, *args):
    """fn(*args) compiled without LLVM optimisation: these tests check numbers, and compiling is most of their time."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _qkv(batch, q_len, kv_len, q_heads, kv_heads, dtype, head_dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, q_heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q, k, v, d_out


def _value_and_grads(q, k, v, d_out, **options):
    """flash_attention's output and (dq, dk, dv) of sum(out * d_out), in one jitted call."""
    def loss(q, k, v):
        out = flash_attention(q, k, v, **options)
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    (_, out), grads = _run_jitted(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), q, k, v)
    return out, grads


def _relative_error(got, want):
    """||got - want|| / ||want|| (Frobenius norms, in f32)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _packed(lengths_per_row, total):
    """Segment ids [B, total]: consecutive examples 1, 2, ... of the given lengths, then padding (0)."""
    rows = []
    for lengths in lengths_per_row:
        row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(total - sum(lengths))])
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.int32)


CASES = {
    # name: (batch, T, S, Hq, Hkv, options)
    "causal-mha-unaligned": (1, 40, 40, 2, 2, {"causal": True}),
    "full-mha-unaligned": (1, 40, 40, 2, 2, {"causal": False}),
    "window-gqa4-T>S": (1, 45, 29, 4, 1, {"causal": True, "sliding_window": 7}),
    "packed-gqa2": (2, 40, 40, 4, 2, {"causal": True, "segment_ids": _packed([(9, 20, 7), (40,)], 40)}),
    "packed-pair-T<S-window-softcap": (1, 24, 37, 4, 2, {
        "causal": False, "sliding_window": 20, "softcap": 5.0,
        "segment_ids": (_packed([(10, 14)], 24), _packed([(15, 12)], 37))}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference_f32(name):
    batch, q_len, kv_len, q_heads, kv_heads, options = CASES[name]
    q, k, v, d_out = _qkv(batch, q_len, kv_len, q_heads, kv_heads, jnp.float32)
    out, grads = _value_and_grads(q, k, v, d_out, interpret=True, block_sizes=SMALL_BLOCKS, **options)
    want_out, want_grads = _value_and_grads(q, k, v, d_out, impl="reference", **options)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _relative_error(out, want_out) < 1e-5
    for got, want, what in zip(grads, want_grads, ("dq", "dk", "dv")):
        assert _relative_error(got, want) < 1e-5, what
    if isinstance(options.get("segment_ids"), jax.Array):  # padding rows (segment 0) see nothing
        padding = np.asarray(options["segment_ids"] == 0)
        assert padding.any() and np.all(np.asarray(out)[padding] == 0.0)
        assert np.all(np.asarray(grads[0])[padding] == 0.0) and all(np.isfinite(g).all() for g in grads)


def test_interpret_matches_reference_bf16_with_every_mask():
    segment_ids = _packed([(30, 18), (50,)], 50)
    options = {"causal": True, "sliding_window": 12, "softcap": 20.0, "segment_ids": segment_ids}
    q, k, v, d_out = _qkv(2, 50, 50, 4, 2, jnp.bfloat16)
    out, grads = _value_and_grads(q, k, v, d_out, interpret=True, block_sizes=SMALL_BLOCKS, **options)
    # the reference sees the same bf16 values, in f32: it is the truth the bf16 kernel approximates
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    want_out, want_grads = _value_and_grads(*upcast, d_out, impl="reference", **options)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert _relative_error(out, want_out) < 3e-3
    for got, want, what in zip(grads, want_grads, ("dq", "dk", "dv")):
        assert _relative_error(got, want) < 5e-2, what


def test_fully_masked_blocks_are_not_computed():
    # Keys 16..31 are padding (segment 0) and keys from 32 on are past every query (causal, T=32 < S=64). Filled
    # with NaN, they would poison the output (0 * NaN) if their blocks were computed.
    q, k, v, d_out = _qkv(1, 32, 64, 2, 1, jnp.float32)
    options = {"causal": True, "segment_ids": (jnp.ones((1, 32), jnp.int32), _packed([(16,)], 64).at[:, 32:].set(1))}
    hidden = (jnp.arange(64) >= 16)[None, :, None, None]
    out, grads = _value_and_grads(q, jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v), d_out,
                                  interpret=True, block_sizes=SMALL_BLOCKS, **options)
    want_out, want_grads = _value_and_grads(q, jnp.where(hidden, 0.0, k), jnp.where(hidden, 0.0, v), d_out,
                                            impl="reference", **options)
    assert _relative_error(out, want_out) < 1e-5
    for got, want in zip(grads, want_grads):
        assert _relative_error(got, want) < 1e-5


def test_bad_arguments_are_refused_with_the_reason():
    q, k, v, _ = _qkv(1, 16, 16, 2, 1, jnp.float32)
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        flash_attention(q, k, v, impl="tpu", block_sizes=BlockSizes(64, 128))
    with pytest.raises(ValueError, match="multiples of 8"):
        flash_attention(q, k, v, interpret=True, block_sizes=BlockSizes(12, 16))
    with pytest.raises(ValueError, match="segment ids"):
        flash_attention(q, k, v, segment_ids=jnp.ones((1, 15), jnp.int32))
    with pytest.raises(ValueError, match="as a pair"):
        flash_attention(q, k[:, :8], v[:, :8], segment_ids=jnp.ones((1, 16), jnp.int32))
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        flash_attention(q, k.repeat(3, axis=2), v.repeat(3, axis=2))
    with pytest.raises(ValueError, match="bf16/f16"):
        flash_attention(q, k, v, impl="gpu")


def _lowered_kernel_calls(impl, platform, q_len, kv_len, segments=False, **options):
    """The lowered text of forward + backward for `platform` (no device needed), at the default block sizes."""
    q = jax.ShapeDtypeStruct((1, q_len, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, kv_len, 2, 128), jnp.bfloat16)
    segment_types = (jax.ShapeDtypeStruct((1, q_len), jnp.int32), jax.ShapeDtypeStruct((1, kv_len), jnp.int32))

    def loss(q, k, v, q_seg, kv_seg):
        segment_ids = (q_seg, kv_seg) if segments else None
        return flash_attention(q, k, v, impl=impl, segment_ids=segment_ids, **options).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, *segment_types).lower(
        lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("q_len, kv_len, options", [
    (2048, 2048, {"causal": True}),
    (1000, 1300, {"causal": False, "segments": True, "sliding_window": 256, "softcap": 30.0}),
])
def test_tpu_kernels_lower_for_tpu_at_default_block_sizes(q_len, kv_len, options):
    assert default_block_sizes("tpu", q_len, kv_len, head_dim=128).every == (512, 512, 512, 512)
    text = _lowered_kernel_calls("tpu", "tpu", q_len, kv_len, **options)
    for kernel in ("flash_attention_forward", "flash_attention_dkv", "flash_attention_dq"):
        assert kernel in text
    assert text.count("tpu_custom_call") == 3


def test_gpu_kernels_lower_for_cuda_at_default_block_sizes():
    text = _lowered_kernel_calls("gpu", "cuda", 1000, 1000, segments=True, sliding_window=256, softcap=30.0)
    assert text.count("custom_call @mosaic_gpu") == 3  # forward, dQ, dK/dV


def test_model_with_pallas_attention_equals_xla():
    # Gemma 2 shape: sliding and global layers (lax.cond), logit soft-cap, GQA; two packed examples and padding.
    config = presets.get_preset("tiny-gemma2", num_layers=2)
    rng = np.random.default_rng(0)  # random params without compiling the model's init
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, p.dtype), tf.param_shapes(config))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 3, config.vocab_size)
    segment_ids = _packed([(9, 11), (24,)], 24)
    real = (segment_ids != 0)[..., None]

    def run(impl):
        def loss(params):
            logits = tf.forward(config.replace(attention_impl=impl), params, tokens, segment_ids=segment_ids)
            return jnp.sum(jnp.where(real, logits, 0.0) ** 2) / logits.size, logits
        return _run_jitted(jax.value_and_grad(loss, has_aux=True), params)

    (_, logits), grads = run("pallas")
    (_, want_logits), want_grads = run("xla")
    np.testing.assert_allclose(np.where(real, logits, 0), np.where(real, want_logits, 0), atol=2e-5, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert _relative_error(got, want) < 1e-4


def test_attention_over_a_cache_takes_the_xla_path_under_pallas():
    q, k, v, _ = _qkv(1, 1, 8, 2, 1, jnp.float32)
    filled = (jnp.arange(8) <= 5)[None].astype(jnp.int32)  # one query over a cache with six filled slots
    masks = {"q_positions": jnp.full((1, 1), 5), "kv_positions": jnp.arange(8)[None],
             "q_segment_ids": jnp.ones((1, 1), jnp.int32), "kv_segment_ids": filled}
    got = attention(q, k, v, impl="pallas", **masks)
    want = attention(q, k, v, impl="xla", **masks)
    np.testing.assert_array_equal(got, want)


def test_pallas_attention_runs_per_shard_on_a_mesh():
    # batch over (data, fsdp), query and key/value heads over tensor: the kernel runs inside shard_map
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    q, k, v, _ = _qkv(4, 24, 24, 4, 2, jnp.float32)
    segment_ids = _packed([(24,), (10, 14), (7, 9), (20,)], 24)
    positions = tf.positions_from_segments(segment_ids)

    def run(impl):
        return attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids,
                         kv_segment_ids=segment_ids, window=6, impl=impl)

    with parallel.activation_sharding(mesh, DEFAULT_RULES):
        assert "shard_map" in str(jax.make_jaxpr(lambda: run("pallas"))())
        got, want = jax.jit(lambda: run("pallas"))(), jax.jit(lambda: run("xla"))()
    real = np.asarray(segment_ids != 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)
