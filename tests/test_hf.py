"""Hugging Face checkpoints: logits parity with `transformers`, exact round trips, and clear errors."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from hf_models import FAMILIES, assert_same_tensors, build_hf_model, read_safetensors
from safetensors.numpy import save_file

import polm_jax as pj
from polm_jax.errors import CheckpointError
from polm_jax.models import hf
from polm_jax.models.presets import get_preset, preset_names


@pytest.fixture(scope="module", params=FAMILIES)
def hf_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_hf_model(request.param, folder)


def test_logits_match_transformers(hf_checkpoint):
    family, folder, hf_model = hf_checkpoint
    model = pj.load(str(folder))
    assert model.config.family == family
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(pj.forward(model.config, model.params, tokens))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_logits_match_transformers_with_padding(hf_checkpoint):
    """Right padding (attention mask) and left padding (mask plus explicit position ids), real tokens compared."""
    _, folder, hf_model = hf_checkpoint
    model = pj.load(str(folder))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, model.config.vocab_size, (3, 20))
    lengths = np.array([20, 13, 6])
    real = np.arange(20)[None] < lengths[:, None]
    for mask in (real, real[:, ::-1]):  # right-padded, then left-padded
        positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
        with torch.no_grad():
            expected = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                                position_ids=torch.tensor(positions)).logits.numpy()
        got = np.asarray(pj.forward(model.config, model.params, tokens, segment_ids=mask.astype(np.int32)))
        np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=0)


def test_hf_polm_hf_round_trip_is_exact(hf_checkpoint, tmp_path):
    _, folder, hf_model = hf_checkpoint
    pj.save_hf(pj.load(str(folder)), tmp_path)
    assert_same_tensors(folder, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.tensor(np.random.default_rng(2).integers(0, hf_model.config.vocab_size, (1, 16)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), hf_model(tokens).logits.numpy())


def test_bfloat16_checkpoint_round_trip_and_sharded_export(tmp_path):
    build_hf_model("qwen2", tmp_path / "src", dtype=torch.bfloat16)
    model = pj.load(str(tmp_path / "src"))
    assert model.config.param_dtype == "bfloat16"
    pj.save_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_tensors(tmp_path / "src", tmp_path / "out")
    reloaded = pj.load(str(tmp_path / "out"))  # sharded folder with an index loads back
    np.testing.assert_array_equal(np.asarray(reloaded.params["embed"]), np.asarray(model.params["embed"]))


@pytest.mark.parametrize("name", preset_names())
def test_preset_configs_survive_hf_config_round_trip(name):
    config = get_preset(name)
    assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(config)))) == config


def test_classic_llama31_config_reads_rope_scaling():
    """A config.json in the 4.x format (rope_theta + rope_scaling), as Llama 3.1 checkpoints ship it."""
    classic = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
               "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu"}
    config = hf.config_from_hf(classic)
    assert config.rope_scaling_dict["rope_type"] == "llama3" and config.rope_theta == 500000.0
    assert config.head_dim == 128 and config.eos_token_id == (128001, 128008, 128009)
    assert config.replace(eos_token_id=128001) == get_preset("llama3.1-8b", param_dtype="bfloat16", dtype="bfloat16")


def test_tokenizer_files_travel_with_the_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    build_hf_model("qwen2", tmp_path / "src")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world, the quick brown fox"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    model = pj.load(str(tmp_path / "src"))
    assert model.tokenizer is not None and model.tokenizer.eos_id == tok.token_to_id("<|endoftext|>")
    pj.save_hf(model, tmp_path / "out")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded("the quick fox")["input_ids"] == model.tokenizer.encode("the quick fox")


def _corrupt(folder, drop=(), add=(), reshape=()):
    tensors = read_safetensors(folder)
    for name in drop:
        del tensors[name]
    for name in add:
        tensors[name] = np.zeros(3, np.float32)
    for name in reshape:
        tensors[name] = np.zeros((2, 2), np.float32)
    os.remove(folder / "model.safetensors")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    build_hf_model("llama", tmp_path)
    _corrupt(tmp_path, drop=["model.layers.1.mlp.up_proj.weight"], add=["model.layers.9.extra.weight"],
             reshape=["model.norm.weight"])
    with pytest.raises(CheckpointError) as err:
        pj.load(str(tmp_path))
    message = str(err.value)
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors (1): model.layers.9.extra.weight" in message
    assert "model.norm.weight: file (2, 2), model (64,)" in message


def test_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        pj.load(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="no config.json"):
        pj.load(str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM",]}')
    with pytest.raises(CheckpointError, match=r"config.json line 1: invalid JSON"):
        pj.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(CheckpointError, match="unsupported architecture.*MixtralForCausalLM"):
        pj.load(str(tmp_path))
    build_hf_model("gemma2", tmp_path / "g")
    os.remove(tmp_path / "g" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        pj.load(str(tmp_path / "g"))


def test_checkpoint_from_another_model_is_refused(tmp_path):
    build_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors \(9\): model.layers.2"):
        pj.load(str(tmp_path))
