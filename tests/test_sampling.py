"""The KV-cache sampler through its public API: parity with full forwards and with transformers, ragged batches,
seeds, filters, stops, sharding, and bad input."""

import jax
import numpy as np
import pytest
import torch
from hf_models import FAMILIES, build_hf_model

import polm_jax as pj
from polm_jax import parallel
from polm_jax.errors import ConfigError, DataError
from polm_jax.sampling.engine import make_engine
from polm_jax.sampling.generate import generate, place_prompts
from polm_jax.sampling.params import SamplingParams
from polm_jax.sampling.processors import filter_logits, sample_tokens

NEW = 8
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=NEW, temperature=0.7, n=2, seed=3)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    """A tiny random model of each family with wide weights (so argmaxes are clear), as transformers saves it."""
    folder = tmp_path_factory.mktemp(request.param)
    return build_hf_model(request.param, folder), pj.load(str(folder))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The llama one again (same config, so compiled rollouts are shared), with its transformers twin."""
    folder = tmp_path_factory.mktemp("llama")
    return build_hf_model("llama", folder, seed=1), pj.load(str(folder))


def _prompts(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, model.config.vocab_size, n).tolist() for n in lengths]


def _teacher_forced_logits(model, prompts, out):
    """Full no-cache forward over each prompt + its completion (right-padded): logits [R, T, V] and each row's
    prompt length, rows as in `out`."""
    rows = [prompts[p] + out.tokens[r, :out.lengths[r]].tolist() for r, p in enumerate(out.prompt_index)]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros_like(tokens)
    for r, row in enumerate(rows):
        tokens[r, :len(row)], segments[r, :len(row)] = row, 1
    logits = np.asarray(pj.forward(model.config, model.params, tokens, segment_ids=segments))
    return logits, [len(prompts[p]) for p in out.prompt_index]


def _completion_logits(logits, prompt_lengths, out, r):
    """The logits [len_r, V] that predicted row r's generated tokens."""
    start = prompt_lengths[r] - 1
    return logits[r, start:start + out.lengths[r]]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_is_the_argmax_of_a_full_forward_at_every_step(family_model):
    """Ragged prompts (longer than gemma's sliding window of 8): every greedy token is the argmax of a no-cache
    forward over the prompt and the tokens before it; model log-probs equal the teacher-forced ones to 1e-4."""
    _, model = family_model
    prompts = _prompts(model, [5, 11, 3])
    out = generate(model.config, model.params, prompts, GREEDY)
    logits, prompt_lengths = _teacher_forced_logits(model, prompts, out)
    for r in range(len(prompts)):
        step_logits = _completion_logits(logits, prompt_lengths, out, r)
        generated = out.tokens[r, :out.lengths[r]]
        np.testing.assert_array_equal(step_logits.argmax(-1), generated)
        expected = np.take_along_axis(_log_softmax(step_logits), generated[:, None], 1)[:, 0]
        np.testing.assert_allclose(out.model_logprobs[r, :out.lengths[r]], expected, atol=1e-4, rtol=0)
        assert out.truncated[r] == (generated[-1] != model.config.eos_token_id)  # stopped by EOS, else cut
        assert out.truncated[r] == (out.lengths[r] == NEW) or generated[-1] == model.config.eos_token_id
    np.testing.assert_array_equal(out.logprobs, 0.0)  # greedy: a point mass


def test_sampled_logprobs_equal_teacher_forced_ones(llama):
    """Temperature 0.7, two samples per prompt: log-probs under the sampling distribution (logits / 0.7) and under
    the unmodified model equal a teacher-forced forward's to 1e-4."""
    _, model = llama
    prompts = _prompts(model, [6, 9], seed=1)
    out = generate(model.config, model.params, prompts, SAMPLED)
    np.testing.assert_array_equal(out.prompt_index, [0, 0, 1, 1])
    logits, prompt_lengths = _teacher_forced_logits(model, prompts, out)
    for r in range(len(out.lengths)):
        step_logits = _completion_logits(logits, prompt_lengths, out, r)
        generated = out.tokens[r, :out.lengths[r]][:, None]
        for got, temperature in ((out.logprobs, 0.7), (out.model_logprobs, 1.0)):
            expected = np.take_along_axis(_log_softmax(step_logits / temperature), generated, 1)[:, 0]
            np.testing.assert_allclose(got[r, :out.lengths[r]], expected, atol=1e-4, rtol=0)


