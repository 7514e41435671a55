"""LoRA through the public API: adapters on the real model, merged export, dropout, gradients, a mesh, transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import FAMILIES, build_hf_model
from jax.sharding import PartitionSpec

import polm_jax as pj
from polm_jax import parallel
from polm_jax.config import DEFAULT_RULES
from polm_jax.errors import ConfigError
from polm_jax.models import lora

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3"]
ALL = ["q", "k", "v", "o", "gate", "up", "down"]
RANK, SCALE = 4, 2.0  # alpha 8 / rank 4


def _tokens(config, shape, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape, dtype=np.int32)


def _random_adapters(config, targets=ALL, seed=0, std=0.1):
    """Initialised adapters with B drawn nonzero too, so every adapter changes the model."""
    adapters = lora.init_adapters(config, RANK, targets, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(adapters))))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: std * jax.random.normal(next(keys), x.shape, x.dtype) if path[-1].key == "lora_b" else x,
        adapters)


def _max_diff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def test_adapter_shapes_follow_the_kernels():
    cfg = pj.get_preset("tiny-qwen3")
    adapters = lora.init_adapters(cfg, RANK, ALL, jax.random.key(0))
    L, D, H, K, E, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size)
    shapes = jax.tree.map(lambda x: x.shape, adapters)
    assert shapes["layers"]["attn"] == {
        "q_proj": {"lora_a": (L, D, RANK), "lora_b": (L, RANK, H, E)},
        "k_proj": {"lora_a": (L, D, RANK), "lora_b": (L, RANK, K, E)},
        "v_proj": {"lora_a": (L, D, RANK), "lora_b": (L, RANK, K, E)},
        "o_proj": {"lora_a": (L, H, E, RANK), "lora_b": (L, RANK, D)}}
    assert shapes["layers"]["mlp"] == {
        "gate_proj": {"lora_a": (L, D, RANK), "lora_b": (L, RANK, F)},
        "up_proj": {"lora_a": (L, D, RANK), "lora_b": (L, RANK, F)},
        "down_proj": {"lora_a": (L, F, RANK), "lora_b": (L, RANK, D)}}
    assert set(adapters) == {"layers"}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapters))
    q = adapters["layers"]["attn"]["q_proj"]
    assert not np.any(q["lora_b"]) and 0 < float(jnp.max(jnp.abs(q["lora_a"]))) <= 1 / np.sqrt(D)
    o_a = adapters["layers"]["attn"]["o_proj"]["lora_a"]
    assert float(jnp.max(jnp.abs(o_a))) <= 1 / np.sqrt(H * E)  # fan_in of o_proj is H * E
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), lora.adapter_shapes(cfg, RANK, ALL))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), adapters) == expected
    bf16 = lora.init_adapters(cfg, RANK, ["q"], jax.random.key(0), dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))


@pytest.mark.parametrize("name", TINY)
def test_apply_then_forward_equals_merged_params(name):
    """Fresh adapters (B = 0) leave the logits bit for bit; random ones, every target, every layer its own, give
    the logits of the merged kernels (so scan slices the adapters per layer like the kernels)."""
    model = pj.init(name, seed=5)
    cfg, tokens = model.config, _tokens(model.config, (2, 24), seed=1)
    base = pj.forward(cfg, model.params, tokens)
    fresh = lora.init_adapters(cfg, RANK, ALL, jax.random.key(0))
    np.testing.assert_array_equal(pj.forward(cfg, lora.apply(model.params, fresh, SCALE), tokens), base)

    adapters = _random_adapters(cfg, seed=2)
    applied = pj.forward(cfg, lora.apply(model.params, adapters, SCALE), tokens)
    assert _max_diff(applied, base) > 1e-2
    assert "lora_a" not in model.params["layers"]["attn"]["q_proj"]  # apply does not touch the base tree
    merged = lora.merge(model.params, adapters, SCALE)
    assert jax.tree.structure(merged) == jax.tree.structure(model.params)
    assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, model.params)
    np.testing.assert_allclose(applied, pj.forward(cfg, merged, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", ALL)
def test_each_target_alone_matches_merge(target):
    model = pj.init("tiny-gemma3", seed=6)
    cfg, tokens = model.config, _tokens(model.config, (2, 16), seed=3)
    adapters = _random_adapters(cfg, [target], seed=4)
    (path,) = lora.target_paths(cfg, [target])
    assert path[-1] == lora.TARGET_MODULES[target]
    applied = pj.forward(cfg, lora.apply(model.params, adapters, SCALE), tokens)
    assert _max_diff(applied, pj.forward(cfg, model.params, tokens)) > 1e-3
    np.testing.assert_allclose(applied, pj.forward(cfg, lora.merge(model.params, adapters, SCALE), tokens),
                               atol=1e-5, rtol=0)


def test_targets_select_modules_by_name_or_regex():
    cfg = pj.get_preset("tiny-llama")
    assert lora.target_paths(cfg, ["q", "v"]) == [("layers", "attn", "q_proj"), ("layers", "attn", "v_proj")]
    adapters = lora.init_adapters(cfg, RANK, ["v", "q"], jax.random.key(0))
    assert adapters == {"layers": {"attn": {"q_proj": adapters["layers"]["attn"]["q_proj"],
                                            "v_proj": adapters["layers"]["attn"]["v_proj"]}}}
    assert lora.target_paths(cfg, [r"mlp/(gate|up)_proj"]) == [("layers", "mlp", "gate_proj"),
                                                               ("layers", "mlp", "up_proj")]
    assert [p[-1] for p in lora.target_paths(cfg, ["attn/.*_proj", "down"])] == ["k_proj", "o_proj", "q_proj",
                                                                                 "v_proj", "down_proj"]
    with pytest.raises(ConfigError, match=r"lora target 'qq' matches no kernel.*layers/attn/q_proj"):
        lora.init_adapters(cfg, RANK, ["q", "qq"], jax.random.key(0))
    with pytest.raises(ConfigError, match=r"'lm_head' matches no kernel.*layers/mlp/down_proj"):
        lora.target_paths(cfg, ["lm_head"])
    with pytest.raises(ConfigError, match=r"'\(' is neither a name .* nor a valid regex"):
        lora.target_paths(cfg, ["("])
    with pytest.raises(ConfigError, match="rank must be an int >= 1"):
        lora.init_adapters(cfg, 0, ["q"], jax.random.key(0))


def test_mismatched_adapters_are_refused():
    model = pj.init("tiny-llama")
    adapters = lora.init_adapters(model.config, RANK, ["q"], jax.random.key(0))
    other = lora.init_adapters(pj.get_preset("tiny-llama", hidden_size=32), RANK, ["q"], jax.random.key(0))
    with pytest.raises(ConfigError, match=r"layers/attn/q_proj: lora_a \(2, 32, 4\) .* do not fit kernel"):
        lora.apply(model.params, other, SCALE)
    with pytest.raises(ConfigError, match="already hold an adapter"):
        lora.merge(lora.apply(model.params, adapters, SCALE), adapters, SCALE)
    with pytest.raises(ConfigError, match="adapter at layers/nope has no matching module"):
        lora.apply(model.params, {"layers": {"nope": adapters["layers"]["attn"]["q_proj"]}}, SCALE)


def test_dropout_is_random_per_key_and_off_without_one():
    model = pj.init("tiny-qwen2", seed=1)
    cfg, tokens = model.config.replace(lora_dropout=0.3), _tokens(model.config, (2, 16))
    params = lora.apply(model.params, _random_adapters(cfg), SCALE)
    plain = pj.forward(model.config, params, tokens)  # lora_dropout = 0
    np.testing.assert_array_equal(pj.forward(cfg, params, tokens), plain)  # no rng: deterministic
    np.testing.assert_array_equal(pj.forward(model.config, params, tokens, dropout_rng=jax.random.key(1)), plain)
    one = pj.forward(cfg, params, tokens, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(pj.forward(cfg, params, tokens, dropout_rng=jax.random.key(1)), one)
    assert _max_diff(one, plain) > 1e-3
    assert _max_diff(pj.forward(cfg, params, tokens, dropout_rng=jax.random.key(2)), one) > 1e-3
    np.testing.assert_array_equal(pj.forward(cfg, model.params, tokens, dropout_rng=jax.random.key(1)),
                                  pj.forward(cfg, model.params, tokens))  # no adapters: the rng changes nothing


def _dropout_loss(config, adapters, base, tokens, rng):
    logits = pj.forward(config, lora.apply(base, adapters, SCALE), tokens, dropout_rng=rng)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])


_dropout_grad = jax.jit(jax.value_and_grad(_dropout_loss, argnums=1), static_argnums=0)


@pytest.fixture(scope="module")
def dropout_reference():
    """A mixed sliding/global model with dropout on its adapters: loss and adapter gradients without remat."""
    model = pj.init("tiny-gemma3", seed=2)
    cfg = model.config.replace(lora_dropout=0.2)
    inputs = (_random_adapters(cfg, seed=3), model.params, _tokens(cfg, (2, 16)), jax.random.key(7))
    return cfg, inputs, _dropout_grad(cfg, *inputs)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_dropout_and_adapter_gradients_under_remat(dropout_reference, policy):
    cfg, inputs, (v0, g0) = dropout_reference
    v1, g1 = _dropout_grad(cfg.replace(remat=policy), *inputs)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    assert jax.tree.structure(g1) == jax.tree.structure(inputs[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)


def test_lora_dropout_is_a_runtime_config_field():
    cfg = pj.get_preset("tiny-llama", lora_dropout=0.1)
    assert pj.ModelConfig.from_json(cfg.to_json()) == cfg
    older = json.loads(pj.get_preset("tiny-llama").to_json())
    del older["lora_dropout"]  # a config written before the field existed
    assert pj.ModelConfig.from_json(json.dumps(older)) == pj.get_preset("tiny-llama")
    with pytest.raises(ConfigError, match=r"lora_dropout 1.0 is not in \[0, 1\)"):
        cfg.replace(lora_dropout=1.0)


def test_gradients_reach_only_the_adapters_and_train_them():
    model = pj.init("tiny-llama", seed=4)
    cfg, tokens = model.config, _tokens(model.config, (4, 16))

    def loss(adapters, base):
        logits = pj.forward(cfg, lora.apply(base, adapters, SCALE), tokens[:, :-1])
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0])

    step = jax.jit(jax.value_and_grad(loss))  # argnums=0: no cotangent is ever formed for the base params
    adapters = lora.init_adapters(cfg, RANK, ALL, jax.random.key(0))
    value, grads = step(adapters, model.params)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    q = grads["layers"]["attn"]["q_proj"]
    assert float(jnp.max(jnp.abs(q["lora_b"]))) > 0 and not np.any(q["lora_a"])  # B = 0 at init: no grad for A yet
    for _ in range(3):
        adapters = jax.tree.map(lambda p, g: p - 1.0 * g, adapters, grads)
        new_value, grads = step(adapters, model.params)
        assert new_value < value
        value = new_value


def test_sharded_adapters_give_the_unsharded_logits():
    model = pj.init("tiny-qwen3", seed=4)
    cfg, tokens = model.config, _tokens(model.config, (8, 32))
    adapters = _random_adapters(cfg, seed=5)
    expected = pj.forward(cfg, lora.apply(model.params, adapters, SCALE), tokens)

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = pj.init("tiny-qwen3", seed=4, mesh=mesh)
    shardings = parallel.shardings(lora.adapter_logical_axes(cfg, RANK, ALL), lora.adapter_shapes(cfg, RANK, ALL),
                                   mesh, DEFAULT_RULES)
    placed = jax.device_put(adapters, shardings)
    q, o = placed["layers"]["attn"]["q_proj"], placed["layers"]["attn"]["o_proj"]
    assert q["lora_a"].sharding.spec == PartitionSpec(None, "fsdp", None)  # [L, D, r]: embed over fsdp
    assert q["lora_b"].sharding.spec == PartitionSpec(None, None, "tensor", None)  # [L, r, H, E]: heads over tensor
    assert o["lora_a"].sharding.spec == PartitionSpec(None, "tensor", None, None)
    assert o["lora_b"].sharding.spec == PartitionSpec(None, None, "fsdp")
    assert set(parallel.per_device_shapes(q["lora_a"])) == {(cfg.num_layers, cfg.hidden_size // 2, RANK)}

    fresh = jax.jit(lambda key: lora.init_adapters(cfg, RANK, ALL, key), out_shardings=shardings)(jax.random.key(0))
    assert fresh["layers"]["mlp"]["down_proj"]["lora_a"].sharding.spec == PartitionSpec(None, "tensor", None)

    batch = jax.device_put(tokens, parallel.batch_sharding(tokens.shape, mesh, DEFAULT_RULES))
    with parallel.activation_sharding(mesh, DEFAULT_RULES):
        got = pj.forward(cfg, lora.apply(sharded.params, placed, SCALE), batch)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_loads_in_transformers(family, tmp_path):
    build_hf_model(family, tmp_path / "src")
    model = pj.load(str(tmp_path / "src"))
    adapters = _random_adapters(model.config, seed=6, std=0.05)
    tokens = _tokens(model.config, (2, 20), seed=7)
    ours = np.asarray(pj.forward(model.config, lora.apply(model.params, adapters, SCALE), tokens))
    assert _max_diff(ours, pj.forward(model.config, model.params, tokens)) > 1e-2

    pj.save_hf(pj.Model(model.config, lora.merge(model.params, adapters, SCALE), model.tokenizer), tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        theirs = exported(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
