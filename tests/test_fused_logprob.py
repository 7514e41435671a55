"""The fused log-prob op: every implementation against the materialised reference (values, d_hidden, d_lm_head
for random upstream gradients of log-probs and entropies), TPU and GPU lowering, and SFT steps through it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polm_jax as pj
from pallas_kernels import fused_logprob
from pallas_kernels.fused_logprob import BlockSizes, resolve_impl
from polm_jax.algorithms.sft import sft_loss
from polm_jax.api import config_from_section
from polm_jax.config import Config, load_config
from polm_jax.errors import ConfigError
from polm_jax.ops.logprob import token_logprobs
from polm_jax.train.state import init_state
from polm_jax.train.step import make_train_step

N, H, V = 37, 64, 300  # odd rows and vocabulary: padded rows, and a last vocabulary tile that is masked
IGNORE = -100
TOLERANCES = {"float32": (1e-5, 1e-5), "bfloat16": (3e-3, 5e-2)}  # (values, gradients), relative
SMALL_BLOCKS = {"xla_chunked": BlockSizes(16, 128), "tpu": BlockSizes(16, 128), "gpu": BlockSizes(64, 64, 64)}


def _gpu_interpreter_available() -> bool:
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401
    except ImportError:
        return False
    return True


def _problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(N, H)), dtype)
    lm_head = jnp.asarray(rng.normal(size=(H, V)) * 0.3, dtype)
    targets = rng.integers(0, V, N)
    targets[[0, 5, N - 1]] = IGNORE
    upstream = [jnp.asarray(rng.normal(size=N), jnp.float32) for _ in range(2)]
    return hidden, lm_head, jnp.asarray(targets, jnp.int32), upstream


def _value_and_grads(hidden, lm_head, targets, upstream, **options):
    """((logp, entropy), (d_hidden, d_lm_head)) of sum(logp * u0 + entropy * u1)."""

    def loss(h, w):
        logp, entropy = fused_logprob(h, w, targets, return_entropy=True, ignore_index=IGNORE, **options)
        return (logp * upstream[0]).sum() + (entropy * upstream[1]).sum(), (logp, entropy)

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, lm_head)
    return outputs, grads


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


CASES = [("xla_chunked", "float32", 0.7, 5.0), ("xla_chunked", "float32", 1.0, None),
         ("tpu", "float32", 0.7, 5.0), ("tpu", "float32", 1.0, None),
         ("xla_chunked", "bfloat16", 1.3, 3.0), ("tpu", "bfloat16", 1.3, 3.0), ("gpu", "bfloat16", 1.3, 3.0)]


@pytest.mark.parametrize(("impl", "dtype", "temperature", "softcap"), CASES)
def test_implementation_equals_the_reference(impl, dtype, temperature, softcap):
    if impl == "gpu" and not _gpu_interpreter_available():
        pytest.skip("this jax has no Mosaic GPU interpreter")
    hidden, lm_head, targets, upstream = _problem(dtype)
    transform = {"temperature": temperature, "softcap": softcap}
    (logp, entropy), (d_hidden, d_lm_head) = _value_and_grads(
        hidden, lm_head, targets, upstream, impl=impl, interpret=impl != "xla_chunked",
        block_sizes=SMALL_BLOCKS[impl], **transform)
    # The reference gets the same values in f32: for bf16 inputs that is the exact answer they should approach.
    (want_logp, want_entropy), (want_d_hidden, want_d_lm_head) = _value_and_grads(
        hidden.astype(jnp.float32), lm_head.astype(jnp.float32), targets, upstream, impl="reference", **transform)

    value_tol, grad_tol = TOLERANCES[dtype]
    assert logp.dtype == entropy.dtype == jnp.float32 and logp.shape == entropy.shape == (N,)
    assert d_hidden.dtype == hidden.dtype and d_lm_head.dtype == lm_head.dtype
    assert _relative_error(logp, want_logp) < value_tol
    assert _relative_error(entropy, want_entropy) < value_tol
    assert _relative_error(d_hidden, want_d_hidden) < grad_tol
    assert _relative_error(d_lm_head, want_d_lm_head) < grad_tol
    ignored = np.asarray(targets) == IGNORE
    assert np.all(np.asarray(logp)[ignored] == 0) and np.all(np.asarray(entropy)[ignored] == 0)
    assert np.all(np.asarray(d_hidden, np.float32)[ignored] == 0)  # an ignored row sends no gradient at all
    assert np.all(np.asarray(logp)[~ignored] < 0) and np.all(np.asarray(entropy)[~ignored] > 0)


@pytest.mark.parametrize(("impl", "dtype"), [("xla_chunked", "float32"), ("tpu", "float32"), ("gpu", "bfloat16")])
def test_columns_past_the_vocabulary_never_count(impl, dtype):
    """Equal logits of -8 make a uniform distribution; a padding column (logit 0) would dominate it."""
    if impl == "gpu" and not _gpu_interpreter_available():
        pytest.skip("this jax has no Mosaic GPU interpreter")
    hidden, lm_head = jnp.ones((N, H), dtype), jnp.full((H, V), -8 / H, dtype)
    logp, entropy = fused_logprob(hidden, lm_head, jnp.arange(N, dtype=jnp.int32), return_entropy=True, impl=impl,
                                  interpret=impl != "xla_chunked", block_sizes=SMALL_BLOCKS[impl])
    np.testing.assert_allclose(logp, np.full(N, -np.log(V)), rtol=1e-6)
    np.testing.assert_allclose(entropy, np.full(N, np.log(V)), rtol=1e-6)


def test_log_probs_alone_match_and_auto_is_xla_chunked_on_cpu():
    hidden, lm_head, targets, upstream = _problem("float32", seed=1)

    def grads(impl):
        loss = lambda h, w: (fused_logprob(h, w, targets, ignore_index=IGNORE, impl=impl) * upstream[0]).sum()
        return jax.grad(loss, argnums=(0, 1))(hidden, lm_head)

    assert resolve_impl("auto") == "xla_chunked"
    for got, want in zip(grads("auto"), grads("reference"), strict=True):
        assert _relative_error(got, want) < 1e-5


def test_bad_inputs_are_refused_with_the_reason():
    hidden, lm_head, targets, _ = _problem("float32")
    with pytest.raises(ValueError, match="share one float dtype"):
        fused_logprob(hidden, lm_head.astype(jnp.bfloat16), targets)
    with pytest.raises(ValueError, match="block_v 100 must be a multiple of 128"):
        fused_logprob(hidden, lm_head, targets, impl="tpu", interpret=True, block_sizes=BlockSizes(16, 100))
    with pytest.raises(ValueError, match="impl 'triton'"):
        fused_logprob(hidden, lm_head, targets, impl="triton")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        fused_logprob(hidden, lm_head, targets, impl="gpu")


def _lowered(platform: str, dtype, n=2048, h=1024, v=151_936):
    """StableHLO text of value-and-grad (log-probs and entropies) lowered for `platform` at default block sizes."""
    impl = {"tpu": "tpu", "cuda": "gpu"}[platform]

    def loss(hidden, lm_head, targets, upstream):
        logp, entropy = fused_logprob(hidden, lm_head, targets, temperature=0.9, softcap=30.0, impl=impl,
                                      return_entropy=True)
        return (logp * upstream).sum() + entropy.sum()

    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in (((n, h), dtype), ((h, v), dtype), ((n,), jnp.int32),
                                                     ((n,), jnp.float32))]
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*shapes)
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernels_lower_for_tpu(dtype):
    assert _lowered("tpu", dtype).count("tpu_custom_call") == 3  # forward, d_hidden, d_lm_head


def test_gpu_kernels_lower_for_cuda():
    assert "mosaic_gpu" in _lowered("cuda", jnp.bfloat16, v=128_256)


def test_token_logprobs_pallas_on_cpu_runs_the_tpu_kernel_in_interpret_mode():
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(2, 9, H)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(H, V)) * 0.3, jnp.float32)
    targets = rng.integers(0, V, (2, 9))
    got = token_logprobs(hidden, head, targets, softcap=4.0, impl="pallas", return_entropy=True)
    want = token_logprobs(hidden, head, targets, softcap=4.0, impl="reference", return_entropy=True)
    assert got[0].shape == got[1].shape == (2, 9)
    for g, w in zip(got, want, strict=True):
        assert _relative_error(g, w) < 1e-5
    with pytest.raises(ValueError, match="impl 'xla'"):
        token_logprobs(hidden, head, targets, impl="xla")


def _sft_step(model, logprob_impl: str):
    """One SGD step of the SFT loss on a fixed batch, the token log-probs computed by `logprob_impl`."""
    config = model.config.replace(logprob_impl=logprob_impl)
    loss = sft_loss(config, lambda trainable, frozen: trainable)
    optimizer = optax.sgd(0.5)
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, config.vocab_size, (4, 24)).astype(np.int32)
    batch = {"tokens": tokens, "positions": np.tile(np.arange(24, dtype=np.int32), (4, 1)),
             "segment_ids": np.ones((4, 24), np.int32), "loss_mask": (rng.random((4, 24)) < 0.7).astype(np.int32)}
    fused = "bwd=_fused_bwd" in str(jax.make_jaxpr(loss)(model.params, {}, batch, None))  # fused_logprob's vjp
    assert fused == (logprob_impl != "reference")  # the config's setting decides the op's implementation
    return make_train_step(loss, optimizer)(init_state(model.params, optimizer, 0), {}, batch)


def test_an_sft_step_through_xla_chunked_equals_one_through_the_reference():
    model = pj.init("tiny-llama", seed=0, num_layers=1, final_softcap=30.0)
    chunked, chunked_metrics = _sft_step(model, "xla_chunked")
    reference, reference_metrics = _sft_step(model, "reference")
    np.testing.assert_allclose(chunked_metrics["loss"], reference_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(chunked_metrics["grad_norm"], reference_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), chunked.params, reference.params)


def test_logprob_impl_is_a_model_setting_in_yaml():
    cfg = load_config(Config, None, ["model.preset=tiny-llama", "model.logprob_impl=xla_chunked"])
    assert config_from_section(cfg.model).logprob_impl == "xla_chunked"
    with pytest.raises(ConfigError, match="logprob_impl"):
        load_config(Config, None, ["model.logprob_impl=xla"])