def test_greedy_equals_transformers_generate(llama):
    """A left-padded ragged batch: the same tokens as transformers' greedy generate (which stops at EOS and pads)."""
    hf_model, model = llama
    prompts = _prompts(model, [7, 4, 10], seed=2)
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                     max_new_tokens=NEW, pad_token_id=0)[:, width:].numpy()
    out = generate(model.config, model.params, prompts, GREEDY)
    np.testing.assert_array_equal(out.tokens[:, :expected.shape[1]], expected)
    np.testing.assert_array_equal(out.tokens[:, expected.shape[1]:], 0)


def test_ragged_batch_gives_each_prompt_what_it_gets_alone(llama):
    _, model = llama
    prompts = _prompts(model, [3, 14, 8, 1], seed=4)
    together = generate(model.config, model.params, prompts, GREEDY)
    for i, prompt in enumerate(prompts):
        alone = generate(model.config, model.params, [prompt], GREEDY)
        np.testing.assert_array_equal(together.tokens[i], alone.tokens[0])
        np.testing.assert_allclose(together.model_logprobs[i], alone.model_logprobs[0], atol=1e-4, rtol=0)


def test_seeds_make_samples_reproducible(llama):
    _, model = llama
    prompts = _prompts(model, [4, 6], seed=5)
    first = generate(model.config, model.params, prompts, SAMPLED)
    again = generate(model.config, model.params, prompts, SAMPLED)
    other = generate(model.config, model.params, prompts, SAMPLED.replace(seed=4))
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert (first.tokens != other.tokens).any()
    assert (first.tokens[0] != first.tokens[1]).any()  # the n samples of a prompt differ


def test_top_k_1_samples_the_argmax():
    logits = np.random.default_rng(0).normal(0.0, 3.0, (64, 512)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 64)
    sample = jax.jit(sample_tokens, static_argnums=2)  # one compile per params (faster than op by op)
    greedy, _ = sample(logits, keys, SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    tokens, logprobs = sample(logits, keys, SamplingParams(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_allclose(logprobs, 0.0, atol=1e-6)  # one candidate left: probability 1
    tokens, _ = sample(logits, keys, SamplingParams(temperature=1.0))
    assert (np.asarray(tokens) != greedy).mean() > 0.1  # plain sampling does not


def test_filters_keep_the_expected_candidates():
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]], np.float32))

    def kept(**options):
        x, ids = jax.jit(filter_logits, static_argnums=1)(logits, SamplingParams(**options))
        ids = np.arange(4) if ids is None else np.asarray(ids[0])
        return sorted(ids[np.isfinite(np.asarray(x[0]))].tolist())

    assert kept(top_k=2) == [1, 3]
    assert kept(top_p=0.7) == [1, 3]  # 0.5 then 0.3 reach 0.7
    assert kept(top_p=0.81) == [1, 2, 3]
    assert kept(top_p=1e-6) == [1]  # only the argmax
    assert kept(min_p=0.35) == [1, 3]  # p >= 0.35 * 0.5
    assert kept(min_p=0.999) == [1]
    assert kept(top_k=3, min_p=0.5) == [1, 3]
    assert kept(temperature=2.0) == [0, 1, 2, 3]
    assert kept(temperature=2.0, top_p=0.7) == [1, 2, 3]  # flatter after the temperature: 0.41 + 0.32 < 0.7 + 0.2


def _first_stop(tokens: list, ids: set, sequences: tuple) -> int | None:
    """Where a row of tokens stops (its length) under stop ids and stop sequences; None if it never does."""
    for i, token in enumerate(tokens):
        if token in ids or any(tuple(tokens[i + 1 - len(s):i + 1]) == s for s in sequences if i + 1 >= len(s)):
            return i + 1
    return None


