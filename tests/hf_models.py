"""Builds tiny random Hugging Face checkpoints with `transformers` (torch CPU) for parity tests."""

import os

import numpy as np
import torch
import transformers
from safetensors import safe_open

from polm_jax.models import hf
from polm_jax.models.presets import get_preset

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
}


def build_hf_model(family: str, folder, *, seed: int = 0, dtype=torch.float32, **changes):
    """A random `transformers` model shaped like the tiny-<family> preset, saved to `folder`; returns it (eval mode).

    Weights are drawn wider than the default init (std 0.3, norm scales between 0.5 and 1.5) so every path matters.
    """
    config = hf.config_to_hf(get_preset(f"tiny-{family}", **changes))
    config_cls, model_cls = _CLASSES[family]
    hf_config = config_cls(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    offset = 1.0 if family.startswith("gemma") else 0.0  # Gemma norms scale by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3) if "norm" not in name else p.uniform_(0.5 - offset, 1.5 - offset)
    model = model.to(dtype)
    model.save_pretrained(folder)
    return model


def read_safetensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of every *.safetensors file in `folder`, by name."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(folder_a, folder_b):
    """The two folders hold the same tensor names, each with the same dtype, shape and bytes."""
    a, b = read_safetensors(folder_a), read_safetensors(folder_b)
    assert sorted(a) == sorted(b)
    for name, tensor in a.items():
        assert (b[name].dtype, b[name].shape) == (tensor.dtype, tensor.shape), name
        assert b[name].tobytes() == tensor.tobytes(), name
