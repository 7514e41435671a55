"""The train step: token-weighted accumulation, packing, sharding invariance, skipped and non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polm_jax as pj
from polm_jax import parallel
from polm_jax.algorithms.sft import sft_loss
from polm_jax.config import DEFAULT_RULES, OptimSection
from polm_jax.train.state import init_state, state_shardings
from polm_jax.train.step import make_eval_step, make_train_step

LENGTH = 16


def _examples(rng, n):
    """n examples of random lengths: (tokens, loss_mask) each [len]."""
    out = []
    for _ in range(n):
        size = int(rng.integers(3, 8))
        mask = np.ones(size, np.int32)
        mask[: int(rng.integers(1, size - 1))] = 0
        out.append((rng.integers(1, 512, size).astype(np.int32), mask))
    return out


def _rows(examples_per_row, length=LENGTH):
    """Lay out rows of examples: tokens, positions, segment_ids (1.. per example, 0 padding), loss_mask."""
    batch = {k: np.zeros((len(examples_per_row), length), np.int32)
             for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    for r, examples in enumerate(examples_per_row):
        at = 0
        for seg, (tokens, mask) in enumerate(examples, start=1):
            n = len(tokens)
            batch["tokens"][r, at:at + n], batch["loss_mask"][r, at:at + n] = tokens, mask
            batch["segment_ids"][r, at:at + n], batch["positions"][r, at:at + n] = seg, np.arange(n)
            at += n
    return batch


def _setup(mesh=None, microbatches=1, rows=8, donate=False, model=None):
    """SGD (the update is proportional to the gradient, so float noise stays small), tiny model, SFT loss."""
    model = model or pj.init("tiny-llama", seed=0, num_layers=2)
    optimizer = optax.sgd(0.5)
    shardings = batch_sh = micro_sh = None
    params = model.params
    if mesh is not None:
        param_sh = pj.param_shardings(model.config, mesh)
        params = jax.device_put(params, param_sh)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        shardings = state_shardings(optimizer, shapes, param_sh, mesh)
        keys = ("tokens", "positions", "segment_ids", "loss_mask")
        batch_sh = {k: parallel.batch_sharding((rows, LENGTH), mesh, DEFAULT_RULES) for k in keys}
        micro_sh = {k: parallel.batch_sharding((rows // microbatches, LENGTH), mesh, DEFAULT_RULES) for k in keys}
    loss = sft_loss(model.config, lambda t, f: t)
    step = make_train_step(loss, optimizer, state_shardings=shardings, batch_shardings=batch_sh,
                           microbatch_shardings=micro_sh, microbatches=microbatches, donate=donate)
    return model, loss, step, init_state(params, optimizer, 0, shardings)


def _batch(seed=0, rows=8):
    rng = np.random.default_rng(seed)
    return _rows([_examples(rng, 2) for _ in range(rows)])


def test_loss_is_token_weighted_mean_of_masked_targets():
    model, loss, _, _ = _setup()
    batch = _batch()
    total, count, _ = loss(model.params, {}, batch, None)
    logits = pj.forward(model.config, model.params, batch["tokens"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    picked = np.take_along_axis(np.asarray(logp), batch["tokens"][:, 1:, None], -1)[..., 0]
    seg = batch["segment_ids"]
    mask = (batch["loss_mask"][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    assert count == mask.sum() > 0
    np.testing.assert_allclose(total, -(picked * mask).sum(), rtol=1e-5)


def test_accumulating_four_microbatches_equals_one_full_batch():
    batch = _batch(1)
    _, _, full_step, state = _setup()
    full, full_metrics = full_step(state, {}, batch)
    _, _, micro_step, state = _setup(microbatches=4)
    micro, micro_metrics = micro_step(state, {}, batch)
    np.testing.assert_allclose(micro_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(micro_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), micro.params, full.params)
    assert not np.allclose(full.params["embed"], state.params["embed"])


def test_one_step_on_eight_devices_matches_one_device():
    batch = _batch(2)
    _, _, step, state = _setup()
    single, single_metrics = step(state, {}, batch)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    _, _, sharded_step, state8 = _setup(mesh=mesh, microbatches=2)
    assert len(state8.params["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    with parallel.activation_sharding(mesh, DEFAULT_RULES):
        sharded, metrics = sharded_step(state8, {}, batch)
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded.params, single.params)
    assert sharded.params["embed"].sharding.spec == state8.params["embed"].sharding.spec


def test_packed_rows_give_the_unpacked_loss_and_no_attention_crosses_segments():
    rng = np.random.default_rng(3)
    examples = _examples(rng, 6)
    model, loss, _, _ = _setup()
    packed = _rows([examples[0:3], examples[3:6]])
    unpacked = _rows([[e] for e in examples])
    p_sum, p_count, _ = loss(model.params, {}, packed, None)
    u_sum, u_count, _ = loss(model.params, {}, unpacked, None)
    assert p_count == u_count
    np.testing.assert_allclose(p_sum / p_count, u_sum / u_count, rtol=1e-5)

    changed = {k: v.copy() for k, v in packed.items()}  # new tokens in segment 1 leave segment 2's logits alone
    changed["tokens"][0, : len(examples[0][0])] = (changed["tokens"][0, : len(examples[0][0])] + 7) % 512
    before = pj.forward(model.config, model.params, packed["tokens"], packed["positions"], packed["segment_ids"])
    after = pj.forward(model.config, model.params, changed["tokens"], changed["positions"], changed["segment_ids"])
    second = packed["segment_ids"][0] == 2
    np.testing.assert_allclose(after[0, second], before[0, second], atol=1e-6)
    assert not np.allclose(after[0, packed["segment_ids"][0] == 1], before[0, packed["segment_ids"][0] == 1])


def test_a_batch_without_loss_tokens_is_skipped_without_nan():
    _, _, step, state = _setup()
    batch = _batch(4)
    batch["loss_mask"][:] = 0
    new, metrics = step(state, {}, batch)
    assert metrics["skipped_empty"] == 1 and metrics["count"] == 0 and np.isfinite(metrics["loss"])
    assert int(new.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)


def test_a_non_finite_loss_leaves_params_unchanged():
    model = pj.init("tiny-llama", seed=0, num_layers=2)
    model.params["final_norm"]["scale"] = jnp.full_like(model.params["final_norm"]["scale"], jnp.nan)
    _, _, step, state = _setup(model=model)
    new, metrics = step(state, {}, _batch(5))
    assert metrics["skipped_nonfinite"] == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)


def test_eval_step_sums_match_the_loss():
    model, loss, _, state = _setup()
    batch = _batch(6)
    out = make_eval_step(loss)(state.params, {}, batch)
    total, count, _ = loss(model.params, {}, batch, None)
    np.testing.assert_allclose(out["sum"], total, rtol=1e-6)
    assert out["count"] == count


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    from polm_jax.train.optim import learning_rate

    lr = learning_rate(OptimSection(lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1), 110)
    assert lr(0) == 0 and np.isclose(lr(5), 0.5) and np.isclose(lr(10), 1.0)
    assert np.isclose(lr(110), 1.0 if schedule == "constant" else 0.1)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from polm_jax.train.optim import decay_mask

    model = pj.init("tiny-llama", seed=0, num_layers=1, qkv_bias=True)
    mask = decay_mask(["norm", "bias", "embed"])(model.params)
    assert mask["layers"]["attn"]["q_proj"]["kernel"] and mask["lm_head"]
    assert not mask["embed"] and not mask["final_norm"]["scale"] and not mask["layers"]["attn"]["q_proj"]["bias"]