def test_rows_stop_at_eos_ids_and_stop_sequences_and_the_loop_ends_early(llama):
    """The model's EOS ids, sampling.stop_token_ids and stop_sequences each stop a row; the stopping tokens are
    kept, pad and zero log-probs follow, and the loop ends once every row has stopped."""
    _, model = llama
    prompts = _prompts(model, [6, 3, 9], seed=7)
    free = generate(model.config, model.params, prompts, GREEDY)
    rows = [free.tokens[r, :free.lengths[r]].tolist() for r in range(3)]
    eos, stop_id, sequence = rows[0][3], rows[1][2], (rows[2][4], rows[2][5])
    config = model.config.replace(eos_token_id=(model.config.eos_token_id, eos))
    sampling = GREEDY.replace(stop_token_ids=(stop_id,), stop_sequences=(sequence, (9999, 9998)))
    out = generate(config, model.params, prompts, sampling)
    stops = {model.config.eos_token_id, eos, stop_id}
    expected = [_first_stop(row, stops, sampling.stop_sequences) for row in rows]
    assert expected[0] <= 4 and expected[1] <= 3 and expected[2] <= 6
    np.testing.assert_array_equal(out.lengths, expected)
    assert not out.truncated.any() and out.steps == max(expected) < NEW
    for r, length in enumerate(expected):
        np.testing.assert_array_equal(out.tokens[r], rows[r][:length] + [0] * (NEW - length))
        np.testing.assert_array_equal(out.model_logprobs[r, length:], 0.0)


def test_sharded_on_8_devices_gives_the_same_tokens(llama):
    """Params over fsdp=4 x tensor=2, the KV cache's rows over fsdp and its kv heads over tensor: the same sampled
    tokens and log-probs as on 1 device, decoded in chunks as streaming does (generate on a mesh: test_eval_cli)."""
    _, model = llama
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    params = jax.device_put(model.params, pj.param_shardings(model.config, mesh))
    prompts = _prompts(model, [5, 9], seed=8)
    one = generate(model.config, model.params, prompts, SAMPLED)
    engine = make_engine(model.config, SAMPLED, mesh=mesh)
    tokens, lengths = place_prompts(prompts, model.config, SAMPLED, mesh=mesh)  # 4 rows: one per fsdp shard
    state = engine.prefill(params, tokens, lengths, jax.random.key(SAMPLED.seed))
    layers, rows, slots, kv_heads, head_dim = state.cache["k"].shape
    assert set(parallel.per_device_shapes(state.cache["k"])) == {(layers, rows // 4, slots, kv_heads // 2, head_dim)}
    for until in (3, NEW):
        state = engine.decode(params, state, until)
    eight = engine.finish(state)
    np.testing.assert_array_equal(np.asarray(eight.tokens)[:4], one.tokens)
    np.testing.assert_allclose(np.asarray(eight.logprobs)[:4], one.logprobs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(eight.model_logprobs)[:4], one.model_logprobs, atol=1e-4, rtol=0)


def test_long_prompts_are_refused_or_left_truncated(llama):
    _, model = llama
    limit = model.config.max_position_embeddings - NEW  # room for max_new_tokens
    prompt = _prompts(model, [limit + 5], seed=9)[0]
    with pytest.raises(DataError, match=f"prompt 0 has {limit + 5} tokens, more than max_prompt_length {limit}"):
        generate(model.config, model.params, [prompt], GREEDY)
    short = GREEDY.replace(max_prompt_length=6)
    with pytest.raises(DataError, match="more than max_prompt_length 6"):
        generate(model.config, model.params, [prompt], short)
    cut = generate(model.config, model.params, [prompt], short.replace(prompt_truncation="left"))
    np.testing.assert_array_equal(cut.tokens, generate(model.config, model.params, [prompt[-6:]], GREEDY).tokens)


def test_bad_input_is_refused_clearly(llama):
    _, model = llama
    with pytest.raises(DataError, match="prompt 1 is empty"):
        generate(model.config, model.params, [[5], []], GREEDY)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        generate(model.config, model.params, [[5, 100_000]], GREEDY)
    with pytest.raises(ConfigError, match=r"top_p: must be in \(0, 1\]"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature: must be >= 0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ConfigError, match="exceed the model's max_position_embeddings"):
        generate(model.config, model.params, [[5]], GREEDY.replace(max_new_tokens=model.config.max_position_embeddings))


def test_max_new_tokens_zero_returns_empty_rows(llama):
    _, model = llama
    out = generate(model.config, model.params, [[5, 6], [7]], SamplingParams(max_new_tokens=0, n=3))
    assert out.tokens.shape == (6, 0) and out.logprobs.shape == (6, 0)
    np.testing.assert_array_equal(out.lengths, 0)
    np.testing.assert_array_equal(out.prompt_index, [0, 0, 0, 1, 1, 1])
    assert not out.truncated.any() and out.steps == 0
