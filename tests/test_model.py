"""The decoder through the public API: packing, decoding from a KV cache, hidden states, remat, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polm_jax as pj
from polm_jax.models.transformer import positions_from_segments

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3"]


@pytest.fixture(scope="module", params=TINY)
def model(request):
    return pj.init(request.param, seed=3)


def _tokens(model, shape, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, shape, dtype=np.int32)


def test_params_are_stacked_over_layers(model):
    cfg = model.config
    q = model.params["layers"]["attn"]["q_proj"]["kernel"]
    assert q.shape == (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
    assert sum(x.size for x in jax.tree.leaves(model.params)) == cfg.num_params()


def test_packed_examples_do_not_see_each_other(model):
    """Three examples packed in one row (with padding) give each example's logits as if it were alone."""
    lengths = [11, 7, 20]  # 20 > the tiny sliding window of 8, so windows matter too
    pieces = [_tokens(model, (1, n), seed=i) for i, n in enumerate(lengths)]
    packed = np.concatenate(pieces + [np.zeros((1, 4), np.int32)], axis=1)
    segments = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)] + [np.zeros((1, 4))], 1)
    logits = pj.forward(model.config, model.params, packed, segment_ids=segments.astype(np.int32))
    start = 0
    for piece, n in zip(pieces, lengths):
        alone = pj.forward(model.config, model.params, piece)
        np.testing.assert_allclose(logits[:, start:start + n], alone, atol=2e-5, rtol=0)
        start += n


def test_positions_restart_per_segment():
    segments = jnp.array([[0, 0, 1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(positions_from_segments(segments), [[0, 1, 0, 1, 2, 0, 1, 0]])


def test_decoding_with_cache_equals_full_forward(model):
    """Prefill a left-padded ragged batch, then decode token by token: logits equal one no-cache forward."""
    cfg, total, prompt = model.config, 18, 6
    tokens = _tokens(model, (2, total), seed=5)
    segments = np.ones((2, total), np.int32)
    segments[1, :3] = 0  # row 1 is left-padded by 3
    full = pj.forward(cfg, model.params, tokens, segment_ids=segments)
    positions = np.asarray(positions_from_segments(jnp.asarray(segments)))
    cache = pj.init_cache(cfg, batch=2, max_len=total)
    out, cache = pj.forward(cfg, model.params, tokens[:, :prompt], positions[:, :prompt], segments[:, :prompt], cache)
    steps = [out]
    for t in range(prompt, total):
        out, cache = pj.forward(cfg, model.params, tokens[:, t:t + 1], positions[:, t:t + 1], segments[:, t:t + 1],
                                cache)
        steps.append(out)
    decoded = np.concatenate(steps, axis=1)
    real = segments.astype(bool)
    np.testing.assert_allclose(decoded[real], np.asarray(full)[real], atol=2e-5, rtol=0)
    assert int(cache["index"]) == total


def test_hidden_states_times_head_give_logits(model):
    cfg = model.config
    tokens = _tokens(model, (2, 9))
    hidden = pj.forward(cfg, model.params, tokens, return_hidden=True)
    assert hidden.shape == (2, 9, cfg.hidden_size)
    logits = jnp.dot(hidden, pj.lm_head(cfg, model.params))
    if cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    np.testing.assert_allclose(logits, pj.forward(cfg, model.params, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_values_and_gradients(policy):
    base = pj.init("tiny-gemma3", seed=1)
    remat = base.config.replace(remat=policy)
    tokens = _tokens(base, (2, 16))

    def loss(config, params):
        return jnp.mean(jax.nn.logsumexp(pj.forward(config, params, tokens), -1))

    v0, g0 = jax.value_and_grad(loss, argnums=1)(base.config, base.params)
    v1, g1 = jax.value_and_grad(loss, argnums=1)(remat, base.params)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)


def test_bfloat16_compute_is_close_to_float32():
    model = pj.init("tiny-qwen3", seed=2)
    tokens = _tokens(model, (2, 16))
    f32 = pj.forward(model.config, model.params, tokens)
    bf16 = pj.forward(model.config.replace(dtype="bfloat16"), model.params, tokens)
    assert bf16.dtype == jnp.float32  # logits are accumulated in f32
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.05 * float(jnp.max(jnp.abs(f32)))
    bf16_params = pj.init("tiny-qwen3", seed=2, dtype="bfloat16", param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16_params.params))


def test_bad_inputs_raise_clear_errors():
    model = pj.init("tiny-llama")
    too_long = np.zeros((1, model.config.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match=r"sequence length of 257 exceeds the model's max_position_embeddings \(256\)"):
        pj.forward(model.config, model.params, too_long)
    with pytest.raises(ValueError, match="cache length of 300 exceeds"):
        pj.init_cache(model.config, batch=1, max_len=300)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        pj.forward(model.config, model.params, np.zeros(5, np.int32))
    with pytest.raises(pj.errors.ConfigError, match="did you mean 'tiny-llama'"):
        pj.init("tiny-lama")
    with pytest.raises(pj.errors.ConfigError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        model.config.replace(num_kv_heads=3)
