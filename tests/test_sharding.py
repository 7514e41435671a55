"""Real multi-device meshes (8 fake CPU devices): sharded params and batches give the 1-device logits."""

import jax
import numpy as np
import pytest
from hf_models import build_hf_model
from jax.sharding import PartitionSpec

import polm_jax as pj
from polm_jax import parallel
from polm_jax.config import DEFAULT_RULES, MeshConfig
from polm_jax.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def reference():
    model = pj.init("tiny-qwen3", seed=4)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (8, 32), dtype=np.int32)
    return model, tokens, np.asarray(pj.forward(model.config, model.params, tokens))


def _sharded_forward(model, tokens, mesh):
    batch = parallel.batch_sharding(tokens.shape, mesh, DEFAULT_RULES)
    with parallel.activation_sharding(mesh, DEFAULT_RULES):
        return pj.forward(model.config, model.params, jax.device_put(tokens, batch))


@pytest.mark.parametrize("sizes", [dict(fsdp=4, tensor=2), dict(data=2, fsdp=4)])
def test_sharded_logits_equal_single_device(reference, sizes):
    model, tokens, expected = reference
    assert len(jax.devices()) == 8
    mesh = parallel.make_mesh(**sizes)
    sharded = pj.init("tiny-qwen3", seed=4, mesh=mesh)
    np.testing.assert_allclose(_sharded_forward(sharded, tokens, mesh), expected, atol=1e-5, rtol=0)

    q = sharded.params["layers"]["attn"]["q_proj"]["kernel"]  # [L, D, H, E]: embed over fsdp, heads over tensor
    cfg, tensor = model.config, sizes.get("tensor", 1)
    assert set(parallel.per_device_shapes(q)) == {(cfg.num_layers, cfg.hidden_size // 4, cfg.num_heads // tensor,
                                                   cfg.head_dim)}
    embed = sharded.params["embed"]  # [V, D]: vocab over tensor, embed over fsdp
    assert set(parallel.per_device_shapes(embed)) == {(cfg.vocab_size // tensor, cfg.hidden_size // 4)}


def test_hf_checkpoint_loads_directly_sharded(tmp_path):
    build_hf_model("gemma2", tmp_path)
    plain = pj.load(str(tmp_path))
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    sharded = pj.load(str(tmp_path), mesh=mesh)
    down = sharded.params["layers"]["mlp"]["down_proj"]["kernel"]  # [L, F, D]: mlp over tensor, embed over fsdp
    assert down.sharding.spec == PartitionSpec(None, "tensor", "fsdp")
    assert set(parallel.per_device_shapes(down)) == {(4, 64, 16)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded.params,
                 plain.params)


def test_polm_checkpoint_restores_onto_a_mesh(tmp_path):
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    model = pj.init("tiny-llama", seed=7, mesh=mesh)
    pj.save(model, str(tmp_path / "ckpt"))
    restored = pj.load(str(tmp_path / "ckpt"), mesh=parallel.make_mesh(fsdp=8))
    assert restored.config == model.config
    up = restored.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert set(parallel.per_device_shapes(up)) == {(2, 8, 128)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.params,
                 model.params)


def test_polm_checkpoint_of_another_model_is_refused(tmp_path):
    pj.save(pj.init("tiny-llama"), str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "polm_model.json").write_text(pj.get_preset("tiny-llama", num_layers=3).to_json())
    with pytest.raises(CheckpointError, match=r"shape mismatches \(\d+\): \['layers'\]\['attn'\]"):
        pj.load(str(tmp_path / "ckpt"))


def test_indivisible_dimensions_stay_replicated():
    mesh = parallel.make_mesh(fsdp=8)
    spec = parallel.mesh_spec(PartitionSpec("vocab", "embed"), (10, 12), mesh, {"embed": ["fsdp"]})
    assert spec == PartitionSpec(None, None)  # 12 is not divisible by 8


def test_mesh_from_config_and_bad_sizes():
    assert dict(parallel.mesh_from_config(MeshConfig(data=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="needs 6 devices, but 8 are available"):
        parallel.make_mesh(data=3, fsdp=2, tensor=1)
    with pytest.raises(ConfigError, match="not divisible by the fixed axes' product 3"):
        parallel.make_mesh(data=3)
